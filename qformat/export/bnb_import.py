"""`qformat import SOURCE OUTPUT` of a bitsandbytes LLM.int8() checkpoint: a qformat W8A8 checkpoint with the same
int8 values, bitsandbytes' outlier threshold and the modules it kept.

Per 8-bit module `M` (bitsandbytes' `M.weight` I8, `M.SCB` F32 [N], `M.weight_format`):

- `M.weight` keeps its bytes (values in [-127, 127]);
- `M.weight_scale` = `SCB / 127` as float32 [N, 1] (one fp32 division, the absmax observer's scale of section 8 of
  docs/FORMAT.md: for the same source weight it is the scale `qformat convert` writes). qformat dequantizes
  `fl(q * fl(SCB / 127))`; bitsandbytes' `int8_vectorwise_dequant` computes `fl(fl(q * SCB) * fl(1/127))`. Both are
  within 1.07 (bnb) and 1.39 (qformat) ulp of the exact `q * SCB / 127`; they differ from each other by at most
  2 ulp of fp32 (measured over every q in [-127, 127] and 2 * 10^5 random SCB: 67 % equal, 33 % 1 ulp apart, 0.15 %
  2 ulp apart). No single fp32 scale reproduces bitsandbytes' double rounding for every q of a row.
- a row with `SCB == 0` (bitsandbytes' absmax of an all-zero row; it dequantizes to 0 whatever its values) gets the
  format's zero rule: scale 1.0 and values 0 (rewritten if bitsandbytes stored others). A scale below 2^-126 is
  raised to it (the format's floor; SCB < 1.5e-36).
- `M.SCB` and `M.weight_format` are dropped; `M.bias` and every other tensor keep their bytes.

`llm_int8_threshold` > 0 becomes `outlier_threshold` (format version 2; 0 means no decomposition: null), and every
Linear bitsandbytes kept is a fallback entry with reason "user" naming `llm_int8_skip_modules` where an entry names it.
Like the compressed-tensors import: the plan (`bnb_plan`) refuses first; then each source shard becomes one output
shard, streamed tensor by tensor, verified before it is renamed into place.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from qformat.export.bnb_plan import SCHEME, BnbModule, BnbPlan, plan_bnb_import
from qformat.export.imported import (
    ImportResult,
    import_parameters,
    import_provenance,
    imported_config,
    write_import_shards,
    write_imported,
)
from qformat.io.resolve import resolve_source_for
from qformat.io.source import SourceCheckpoint, TensorReader
from qformat.quantize.observers import MIN_SCALE
from qformat.spec.config import CheckpointConfig
from qformat.spec.layout import module_tensors
from qformat.spec.schemes import scheme_name_for

__all__ = ["bnb_scales", "import_bitsandbytes"]

logger = logging.getLogger(__name__)


def bnb_scales(scb: torch.Tensor) -> torch.Tensor:
    """qformat's per-row scales [N, 1] for bitsandbytes' row absmax `scb` [N]: SCB / 127 in fp32, with the format's
    zero rule (1.0 where SCB is 0) and floor (2^-126)."""
    scale = scb.to(torch.float32).reshape(-1, 1) / 127
    return torch.where(scale > 0, scale.clamp_min(MIN_SCALE), torch.ones_like(scale))


def _module_data(module: BnbModule, reader: TensorReader) -> dict[str, Any]:
    """The module's output tensors: torch tensors, or a memoryview of the source weight bytes kept as they are."""
    scb = reader.tensor(module.scb)
    data: dict[str, Any] = {}
    if module.zero_rows:
        values = reader.tensor(module.weight).clone()
        values[scb == 0] = 0
        data[f"{module.name}.weight"] = values
    else:
        data[f"{module.name}.weight"] = reader.raw(module.weight)
    data[f"{module.name}.weight_scale"] = bnb_scales(scb)
    return data


def _write_shards(plan: BnbPlan, ckpt: SourceCheckpoint, reader: TensorReader,
                  folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write one output shard per source shard; return (tensor -> content hash, tensor -> file)."""
    return write_import_shards(
        ckpt, reader, folder, plan.modules.values(), home=lambda m: m.weight.file,
        specs=lambda m: module_tensors(m.name, SCHEME, m.out_features, m.in_features),
        data=lambda m: _module_data(m, reader), release=lambda m: (m.weight, m.scb))


def _qformat_config(plan: BnbPlan, ckpt: SourceCheckpoint, repo_id: str | None, revision: str | None,
                    base_model: str | None, hashes: dict[str, str], nbytes: int) -> CheckpointConfig:
    provenance = import_provenance(ckpt, repo_id=repo_id, revision=revision, base_model=base_model,
                                   parameters=import_parameters(plan.modules.values(), ckpt),
                                   imported_from=plan.record, hashes=hashes)
    return imported_config(dict.fromkeys(plan.modules, SCHEME), structure=plan.structure, fallback=plan.fallback,
                           provenance=provenance, nbytes=nbytes, outlier_threshold=plan.outlier_threshold)


def import_bitsandbytes(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                        revision: str | None = None, base_model: str | None = None,
                        overwrite: bool = False) -> ImportResult:
    """Write the bitsandbytes LLM.int8() checkpoint `source` (a folder or Hub repo id) as a qformat checkpoint.

    Raises:
        SourceError: SOURCE cannot be found or downloaded.
        FormatError: SOURCE is not a (consistent) bitsandbytes 8-bit checkpoint.
        OptionError: SOURCE uses something qformat v1 cannot represent (4-bit, fp16 master weights, a column-major
            layout, a shape or fused group qformat's kernels cannot run); the message names the module and feature.
    """
    out = Path(output)
    src = resolve_source_for(source, out, revision=revision, overwrite=overwrite)
    ckpt = SourceCheckpoint(src.path)
    with ckpt.reader() as reader:
        plan = plan_bnb_import(src.path, ckpt, reader)
        base = base_model or src.repo_id
        nbytes = write_imported(
            src.path, ckpt, out, overwrite=overwrite, config=plan.config,
            write_shards=lambda folder: _write_shards(plan, ckpt, reader, folder),
            quantization_config=lambda hashes, size: _qformat_config(plan, ckpt, src.repo_id, src.revision, base,
                                                                     hashes, size))
    logger.info("wrote %s", out)
    name = scheme_name_for(SCHEME)
    return ImportResult(out, len(plan.modules), len(plan.fallback), {name: len(plan.modules)}, [], nbytes)
