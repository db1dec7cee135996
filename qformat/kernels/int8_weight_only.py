"""Weight-only int8 linear (`w8a16-int8`): y = x @ (q * s)^T + b with activations in their own dtype.

Paths:
- `reference`: dequantize in fp32, matmul in fp32. The meaning of the op; every other path is tested against it.
- `cpu_int8pack`: `torch.ops.aten._weight_int8pack_mm` (bf16/fp16 activations). The fastest CPU kernel for few
  tokens, and far the slowest for many (0.3x of bf16 at M >= 128, cpu-kernels.md), so it runs below
  `INT8PACK_MAX_TOKENS` only. It needs K % 16 == 0 with bf16 input (the format's shape rules guarantee it).
- `cpu_int_mm_split`: from `INT8PACK_MAX_TOKENS` to `SPLIT_MAX_TOKENS` tokens with bf16/fp16 activations on CPU. Each token row x is written as
  q1 * s1 + q2 * s2 + e with two int8 vectors (per-token scales, the second quantizing the first's residual), and
  both are multiplied by the int8 weight in one `torch._int_mm` (exact int32 sums, weight in its stored layout). The
  representation error e is at most max|x| / (2 * 127 * 254) per element; measured on 1024 x 4096 weights, the
  result before the final rounding to bf16 is 10-100x closer to the exact product than the bf16 GEMM on a
  dequantized bf16 weight (3e-5 to 2e-4 vs 3e-3 relative), so this path is more precise than the scheme's bf16
  numerics, never less. Not used for fp32 activations, whose own precision is finer.
- `dequant_tiled`: dequantize a block of output rows at a time to the activation dtype and multiply; the transient
  copy is one block, never the whole weight. Any device, any dtype; the CUDA path, the fp32 path, and the CPU path
  from `SPLIT_MAX_TOKENS` tokens on, where the dequantization is amortized over enough rows to beat two int8
  GEMMs (measured: 1.1-1.2x faster than the split at M=512, 1.1x slower at M=128).
"""

from __future__ import annotations

import torch

from qformat.kernels._trace import record_path
from qformat.kernels.activations import quantize_per_token
from qformat.quantize.dequant import dequantize_dense

__all__ = [
    "INT8PACK_MAX_TOKENS",
    "SPLIT_MAX_TOKENS",
    "TILE_ROWS",
    "Int8WeightOnly",
    "dequant_tiled_linear",
    "int8_weight_only_reference",
]

#: Below this many tokens (rows of x) the CPU uses `_weight_int8pack_mm`; at or above it, the int8 split GEMM.
INT8PACK_MAX_TOKENS = 32
#: From this many tokens on, the CPU dequantizes tile by tile instead.
SPLIT_MAX_TOKENS = 256
#: Output rows dequantized per step by the tiled paths (a 512 x 4096 bf16 block is 4 MB).
TILE_ROWS = 512

_OP = "int8_weight_only"


def int8_weight_only_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                               bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 reference: (x @ (q * s)^T + b), returned in x's dtype."""
    w = dequantize_dense(weight, scale)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


def dequant_tiled_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                         *, to_float=None) -> torch.Tensor:
    """x @ (w * s)^T (+ b) in x's dtype, dequantizing TILE_ROWS output rows at a time.

    `to_float(block) -> block in x's dtype` converts stored values (default: a cast; fp8 passes a faster one).
    """
    rows = weight.shape[0]
    out = torch.empty(x.shape[0], rows, dtype=x.dtype, device=x.device)
    scale = scale.reshape(-1, 1).to(x.dtype)
    for r0 in range(0, rows, TILE_ROWS):
        block = weight[r0 : r0 + TILE_ROWS]
        block = to_float(block, x.dtype) if to_float is not None else block.to(x.dtype)
        block.mul_(scale[r0 : r0 + TILE_ROWS])
        torch.matmul(x, block.t(), out=out[:, r0 : r0 + TILE_ROWS])
    if bias is not None:
        out.add_(bias.to(x.dtype))
    return out


class Int8WeightOnly:
    """The op for one module, with what it needs prepared once for its device (settled at load time)."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight, self.scale, self.bias = weight, scale, bias
        self.on_cpu = weight.device.type == "cpu"
        # _weight_int8pack_mm with bf16 input crashes or returns NaN unless K % 16 == 0 (cpu-kernels.md)
        self.int8pack_ok = self.on_cpu and weight.shape[1] % 16 == 0
        self.scale_row = scale.to(torch.float32).reshape(1, -1)
        self._pack_scales: dict[torch.dtype, torch.Tensor] = {}

    def _int8pack(self, x: torch.Tensor) -> torch.Tensor:
        scales = self._pack_scales.get(x.dtype)
        if scales is None:  # the kernel wants 1-D scales in the activation dtype
            scales = self._pack_scales[x.dtype] = self.scale.reshape(-1).to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.weight, scales)
        if self.bias is not None:
            y.add_(self.bias.to(x.dtype))
        return y

    def _int_mm_split(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        q1, s1 = quantize_per_token(x, "int")
        residual = x.to(torch.float32).sub_(q1.to(torch.float32).mul_(s1))
        q2, s2 = quantize_per_token(residual, "int")
        acc = torch._int_mm(self.weight, torch.cat((q1, q2)).t()).t().to(torch.float32)
        y = acc[:rows].mul_(s1).add_(acc[rows:].mul_(s2)).mul_(self.scale_row)
        if self.bias is not None:
            y.add_(self.bias.to(torch.float32))
        return y.to(x.dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.on_cpu and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] < SPLIT_MAX_TOKENS:
            if self.int8pack_ok and x.shape[0] < INT8PACK_MAX_TOKENS:
                record_path(_OP, "cpu_int8pack")
                return self._int8pack(x)
            record_path(_OP, "cpu_int_mm_split")
            return self._int_mm_split(x)
        record_path(_OP, "dequant_tiled")
        return dequant_tiled_linear(x, self.weight, self.scale, self.bias)
