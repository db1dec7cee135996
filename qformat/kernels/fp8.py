"""fp8 (e4m3) linear: `fp8-dynamic` (per-token fp8 activations) and `fp8-weight-only`.

Paths:
- `reference`: fp32 math on the dequantized weight and (for fp8-dynamic) fake-quantized activations.
- `cuda_scaled_mm`: CUDA compute capability >= 8.9 with dynamic activations: `torch._scaled_mm` with row-wise scales
  (per-token for x, per-channel for the weight), bf16 output.
- `upcast`: every other device (CPU, older GPUs) and the weight-only scheme: the weight stays fp8 in memory and is
  upcast per call, a block of rows at a time (transient), activations fake-quantized exactly as the scheme says.
  This is a documented fallback, logged once per process: no fp8 matmul exists on those devices.
"""

from __future__ import annotations

import logging

import torch

from qformat.kernels._trace import record_path
from qformat.kernels.activations import fake_quantize, quantize_per_token
from qformat.kernels.int8_weight_only import dequant_tiled_linear
from qformat.quantize.dequant import dequantize_dense
from qformat.quantize.observers import fp8_to_float

__all__ = ["Fp8Linear", "fp8_reference", "scaled_mm_supported"]

logger = logging.getLogger(__name__)
_OP = "fp8"
_warned: set[str] = set()

def scaled_mm_supported(device: torch.device) -> bool:
    """True where `torch._scaled_mm` runs fp8 x fp8 natively: CUDA compute capability 8.9 or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                  dynamic: bool, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 reference: (fake-quantized x) @ (q * s)^T + b, in x's dtype."""
    if dynamic or input_scale is not None:
        x = fake_quantize(x, "float", input_scale)
    w = dequantize_dense(weight, scale)
    y = x.to(torch.float32) @ w.t()
    if bias is not None:
        y = y + bias.to(torch.float32)
    return y.to(x.dtype)


class Fp8Linear:
    """The op for one module, prepared for its device."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, *, dynamic: bool,
                 input_scale: torch.Tensor | None = None) -> None:
        self.weight, self.scale, self.bias = weight, scale, bias
        self.dynamic, self.input_scale = dynamic, input_scale
        self.native = dynamic and input_scale is None and scaled_mm_supported(weight.device)
        if self.native:
            self.scale_row = scale.to(torch.float32).reshape(1, -1)
        elif weight.device.type not in _warned:
            _warned.add(weight.device.type)
            logger.warning("qformat: no fp8 matmul on %s; fp8 weights stay fp8 in memory and are upcast per call",
                        weight.device.type)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.native:
            record_path(_OP, "cuda_scaled_mm")
            xq, sx = quantize_per_token(x, "float")
            rows = xq.shape[0]
            pad = -rows % 16
            if pad:
                xq = torch.nn.functional.pad(xq.view(torch.uint8), (0, 0, 0, pad)).view(torch.float8_e4m3fn)
                sx = torch.nn.functional.pad(sx, (0, 0, 0, pad), value=1.0)
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=sx, scale_b=self.scale_row, out_dtype=torch.bfloat16)
            y = y[:rows].to(x.dtype)
            if self.bias is not None:
                y.add_(self.bias.to(x.dtype))
            return y
        record_path(_OP, "upcast")
        if self.dynamic or self.input_scale is not None:
            x = fake_quantize(x, "float", self.input_scale)
        return dequant_tiled_linear(x, self.weight, self.scale, self.bias, to_float=fp8_to_float)
