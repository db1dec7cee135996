"""W8A8 int8 linear (`w8a8-int8`): per-token int8 activations (dynamic) or one static scale, int8 weights,
int32 accumulation: y = (x_q @ q^T) * s_x * s_w^T + b.

Paths:
- `reference`: the quantized operands multiplied in float64 (exact, like the int32 accumulation), then rescaled.
- `cpu_int_mm_wx` / `cpu_int_mm_xw`: `torch._int_mm(q, x_q^T)`, the weight as the left operand in its stored
  [N, K] layout, below `CPU_WEIGHT_LEFT_MAX_TOKENS`; `torch._int_mm(x_q, q^T)` from there on. On this CPU (oneDNN, VNNI) the first
  orientation is fast at every M (10x bf16 at M=1; the second is 10x slower for 2 <= M <= 16), the second is
  5 % faster from a few hundred tokens on (it also writes the output row-major). Neither needs a second copy of
  the weight.
- `cpu_exact_float`: where the CPU has no int8 dot-product instructions (no AVX-512 VNNI / AVX-VNNI / AMX, e.g.
  an AVX2-only AMD EPYC), `torch._int_mm` falls back to a scalar loop: 25-100x slower than an fp32 GEMM (measured:
  2.0 s for 512 x 576 x 1536, fp32 17 ms). There the same integers are multiplied in float32 in K-chunks of at most
  1024: every partial sum is an integer below 1024 * 127^2 < 2^24, so float32 holds it exactly, and the chunks are
  summed in int32. The result is bit-identical to `_int_mm`'s (tested), so which path runs never changes a number.
- `cuda_int_mm`: `torch._int_mm(x_q, q^T)` (cuBLASLt wants the weight column-major, which its [N, K] storage is);
  CUDA needs M > 16, so fewer rows are zero-padded to 32.
- `cuda_semi_structured`: a 2:4 weight as a semi-structured sparse tensor (see kernels/sparse24.py).
Per-token quantization costs a few passes over x (M x K), small against the GEMM's M x N x K.
"""

from __future__ import annotations

import torch

from qformat.kernels._trace import record_path
from qformat.kernels.activations import per_tensor_scales, quantize_per_tensor, quantize_per_token

__all__ = ["CPU_NATIVE_INT_MM", "CPU_WEIGHT_LEFT_MAX_TOKENS", "EXACT_FLOAT_CHUNK", "Int8Dynamic", "cpu_path",
           "exact_float_mm", "int8_dynamic_reference"]

_OP = "int8_w8a8"
_CUDA_MIN_ROWS = 17
#: From this many tokens on, the CPU multiplies x_q @ q^T instead of q @ x_q^T (measured, see the module docstring).
CPU_WEIGHT_LEFT_MAX_TOKENS = 256
#: Largest K chunk whose int8 x int8 dot products sum exactly in float32 (1024 * 127 * 127 < 2**24).
EXACT_FLOAT_CHUNK = 1024


def _native_int_mm() -> bool:
    """Whether this CPU runs `torch._int_mm` on int8 dot-product instructions (VNNI or AMX); where torch cannot
    tell, assume it does (the path `_int_mm` always had)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return probe is None or bool(probe()) or (amx is not None and bool(amx()))
    except RuntimeError:
        return True


#: Settled once per process (the module docstring says why); tests switch it to cover both paths.
CPU_NATIVE_INT_MM = _native_int_mm()


def cpu_path(tokens: int) -> str:
    """The CPU path W8A8 takes for `tokens` rows on this machine (see the module docstring)."""
    if not CPU_NATIVE_INT_MM:
        return "cpu_exact_float"
    return "cpu_int_mm_wx" if tokens < CPU_WEIGHT_LEFT_MAX_TOKENS else "cpu_int_mm_xw"


def exact_float_mm(xq: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_q @ q^T as int32, computed with float32 GEMMs in K-chunks where every sum is exact (module docstring)."""
    acc = None
    for start in range(0, xq.shape[1], EXACT_FLOAT_CHUNK):
        part = torch.mm(xq[:, start:start + EXACT_FLOAT_CHUNK].to(torch.float32),
                        weight[:, start:start + EXACT_FLOAT_CHUNK].to(torch.float32).t()).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    assert acc is not None
    return acc


def _quantize(x: torch.Tensor, input_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if input_scale is None:
        return quantize_per_token(x, "int")
    return quantize_per_tensor(x, input_scale, "int"), per_tensor_scales(x, input_scale)


def _finish(acc: torch.Tensor, x_scale: torch.Tensor, w_scale_row: torch.Tensor, bias: torch.Tensor | None,
            dtype: torch.dtype) -> torch.Tensor:
    y = acc.to(torch.float32, memory_format=torch.contiguous_format).mul_(x_scale).mul_(w_scale_row)
    if bias is not None:
        y.add_(bias.to(torch.float32))
    return y.to(dtype)


def int8_dynamic_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                           input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Reference of the scheme: quantize x as the scheme says, multiply the integers exactly, rescale in fp32."""
    xq, sx = _quantize(x, input_scale)
    acc = xq.to(torch.float64) @ weight.to(torch.float64).t()
    return _finish(acc, sx, scale.to(torch.float32).reshape(1, -1), bias, x.dtype)


class Int8Dynamic:
    """The op for one module, prepared for its device."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None = None, *, sparse=None) -> None:
        self.weight, self.bias, self.input_scale = weight, bias, input_scale
        self.scale_row = scale.to(torch.float32).reshape(1, -1)
        self.device_type = weight.device.type
        self.sparse = sparse  # a validated semi-structured copy of a 2:4 weight (CUDA), or None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.float_output(x).to(x.dtype)

    def float_output(self, x: torch.Tensor) -> torch.Tensor:
        """y in float32 (bias included), before the cast to x's dtype: what LLM.int8()'s decomposition adds its
        float part to (kernels/int8_outlier.py), so the sum is rounded once."""
        xq, sx = _quantize(x, self.input_scale)
        if self.sparse is not None:
            record_path(_OP, "cuda_semi_structured")
            acc = torch.mm(self.sparse, xq.t().contiguous()).t()
        elif self.device_type == "cuda":
            record_path(_OP, "cuda_int_mm")
            rows = xq.shape[0]
            if rows < _CUDA_MIN_ROWS:
                xq = torch.nn.functional.pad(xq, (0, 0, 0, 32 - rows))
            acc = torch._int_mm(xq, self.weight.t())[:rows]
        else:
            path = cpu_path(xq.shape[0])
            record_path(_OP, path)
            if path == "cpu_exact_float":
                acc = exact_float_mm(xq, self.weight)
            elif path == "cpu_int_mm_wx":
                acc = torch._int_mm(self.weight, xq.t()).t()
            else:
                acc = torch._int_mm(xq, self.weight.t())
        return _finish(acc, sx, self.scale_row, self.bias, torch.float32)
