"""Activation quantization: dynamic per-token (one scale per row of the input) or static per-tensor.

The arithmetic is the spec's (docs/FORMAT.md section 14), in fp32: s = max|x| / qmax per row (1.0 for a row of
zeros), q = round_half_even(x / s) clamped to [-127, 127] for int8, or e4m3fn(clamp(x / s, -448, 448)) for fp8.
"""

from __future__ import annotations

import torch

__all__ = ["QMAX", "quantize_per_token", "quantize_per_tensor", "fake_quantize"]

QMAX = {"int": 127.0, "float": 448.0}
_DTYPES = {"int": torch.int8, "float": torch.float8_e4m3fn}


def _store(xf: torch.Tensor, qtype: str) -> torch.Tensor:
    """Round/clamp `xf` (already divided by its scale; modified in place) into int8 or fp8."""
    qmax = QMAX[qtype]
    xf.clamp_(-qmax, qmax)
    if qtype == "int":
        xf.round_()
    return xf.to(_DTYPES[qtype])


def quantize_per_token(x: torch.Tensor, qtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize each row of a 2-D `x`; return (values [M, K] int8/fp8, scales [M, 1] float32).

    A few passes over x: max and min (on x's own dtype, exact), the widening to fp32, the division and the rounding
    cast. (A mixed-dtype division, bf16 by fp32, is 25x slower on CPU than the two steps.) No clamp is needed: with
    s = max|x| / qmax every |x / s| is at most qmax plus an fp32 rounding error, which rounds back to qmax.
    """
    qmax = QMAX[qtype]
    scale = torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg()).to(torch.float32)
    scale.div_(qmax)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    xf = x.to(torch.float32, copy=True).div_(scale)
    if qtype == "int":
        return xf.round_().to(torch.int8), scale
    return xf.to(torch.float8_e4m3fn), scale


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, qtype: str) -> torch.Tensor:
    """Quantize `x` with one static scale (a stored `input_scale`, float32 [1])."""
    xf = x.to(torch.float32, copy=True).div_(scale.to(torch.float32))
    return _store(xf, qtype)


def fake_quantize(x: torch.Tensor, qtype: str, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """x after a quantize/dequantize round trip, in x's dtype: what the scheme's activations amount to."""
    if input_scale is None:
        values, scale = quantize_per_token(x, qtype)
    else:
        values, scale = quantize_per_tensor(x, input_scale, qtype), input_scale.to(torch.float32)
    return (values.to(torch.float32) * scale).to(x.dtype)
