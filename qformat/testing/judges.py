"""Comparing checkpoints in tests: what two folders hold, tensor for tensor, and what their configs say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

__all__ = ["checkpoint_differences", "checkpoint_tensors", "model_class", "quantization_block"]


def model_class(folder: Path) -> type:
    """The transformers class config.json's `architectures` names (e.g. `LlamaForCausalLM`)."""
    import transformers

    return getattr(transformers, json.loads((Path(folder) / "config.json").read_text())["architectures"][0])


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in `folder`, by name."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def quantization_block(folder: Path) -> dict[str, Any]:
    """config.json's `quantization_config`."""
    return json.loads((Path(folder) / "config.json").read_text())["quantization_config"]


def checkpoint_differences(ours: Path, theirs: Path) -> list[str]:
    """Every way two checkpoints' tensors differ: names only one has, dtypes, shapes, values (with the max abs
    difference). Empty when they hold the same tensors bit for bit."""
    a, b = checkpoint_tensors(ours), checkpoint_tensors(theirs)
    diffs = [f"{name}: only in {'ours' if name in a else 'theirs'}" for name in sorted(a.keys() ^ b.keys())]
    for name in sorted(a.keys() & b.keys()):
        x, y = a[name], b[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}")
        elif not torch.equal(x, y):
            delta = (x.double() - y.double()).abs()
            diffs.append(f"{name}: {x.dtype}, {int((delta > 0).sum())} of {x.numel()} values differ, "
                         f"max abs diff {float(delta.max()):.3g}")
    return diffs
