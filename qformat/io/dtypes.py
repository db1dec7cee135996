"""Safetensors dtype codes as torch dtypes, and a tensor's bytes as a file stores them.

The codes and their sizes are `spec.layout.DTYPE_SIZES` (the format's list, without torch); this module gives each
its torch dtype, for every reader and writer that moves tensors in and out of safetensors files.
"""

from __future__ import annotations

import torch

__all__ = ["SAFETENSORS_CODES", "TORCH_DTYPES", "tensor_bytes"]

#: safetensors dtype code -> torch dtype, for every code of `spec.layout.DTYPE_SIZES`.
TORCH_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "I16": torch.int16, "U16": torch.uint16, "F16": torch.float16,
    "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "U64": torch.uint64,
}  # fmt: skip
#: torch dtype -> safetensors dtype code.
SAFETENSORS_CODES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes as safetensors stores them (row-major, little-endian): a view of its memory where it is a
    contiguous CPU tensor, else of a contiguous CPU copy. The view keeps the memory alive."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")
