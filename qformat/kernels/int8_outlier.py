"""LLM.int8()'s decomposition (Dettmers et al. 2022) around the W8A8 int8 op, for a checkpoint's
`outlier_threshold` or one given at load time (docs/FORMAT.md section 8.4).

For an input X [M, K] and threshold t, the outlier columns are O = {j : max_t |X[t, j]| >= t} (a NaN never is one).
The int8 op runs on X with the columns O set to zero (per-token scales then come from the other columns only), and
the columns O are multiplied in float32 against the same columns of the stored weight, dequantized: W_O = q[:, O] * s
(docs/FORMAT.md section 8). The two float32 results are summed, with the bias, and rounded to x's dtype once:

    y = dtype( (int8 part of X with O zeroed, bias included) + X[:, O] @ W_O^T )

No second copy of the weight is kept: only the |O| columns are gathered and dequantized per call, as bitsandbytes
does (it uses the activation dtype for that product, float16; float32 here is at least as precise). bitsandbytes
also differs in one detail: it takes each token's scale over the non-outlier *elements*, so small values in an
outlier column still count towards the scale (then are dropped); here they do not, which never gives a coarser scale.

Paths (`trace_paths()`): "none" when no column reaches the threshold (the int8 op alone, one reduction and one
host read more than plain W8A8); "cpu" / "cuda" when there are outlier columns, followed by the int8 op's own path.
"""

from __future__ import annotations

import torch

from qformat.kernels._trace import record_path
from qformat.kernels.activations import quantize_per_token
from qformat.kernels.int8_dynamic import Int8Dynamic

__all__ = ["Int8Outlier", "int8_outlier_reference", "outlier_columns"]

_OP = "int8_outlier"


def outlier_columns(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """[K] bool: the columns of a 2-D `x` where some token has |x| >= `threshold` (amax and amin on x's own dtype,
    exact, with no |x| temporary; NaN compares false). The comparison is made in float64, where both sides are
    exact: compared in bfloat16, a threshold of 6.01 would round to 6 and take 6 as an outlier."""
    peak = torch.maximum(x.amax(dim=0), x.amin(dim=0).neg())
    return peak.to(torch.float64) >= threshold


def int8_outlier_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           threshold: float) -> torch.Tensor:
    """The decomposition as the module docstring defines it, every product and sum in float64 (the kernel's float32
    differs by its rounding only)."""
    mask = outlier_columns(x, threshold)
    columns = mask.nonzero().reshape(-1)
    xq, sx = quantize_per_token(x.masked_fill(mask.reshape(1, -1), 0), "int")
    s = scale.to(torch.float32).reshape(-1, 1).to(torch.float64)
    y = (xq.to(torch.float64) @ weight.to(torch.float64).t()) * sx.to(torch.float64) * s.t()
    y = y + x.index_select(1, columns).to(torch.float64) @ (weight.index_select(1, columns).to(torch.float64) * s).t()
    if bias is not None:
        y = y + bias.to(torch.float64)
    return y.to(x.dtype)


class Int8Outlier:
    """The decomposition around one module's prepared `Int8Dynamic` op (dense or 2:4; dynamic per-token only)."""

    def __init__(self, inner: Int8Dynamic, threshold: float) -> None:
        if inner.input_scale is not None:
            raise ValueError("LLM.int8() decomposition is defined for dynamic per-token activations only")
        self.inner, self.threshold = inner, float(threshold)
        self.scale = inner.scale_row.reshape(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mask = outlier_columns(x, self.threshold)
        columns = mask.nonzero().reshape(-1)  # one host read, as bitsandbytes' argwhere
        if columns.numel() == 0:
            record_path(_OP, "none")
            return self.inner(x)
        record_path(_OP, x.device.type)
        y = self.inner.float_output(x.masked_fill(mask.reshape(1, -1), 0))
        w = self.inner.weight.index_select(1, columns).to(torch.float32).mul_(self.scale.reshape(-1, 1))
        y.addmm_(x.index_select(1, columns).to(torch.float32), w.t())
        return y.to(x.dtype)
