"""Write evaluation results into an existing qformat checkpoint's config.json, and nothing else.

`quantization_config.evaluation` (docs/FORMAT.md §11.4) is the only key that changes: a new result replaces the one
with the same task, text, token count and metric, others stay (a search's 8192-token held-out confirmation and a
later 2048-token `qformat eval` of the same text are two measurements). The file is replaced atomically (written aside, renamed over
config.json, never through a link), so the weights and their recorded hashes stay valid and an interrupted write
leaves the old config.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qformat.errors import FormatError
from qformat.io.atomic import write_file_atomic
from qformat.io.jsonfile import load_json
from qformat.spec.config import QUANT_METHOD, CheckpointConfig

__all__ = ["merge_results", "record_evaluation"]


def _key(result: dict[str, Any]) -> tuple[Any, ...]:
    return (result.get("task"), result.get("dataset"), result.get("text_sha256"), result.get("tokens"),
            result.get("metric"))


def merge_results(existing: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`existing` with each of `new` replacing the entry for the same task, text, tokens and metric (order kept)."""
    merged = {_key(r): r for r in existing or [] if isinstance(r, dict)}
    for result in new:
        merged[_key(result)] = result
    return list(merged.values())


def record_evaluation(folder: str | Path, results: list[dict[str, Any]]) -> Path:
    """Record `results` in the qformat checkpoint at `folder` (see the module docstring); returns config.json."""
    folder = Path(folder)
    path = folder / "config.json"
    config = load_json(path, error=FormatError, what="record results only into a qformat checkpoint")
    block = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(block, dict) or block.get("quant_method") != QUANT_METHOD:
        raise FormatError(f"{folder} is not a qformat checkpoint (config.json has no qformat quantization_config); "
                          "--record writes only into qformat checkpoints")
    CheckpointConfig.from_dict(block)  # refuse to touch a checkpoint that does not parse
    block["evaluation"] = merge_results(block.get("evaluation"), results)
    CheckpointConfig.from_dict(block)
    data = (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    return write_file_atomic(folder, "config.json", data)
