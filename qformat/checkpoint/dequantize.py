"""A plain full-precision state dict from a qformat checkpoint (the reference meaning of its tensors)."""

from __future__ import annotations

from pathlib import Path

import torch

from qformat.checkpoint.reader import open_checkpoint
from qformat.quantize.dequant import dequantize_2_4, dequantize_dense
from qformat.spec.layout import WEIGHT_SUFFIXES

__all__ = ["dequantized_state_dict"]


def dequantized_state_dict(folder: str | Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, with each quantized module's tensors replaced by a dense `weight` of `dtype`.

    Unquantized tensors keep their stored dtype. The result loads into the source architecture with
    `model.load_state_dict(...)`.
    """
    ckpt = open_checkpoint(folder)
    quantized = set(ckpt.quantized_modules)
    state: dict[str, torch.Tensor] = {}
    for name in ckpt.tensors:
        module, _, suffix = name.rpartition(".")
        if module in quantized and suffix in WEIGHT_SUFFIXES:
            continue
        state[name] = ckpt.load(name)
    for module in quantized:
        scale = ckpt.load(f"{module}.weight_scale")
        if f"{module}.compressed" in ckpt.tensors:
            weight = dequantize_2_4(ckpt.load(f"{module}.compressed"), ckpt.load(f"{module}.bitmask"), scale,
                                    ckpt.weight_shape(module)[1], dtype)
        else:
            weight = dequantize_dense(ckpt.load(f"{module}.weight"), scale, dtype)
        state[f"{module}.weight"] = weight
    return state
