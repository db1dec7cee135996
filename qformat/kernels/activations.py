"""Activation quantization: dynamic per-token (one scale per row of the input) or static per-tensor.

The arithmetic is the spec's (docs/FORMAT.md section 14), in fp32: s = max|x| / qmax per row (1.0 for a row of
zeros), q = round_half_even(x / s) clamped to [-127, 127] for int8, or e4m3fn(clamp(x / s, -448, 448)) for fp8.

Edges: a per-token scale is never below the smallest normal fp32 number (`MIN_SCALE`), so |x / s| <= qmax holds
for tiny activations too (a subnormal scale would let int8 values wrap around). A token that holds NaN or Inf gets
a non-finite scale (NaN stays NaN, Inf stays Inf), and a static scale is poisoned the same way per token
(`per_tensor_scales`): the kernels multiply by it after the integer GEMM, so that token's output row is non-finite,
as nn.Linear's would be, on every path, while the other tokens' results do not change.
"""

from __future__ import annotations

import torch

from qformat.quantize.observers import MIN_SCALE, QMAX
from qformat.quantize.weights import VALUE_DTYPES

__all__ = ["fake_quantize", "per_tensor_scales", "quantize_per_tensor", "quantize_per_token"]


def _store(xf: torch.Tensor, qtype: str) -> torch.Tensor:
    """Round/clamp `xf` (already divided by its scale; modified in place) into int8 or fp8."""
    qmax = QMAX[qtype]
    xf.clamp_(-qmax, qmax)
    if qtype == "int":
        xf.round_()
    return xf.to(VALUE_DTYPES[qtype])


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per row, [M, 1] float32 (NaN for a row holding NaN, Inf for one holding +-Inf). amax and amin on x's
    own dtype are exact and need no |x| temporary."""
    return torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg()).to(torch.float32)


def quantize_per_token(x: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D `x`; return (values [M, K] int8/fp8, scales [M, 1] float32).

    A few passes over x: max and min (on x's own dtype, exact), the widening to fp32, the division and the rounding
    cast. (A mixed-dtype division, bf16 by fp32, is 25x slower on CPU than the two steps.) No clamp is needed: with
    s = max|x| / qmax >= `MIN_SCALE` every |x / s| is at most qmax plus an fp32 rounding error, which rounds back to
    qmax. A row with NaN or Inf keeps its non-finite scale (its values are then meaningless; the scale makes the
    output row non-finite).
    """
    scale = _row_absmax(x).div_(QMAX[qtype])
    scale = torch.where(scale == 0, 1.0, scale.clamp_min(MIN_SCALE))  # zero rule; NaN fails == 0 and stays NaN
    xf = x.to(torch.float32, copy=True).div_(scale)
    if qtype == "int":
        xf.round_()
    return xf.to(VALUE_DTYPES[qtype]), scale


def per_tensor_scales(x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """The static `input_scale` as per-token scales [M, 1]: equal to it for a finite token, NaN for a token holding
    NaN or Inf (the clamp in `quantize_per_tensor` would otherwise turn Inf into a finite qmax). Two reductions over
    x; the result is bit-identical to `input_scale` wherever the token is finite (s + 0)."""
    return _row_absmax(x).mul_(0.0).add_(input_scale.to(torch.float32).reshape(1, 1))


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize `x` with one static scale (a stored `input_scale`, float32 [1])."""
    xf = x.to(torch.float32, copy=True).div_(scale.to(torch.float32))
    return _store(xf, qtype)


def fake_quantize(x: torch.Tensor, qtype: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x after a quantize/dequantize round trip, in x's dtype: what the scheme's activations amount to."""
    if input_scale is None:
        values, scale = quantize_per_token(x, qtype)
    else:
        values, scale = quantize_per_tensor(x, input_scale, qtype), per_tensor_scales(x, input_scale)
    return (values.to(torch.float32) * scale).to(x.dtype)
