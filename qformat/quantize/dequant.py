"""Reference dequantization of stored qformat tensors back to a dense float weight.

This is the meaning the format gives the stored tensors (docs/FORMAT.md): w_hat = value * scale per output row, in
fp32, with 2:4 values scattered back to the positions the bitmask marks. Kernels are checked against it.
"""

from __future__ import annotations

import torch

from qformat.quantize.sparse24 import decompress_2_4

__all__ = ["dequantize_2_4", "dequantize_dense"]


def dequantize_dense(values: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[out, in] int8/fp8 values times [out, 1] float scales, computed in fp32 and cast to `dtype`."""
    return (values.to(torch.float32) * scales.to(torch.float32).reshape(-1, 1)).to(dtype)


def dequantize_2_4(compressed: torch.Tensor, bitmask: torch.Tensor, scales: torch.Tensor, in_features: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense [out, in_features] weight from 2:4 `compressed` values [out, in/2], `bitmask` and `scales`."""
    return dequantize_dense(decompress_2_4(compressed, bitmask, in_features), scales, dtype)
