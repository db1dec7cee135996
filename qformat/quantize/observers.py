"""Per-output-channel scale observers: absmax, and the MSE shrink search of the Neural Magic FP8 recipe.

Both work on one block of whole rows at a time (fp32, [rows, in]) and return one float32 scale per row. A scale is
always finite and positive: a row of zeros (or one whose absmax underflows when divided) gets scale 1.0, which
quantizes it to zeros exactly, and a scale is never below the smallest normal fp32 number (`MIN_SCALE`): a
subnormal scale is rounded so coarsely that w / s could exceed qmax (int8 would wrap around), while with a normal
scale |w / s| <= qmax up to fp32 rounding, so every stored value is in range and FORMAT.md section 8's bound holds
for every finite weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "DEFAULT_MSE",
    "MAX_SCALE",
    "MIN_SCALE",
    "OBSERVERS",
    "QMAX",
    "SCALE_PROBLEM",
    "MseParams",
    "absmax_scales",
    "fp8_has_nan",
    "fp8_to_float",
    "fp8_to_float32",
    "mse_scales",
    "quantize_block_",
    "scales_valid",
]

#: Largest stored magnitude per value type: qformat writes int8 in [-127, 127] (symmetric, so -x is representable)
#: and e4m3fn values up to its largest finite number, 448.
QMAX = {"int": 127.0, "float": 448.0}

OBSERVERS = ("absmax", "mse")

#: The largest scale a reader accepts per value type: q * s must be finite in fp32 for every storable q (int8 down
#: to -128, fp8 up to 448), or a finite-looking checkpoint dequantizes to Inf.
MAX_SCALE = {"int": torch.finfo(torch.float32).max / 128, "float": torch.finfo(torch.float32).max / 448}
#: What `scales_valid` refuses, in the words verify and the loader use.
SCALE_PROBLEM = "scales must be finite and positive, and small enough that every dequantized value is finite"

#: The smallest scale the observers give a nonzero row: the smallest normal fp32 number, 2^-126.
MIN_SCALE = torch.finfo(torch.float32).tiny


@dataclass(frozen=True)
class MseParams:
    """The MSE observer's search, with llm-compressor's defaults (anchors.md §1): try shrink factors
    1, 1 - 1/grid, ..., down to 1 - maxshrink (exclusive); error is sum |w - w_hat|^norm per row; stop once no row
    improved for `patience` consecutive factors."""

    maxshrink: float = 0.20
    grid: int = 100
    norm: float = 2.4
    patience: int = 5


DEFAULT_MSE = MseParams()


# e4m3fn -> float through a 256-entry table per target dtype: `index_select` is 2.5x faster than the cast to fp32
# and 1.6x faster than the cast to bf16 on CPU (torch 2.13, cpu-kernels.md); advanced indexing is no faster than
# the cast.
_FP8_CODES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
_FP8_TABLES: dict[torch.dtype, torch.Tensor] = {torch.float32: _FP8_CODES.to(torch.float32)}


def fp8_to_float(values: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The e4m3fn elements of `values` as `dtype` (same shape), written into `out` when it is given.

    The table is a CPU speed-up only; on other devices the cast, whose values the table holds, stays on the device.
    """
    if values.device.type != "cpu":
        return values.to(dtype) if out is None else out.copy_(values)
    table = _FP8_TABLES.get(dtype)
    if table is None:
        table = _FP8_TABLES[dtype] = _FP8_CODES.to(dtype)
    index = values.reshape(-1).view(torch.uint8).to(torch.int32)
    if out is None:
        return torch.index_select(table, 0, index).view(values.shape)
    torch.index_select(table, 0, index, out=out.view(-1))
    return out


