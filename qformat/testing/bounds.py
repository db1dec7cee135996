"""The format's per-element error bounds (docs/FORMAT.md section 8), written from the spec for tests to check against.

Deliberately independent of `qformat.quantize`: it computes the bound from the source weight and the stored scale
in float64, so a bug in the quantizer cannot hide in a shared helper.
"""

from __future__ import annotations

import torch

__all__ = ["FP32_SLACK", "spec_error_bound"]

#: The spec's allowance for fp32 rounding of w / s and q * s, relative to |w|.
FP32_SLACK = 2.0**-22


def spec_error_bound(w: torch.Tensor, scale: torch.Tensor, qtype: str) -> torch.Tensor:
    """Largest |w - w_hat| the spec allows for each element of `w` ([out, in]) with per-row `scale` ([out] or
    [out, 1]) and value type `qtype` ("int" for int8, "float" for fp8 e4m3)."""
    w = w.double()
    s = scale.double().reshape(-1, 1)
    x = (w / s).abs()
    if qtype == "int":
        bound = torch.where(x <= 127.5, s / 2, w.abs() - 127 * s)
    else:
        exponent = torch.floor(torch.log2(x.clamp_min(2.0**-6)))
        bound = torch.where(x >= 2.0**-6, s * torch.pow(2.0, exponent - 4), s * 2.0**-10)
        bound = torch.where(x > 448, w.abs() - 448 * s, bound)
    return bound + FP32_SLACK * w.abs()
