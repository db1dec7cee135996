"""compressed-tensors' `pack-quantized` layout for 8-bit values (format-facts.md section 1.4).

Each int8 value v is stored as the unsigned byte v + 128, four to an int32 word, element i of a row at bits
8i..8i+7 (little-endian), packed along the input dimension: `weight_packed` int32 [out, in / 4], with the logical
shape in `weight_shape` int64 [2]. On a little-endian machine that is exactly the bytes of the unsigned values, so
packing and unpacking are byte reinterpretations, not arithmetic on every bit.
"""

from __future__ import annotations

import sys

import torch

__all__ = ["pack_int8", "unpack_int8"]


def pack_int8(values: torch.Tensor) -> torch.Tensor:
    """int8 [out, in] (in % 4 == 0) -> int32 [out, in / 4] in compressed-tensors' 8-bit pack-quantized layout."""
    out_f, in_f = values.shape
    if in_f % 4:
        raise ValueError(f"pack-quantized 8-bit needs in_features divisible by 4, got {in_f}")
    if values.dtype != torch.int8:
        raise ValueError(f"pack-quantized 8-bit packs int8 values, got {values.dtype}")
    # v + 128 as an unsigned byte is v's two's-complement byte with its top bit flipped: one XOR per byte.
    unsigned = values.contiguous().view(torch.uint8) ^ 0x80
    if sys.byteorder != "little":  # pragma: no cover - the layout is defined little-endian
        raise RuntimeError("pack-quantized packing assumes a little-endian machine")
    return unsigned.view(torch.int32).reshape(out_f, in_f // 4)


def unpack_int8(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_int8`: int32 [out, in / 4] -> int8 [out, in]."""
    out_f, in_f = shape
    unsigned = packed.contiguous().view(torch.uint8).reshape(out_f, -1)[:, :in_f]
    return (unsigned ^ 0x80).view(torch.int8)