def fp8_to_float32(values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write the fp32 value of every e4m3fn element of `values` into `out` (same shape) and return `out`."""
    return fp8_to_float(values, torch.float32, out)


def _positive(scales: torch.Tensor) -> torch.Tensor:
    """The zero rule (a scale that is not > 0 becomes 1.0) and the floor at `MIN_SCALE` for the others."""
    return torch.where(scales > 0, scales.clamp_min(MIN_SCALE), torch.ones_like(scales))


def scales_valid(scales: torch.Tensor, qtype: str) -> torch.Tensor:
    """0-dim bool tensor on `scales`' device: every scale is > 0 and at most `MAX_SCALE[qtype]`, so that it is finite
    and so is every value it dequantizes (what the format allows; NaN fails)."""
    return ((scales > 0) & (scales <= MAX_SCALE[qtype])).all()


def fp8_has_nan(values: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: some e4m3fn element of `values` is NaN (bit pattern 0x7F or 0xFF).

    Two max reductions over the bytes and no temporary of the tensor's size: 0x7F is the largest int8 and 0xFF the
    largest uint8, and every other code is smaller in both readings. On CPU through numpy, whose byte max is SIMD
    code over 20x faster than torch's amax (torch 2.13); elsewhere in torch, read back only as the one boolean.
    """
    raw = values.reshape(-1).view(torch.uint8)
    if raw.numel() == 0:
        return torch.zeros((), dtype=torch.bool, device=values.device)
    if raw.device.type == "cpu":
        data = raw.numpy()
        return torch.tensor(bool(data.max() == 0xFF or data.view(np.int8).max() == 0x7F))
    return (raw.amax() == 0xFF) | (raw.view(torch.int8).amax() == 0x7F)


def absmax_scales(absmax: torch.Tensor, qtype: str) -> torch.Tensor:
    """scale = absmax / qmax per row (fp32), with the zero-row rule applied."""
    return _positive(absmax.float() / QMAX[qtype])


def quantize_block_(w32: torch.Tensor, scales: torch.Tensor, qtype: str, out: torch.Tensor, scratch: torch.Tensor,
                    *, clip: bool) -> None:
    """Quantize `w32` row-wise into `out` (int8 or float8_e4m3fn) and leave the residual `w/s - q` in `w32`.

    All arithmetic is fp32: r = w / s, then round-half-to-even to an integer in [-127, 127] (int) or a cast to e4m3fn
    (round to nearest even, saturating at +-448). `clip` clamps r to the representable range first, which only
    changes anything when a scale is smaller than absmax / qmax (the MSE observer). `scratch` is a work buffer of
    `w32`'s shape.
    """
    qmax = QMAX[qtype]
    w32.div_(scales[:, None])
    source = w32
    if clip:  # clamp a copy: the residual must include the clipping error
        torch.clamp(w32, -qmax, qmax, out=scratch)
        source = scratch
    if qtype == "int":
        torch.round(source, out=scratch)
        out.copy_(scratch)
    else:
        out.copy_(source)
        fp8_to_float32(out, scratch)
    w32.sub_(scratch)


def mse_scales(w32: torch.Tensor, absmax: torch.Tensor, qtype: str, params: MseParams = DEFAULT_MSE) -> torch.Tensor:
    """Pick, per row, the shrunk absmax scale that minimizes sum |w - dequant(quant(w))|^norm.

    `w32` is not modified. The search evaluates candidate factors p = 1 - i/grid for i = 0, 1, ... while
    i < maxshrink * grid, and stops early once `patience` consecutive factors improved no row.
    """
    qmax = QMAX[qtype]
    best_scale = absmax_scales(absmax, qtype)
    best_err = torch.full(best_scale.shape, float("inf"), dtype=torch.float64, device=w32.device)
    r = torch.empty_like(w32)
    q = torch.empty_like(w32)
    fp8 = torch.empty(w32.shape, dtype=torch.float8_e4m3fn, device=w32.device) if qtype == "float" else None
    stale = 0
    for i in range(round(params.maxshrink * params.grid)):
        scale = _positive(absmax.float() * (1.0 - i / params.grid) / qmax)
        torch.div(w32, scale[:, None], out=r)  # r = w / s
        torch.clamp(r, -qmax, qmax, out=q)
        if fp8 is None:
            q.round_()
        else:
            fp8.copy_(q)
            fp8_to_float32(fp8, q)
        # |w - s*q| = s * |r - q|: sum |r - q|^norm per row, then rescale by s^norm.
        # |d|^norm as exp2(norm * log2|d|): 1.5x faster than torch.pow on CPU, equal to ~1e-7 relative.
        r.sub_(q).abs_().log2_().mul_(params.norm).exp2_()
        err = r.sum(dim=1).double() * scale.double().pow(params.norm)  # float64: s^2.4 underflows in fp32
        improved = err < best_err
        if bool(improved.any()):
            best_err = torch.where(improved, err, best_err)
            best_scale = torch.where(improved, scale, best_scale)
            stale = 0
        else:
            stale += 1
            if stale >= params.patience:
                break
    return best_scale
