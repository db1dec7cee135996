"""Quantize one Linear weight [out, in] to a scheme's stored tensors, block of rows by block of rows.

Rows are independent (one scale per output channel), so the weight is processed in blocks of whole rows small enough
to stay in cache; only the fp32 work buffers of one block and the output (1 byte per element) are ever allocated,
never an fp32 copy of the whole weight. The source may be any float dtype and may be a read-only memory map.

Everything is allocated on the weight's device, so a CUDA weight is quantized on the GPU with the same fp32 arithmetic
and rounding as on the CPU. Per block, one small readback (two flags) decides the NaN refusal and the float64 norms;
the error statistics are summed on the device and read back once at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qformat.errors import NonFiniteWeightError
from qformat.io.dtypes import TORCH_DTYPES
from qformat.quantize.observers import DEFAULT_MSE, MseParams, absmax_scales, mse_scales, quantize_block_
from qformat.quantize.sparse24 import select_2_4
from qformat.spec import layout
from qformat.spec.schemes import Scheme

__all__ = ["BLOCK_ELEMENTS", "VALUE_DTYPES", "QuantizedWeight", "quantize_weight"]

#: Target number of elements per row block. Smaller blocks fit caches better but pay torch's per-op overhead more
#: often; 1M elements measured fastest on the 2-core CI machine (docs/benchmarks.md).
BLOCK_ELEMENTS = 1 << 20

#: The torch dtype of stored values per quantization type (`spec.layout.VALUE_DTYPES`: int8, float8_e4m3fn).
VALUE_DTYPES: dict[str, torch.dtype] = {qtype: TORCH_DTYPES[code] for qtype, code in layout.VALUE_DTYPES.items()}


@dataclass
class QuantizedWeight:
    """The stored tensors of one quantized weight plus its error statistics.

    `values` is [out, in] (dense) or [out, in/2] (2:4), int8 or float8_e4m3fn; `scales` is float32 [out, 1];
    `bitmask` is uint8 [out, ceil(in/8)] for 2:4 and None otherwise. `sq_norm` is ||w||^2 of the source weight,
    `sq_error` is ||w - w_hat||^2 of the stored result against it (pruning included), `sq_quant_error` the
    quantization part alone and `sq_kept` the ||.||^2 of the kept values (both equal to the dense figures for
    dense weights).
    """

    values: torch.Tensor
    scales: torch.Tensor
    bitmask: torch.Tensor | None
    sq_norm: float
    sq_error: float
    sq_quant_error: float

    @property
    def rel_error(self) -> float:
        """Relative Frobenius error ||w - w_hat|| / ||w|| (0 for an all-zero weight)."""
        return math.sqrt(self.sq_error / self.sq_norm) if self.sq_norm > 0 else 0.0

    sq_kept: float = 0.0

    @property
    def rel_quant_error(self) -> float:
        return math.sqrt(self.sq_quant_error / self.sq_kept) if self.sq_kept > 0 else 0.0


def _row_absmax(w32: torch.Tensor, name: str, row0: int) -> tuple[torch.Tensor, bool]:
    """Per-row max |w| of the block, and whether some row's magnitudes are extreme (see the caller); one readback.

    Raises `NonFiniteWeightError` naming the first row that holds NaN or Inf.
    """
    # amax and amin separately: torch.aminmax is ~10x slower on CPU (torch 2.13). Both propagate NaN.
    absmax = torch.maximum(w32.amax(dim=1), w32.amin(dim=1).neg_())
    finite = torch.isfinite(absmax)
    # squares of fp32 values outside ~[1e-19, 1e19] under/overflow: such blocks get their norms in float64
    extreme = ((absmax > 0) & (absmax < 1e-15)).any() | (absmax > 1e15).any()
    all_finite, is_extreme = torch.stack((finite.all(), extreme)).tolist()
    if not all_finite:
        row = row0 + int((~finite).nonzero()[0, 0])
        raise NonFiniteWeightError(
            f"{name} holds NaN or Inf (first in row {row}); fix the source weights or keep the module in full "
            f"precision with --ignore {name.removesuffix('.weight')}"
        )
    return absmax, is_extreme


def _sq_norm(x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """||x||^2 over all rows of `x` as a 0-dim float64 tensor on `x`'s device: row norms in `dtype` (fp32 if None),
    squared and summed in float64."""
    return torch.linalg.vector_norm(x, dim=1, dtype=dtype).double().square_().sum()


def quantize_weight(w: torch.Tensor, scheme: Scheme, *, observer: str = "absmax", name: str = "weight",
                    mse: MseParams = DEFAULT_MSE) -> QuantizedWeight:
    """Quantize `w` ([out, in], any float dtype) as `scheme` says, computing scales with `observer`.

    Dense: per-row scale from the row (absmax / qmax, or the MSE search), values = round(w / s) in fp32.
    2:4: prune each group of 4 to its 2 largest magnitudes first, then compute scales from the kept values.
    The stored tensors are on `w`'s device; `w` must hold real data (not the meta device), since its values are
    checked and its statistics read back. Raises `NonFiniteWeightError` if `w` contains NaN or Inf.
    """
    out_f, in_f = w.shape
    device = w.device
    qtype = scheme.weights.type
    sparse = scheme.sparsity is not None
    stored_in = in_f // 2 if sparse else in_f
    values = torch.empty(out_f, stored_in, dtype=VALUE_DTYPES[qtype], device=device)
    scales = torch.empty(out_f, 1, dtype=torch.float32, device=device)
    bitmask = torch.empty(out_f, -(-in_f // 8), dtype=torch.uint8, device=device) if sparse else None
    rows_per_block = max(1, BLOCK_ELEMENTS // max(in_f, 1))
    block = torch.empty(min(rows_per_block, out_f), in_f, dtype=torch.float32, device=device)
    scratch = torch.empty(min(rows_per_block, out_f), stored_in, dtype=torch.float32, device=device)
    # running sums (float64, on the device): ||w||^2, ||kept||^2, quantization error, total error
    totals = torch.zeros(4, dtype=torch.float64, device=device)
    for r0 in range(0, out_f, rows_per_block):
        r1 = min(out_f, r0 + rows_per_block)
        w32 = block[: r1 - r0]
        w32.copy_(w[r0:r1])
        absmax, extreme = _row_absmax(w32, name, r0)
        norm_dtype = torch.float64 if extreme else None
        norm_sq = _sq_norm(w32, norm_dtype)
        if sparse:
            w32, bitmask[r0:r1], dropped = select_2_4(w32)
            pruned_sq = _sq_norm(dropped, norm_dtype)
            kept_sq = _sq_norm(w32, norm_dtype)
            # absmax is unchanged: a row's largest magnitude is the largest of its group, so it is always kept.
        else:
            pruned_sq = None
            kept_sq = norm_sq
        if observer == "mse":
            s = mse_scales(w32, absmax, qtype, mse)
        else:
            s = absmax_scales(absmax, qtype)
        scales[r0:r1, 0] = s
        quantize_block_(w32, s, qtype, values[r0:r1], scratch[: r1 - r0], clip=observer == "mse")
        # the residual is in units of the scale (|w/s - q| <= ~0.5): safe in fp32, rescaled in float64
        q_sq = torch.linalg.vector_norm(w32, dim=1).double().mul_(s.double()).square_().sum()
        err_sq = q_sq if pruned_sq is None else q_sq + pruned_sq
        totals += torch.stack((norm_sq, kept_sq, q_sq, err_sq))
    sq_norm, sq_kept, sq_quant, sq_err = totals.tolist()
    return QuantizedWeight(values, scales, bitmask, sq_norm, sq_err, sq_quant, sq_kept)
