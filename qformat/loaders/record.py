"""What an in-memory quantization records: the source's identity and the finished checkpoint config.

`from_pretrained(..., quantization_config=QFormatConfig(...))` and `qformat.quantize_` end with a model whose
`config.quantization_config` is the block `qformat convert` would have written for the same source and recipe
(`qformat.plan.checkpoint_block`), so `save_pretrained` and `push_to_hub` write a qformat checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from qformat.io.paths import CACHE_SNAPSHOT
from qformat.io.source import SourceCheckpoint
from qformat.loaders.config import QFormatConfig
from qformat.models.names import saved_state_dict
from qformat.plan.record import ModuleError, checkpoint_block
from qformat.plan.recipe import QuantRecipe
from qformat.plan.rules import ConversionPlan

__all__ = ["finished_config", "source_record"]


def _hub_identity(model: nn.Module, checkpoint: SourceCheckpoint | None) -> tuple[str | None, str | None]:
    """(repo id, revision) when the model was loaded from the Hub (its name is not a local folder), else Nones.
    The revision is the commit of the cache snapshot the weights were read from (or the config's `_commit_hash`)."""
    config = getattr(model, "config", None)
    name = str(getattr(config, "_name_or_path", "") or "")
    if not name or Path(name).exists():
        return None, None
    snapshot = CACHE_SNAPSHOT.search(checkpoint.folder.as_posix()) if checkpoint is not None else None
    return name, snapshot["rev"] if snapshot else getattr(config, "_commit_hash", None)


def source_record(model: nn.Module, checkpoint: SourceCheckpoint | None = None) -> dict[str, Any]:
    """`provenance.source` for a model quantized in memory: its Hub repo and revision (None for a local folder or a
    model built in code), and the size of what was quantized (the checkpoint read, else the model's tensors)."""
    repo_id, revision = _hub_identity(model, checkpoint)
    if checkpoint is not None:
        fmt, parameters, nbytes = checkpoint.format, checkpoint.numel, checkpoint.nbytes
    else:
        tensors = list(model.state_dict().values())
        fmt = None
        parameters = sum(t.numel() for t in tensors)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return {"repo_id": repo_id, "revision": revision, "base_model": repo_id, "format": fmt,
            "parameters": parameters, "bytes": nbytes, "skipped_weight_files": []}


def _saved_bytes(model: nn.Module) -> int:
    """Bytes of the tensors `save_pretrained` writes (tied copies once)."""
    return sum(t.numel() * t.element_size() for t in saved_state_dict(model, meta=True).values())


def finished_config(model: nn.Module, plan: ConversionPlan, recipe: QuantRecipe, source: dict[str, Any],
                    errors: dict[str, ModuleError], search: Any = None, smoothing: Any = None,
                    distillation: dict[str, Any] | None = None, command: str | None = None,
                    evaluation: list[dict[str, Any]] | None = None) -> QFormatConfig:
    """The checkpoint config of `model` after `plan` was applied: the rules, provenance (source, recipe, equivalent
    command; tensor hashes are filled in when it is saved; SmoothQuant's record when `smoothing`, a
    `qformat.smooth.SmoothingRecord`, is given; `distillation`, the record of `qformat distill`, which also gives
    its own `command` and `evaluation`), statistics, and a fallback search's records (`search`, a
    `qformat.search.fallback.SearchOutcome`) when one ran."""
    label = source.get("repo_id") or "SOURCE"
    if search is not None:
        evaluation = search.evaluation
    block = checkpoint_block(plan, recipe, source=source, command=command or recipe.command(label), errors=errors,
                             checkpoint_bytes=_saved_bytes(model), evaluation=evaluation,
                             fallback_search=search.record if search is not None else None,
                             smoothing=smoothing.to_dict() if smoothing is not None else None,
                             distillation=distillation)
    return QFormatConfig.from_checkpoint(block)
