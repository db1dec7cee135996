"""The committed bitsandbytes LLM.int8() fixture (tests/fixtures/bnb, written by bitsandbytes 0.50.2 itself) and
edited copies of it for the import's error paths: no bitsandbytes needed."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["BNB_FIXTURE", "BNB_REFERENCE", "edit_bnb_checkpoint"]

BNB_FIXTURE = Path(__file__).parents[2] / "tests" / "fixtures" / "bnb" / "checkpoint"
BNB_REFERENCE = BNB_FIXTURE.parent / "reference.safetensors"


def edit_bnb_checkpoint(out: Path, *, quantization_config: Mapping[str, Any] | None = None,
                        tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
                        source: Path = BNB_FIXTURE) -> Path:
    """Copy the bitsandbytes checkpoint `source` to `out`, update its quantization_config with the given keys (a value
    of None deletes the key) and let `tensors` edit the state dict in place; return `out`."""
    shutil.copytree(source, out)
    if quantization_config:
        config = json.loads((out / "config.json").read_text())
        qc = config["quantization_config"]
        for key, value in quantization_config.items():
            if value is None:
                qc.pop(key, None)
            else:
                qc[key] = value
        (out / "config.json").write_text(json.dumps(config, indent=2))
    if tensors is not None:
        state = load_file(out / "model.safetensors")
        tensors(state)
        save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out
