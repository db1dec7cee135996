"""`QuantLinear`: a drop-in for `torch.nn.Linear` that holds a qformat module's tensors as stored and runs kernels.

Parameters are named exactly like the checkpoint tensors (`weight` or `compressed`/`bitmask`/`shape`,
`weight_scale`, `input_scale`, `bias`), so transformers loads them by name, bit-exact, and `state_dict()` saves them
back unchanged. They keep their dtypes through `.to(dtype)`, `.half()` and the like (only the bias follows the
model's dtype); device moves apply to all of them. The kernel for the module's device is prepared once, at load
time or on the first call after a move, and then picks its path per call from the number of tokens.

Inference only: the kernels run without autograd, so no gradient flows through a `QuantLinear` (transformers is
told `is_trainable = False`).

LLM.int8()'s decomposition is a run-time option, not a tensor: `outlier_threshold` (the checkpoint's, or one given
at load time) wraps the int8 W8A8 op of a module whose scheme takes it (`qformat.spec.schemes.decomposes`); other
modules ignore it, so a caller can hand every module the checkpoint's threshold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from qformat.errors import OptionError
from qformat.kernels.fp8 import Fp8Linear
from qformat.kernels.int8_dynamic import Int8Dynamic
from qformat.kernels.int8_outlier import Int8Outlier
from qformat.kernels.int8_weight_only import Int8WeightOnly
from qformat.kernels.sparse24 import dense_from_2_4, semi_structured_int8
from qformat.quantize.dequant import dequantize_dense
from qformat.quantize.observers import SCALE_PROBLEM, fp8_has_nan, scales_valid
from qformat.quantize.sparse24 import BITMASK_NOT_2_4, bitmask_ok, bitmask_problem
from qformat.quantize.stored import sparse_shape, stored_tensors
from qformat.quantize.weights import VALUE_DTYPES, quantize_weight
from qformat.spec.layout import DENSE_SUFFIXES, SCALE_SUFFIXES, SPARSE_SUFFIXES
from qformat.spec.schemes import Scheme, decomposes

__all__ = ["QUANTIZED_TENSORS", "QuantLinear"]

#: Parameters that hold quantized data and never change dtype.
QUANTIZED_TENSORS = DENSE_SUFFIXES + SPARSE_SUFFIXES + SCALE_SUFFIXES
#: `_weight_int8pack_mm` crashes on weights that are not 16-byte aligned (measured, torch 2.13); safetensors data,
#: which transformers hands over without copying, is only 8-byte aligned.
_INT8PACK_ALIGNMENT = 16


def _frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class QuantLinear(nn.Module):
    """A Linear layer stored as a qformat scheme says (docs/FORMAT.md section 6)."""

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, *, bias: bool = True,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 scheme_name: str = "", outlier_threshold: float | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.scheme_name = scheme, scheme_name
        self.outlier_threshold: float | None = outlier_threshold if decomposes(scheme) else None
        value = VALUE_DTYPES[scheme.weights.type]
        if scheme.sparsity is None:
            self.weight = _frozen(torch.empty(out_features, in_features, dtype=value, device=device))
        else:
            self.compressed = _frozen(torch.empty(out_features, in_features // 2, dtype=value, device=device))
            self.bitmask = _frozen(torch.empty(out_features, -(-in_features // 8), dtype=torch.uint8, device=device))
            self.shape = _frozen(sparse_shape(out_features, in_features, device))
        self.weight_scale = _frozen(torch.empty(out_features, 1, dtype=torch.float32, device=device))
        if scheme.has_static_input_scale:
            self.input_scale = _frozen(torch.empty(1, dtype=torch.float32, device=device))
        else:
            self.register_parameter("input_scale", None)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._op: Any = None

    # -- construction from a float layer or from stored tensors ---------------------------------------------------
    @classmethod
    def from_float(cls, linear: nn.Linear, scheme: Scheme, *, observer: str = "absmax", scheme_name: str = "",
                   input_scale: float | None = None, outlier_threshold: float | None = None) -> QuantLinear:
        """Quantize `linear`'s weight with the converter's arithmetic (`input_scale` for static-activation schemes),
        on its device."""
        q = quantize_weight(linear.weight.detach(), scheme, observer=observer)
        stored = stored_tensors(q, linear.out_features, linear.in_features)
        if scheme.has_static_input_scale:
            if input_scale is None:
                raise OptionError("this scheme has static activation scales: pass input_scale")
            stored["input_scale"] = torch.tensor([input_scale], dtype=torch.float32, device=linear.weight.device)
        return cls.from_stored(stored, scheme, bias=linear.bias, scheme_name=scheme_name,
                               outlier_threshold=outlier_threshold)

    @classmethod
    def from_stored(cls, stored: dict[str, torch.Tensor], scheme: Scheme, *, bias: torch.Tensor | None,
                    scheme_name: str = "", outlier_threshold: float | None = None) -> QuantLinear:
        """A module holding `stored` (suffix -> tensor, as `qformat.quantize.stored.stored_tensors` builds them, on
        one device) without copying them; `bias` is kept in its own dtype."""
        scale = stored["weight_scale"]
        out_features = scale.shape[0]
        in_features = stored["weight"].shape[1] if "weight" in stored else int(stored["shape"].reshape(-1)[1])
        module = cls(in_features, out_features, scheme, bias=bias is not None, device="meta", scheme_name=scheme_name,
                     outlier_threshold=outlier_threshold)
        for name, tensor in stored.items():
            module._parameters[name] = _frozen(tensor)
        if bias is not None:
            module.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return module

    # -- what the stored tensors mean --------------------------------------------------------------------------
    def quantized_weight(self) -> torch.Tensor:
        """The dense quantized values [out, in] (int8 or fp8), decoding 2:4 storage if needed."""
        if self.scheme.sparsity is None:
            return self.weight
        return dense_from_2_4(self.compressed, self.bitmask, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full-precision weight the stored tensors stand for (docs/FORMAT.md section 8)."""
        return dequantize_dense(self.quantized_weight(), self.weight_scale, dtype)

    # -- what the format forbids in the stored values ------------------------------------------------------------
    def _value_checks(self) -> list[tuple[str, str, torch.Tensor]]:
        """(parameter, what is wrong if it fails, 0-dim bool tensor that is True when it passes), all computed on
        the module's device without reading anything back."""
        qtype = self.scheme.weights.type
        checks = [(name, SCALE_PROBLEM, scales_valid(param, qtype))
                  for name in ("weight_scale", "input_scale") if (param := self._parameters.get(name)) is not None]
        values_name = "weight" if self.scheme.sparsity is None else "compressed"
        values = self._parameters[values_name]
        if values.dtype == torch.float8_e4m3fn:
            checks.append((values_name, "holds NaN (e4m3fn bit pattern 0x7F/0xFF)", ~fp8_has_nan(values)))
        if self.scheme.sparsity is not None:
            dims = self.shape.reshape(-1)
            checks.append(("shape", f"must hold [[{self.out_features}], [{self.in_features}]], the module's size",
                           (dims[0] == self.out_features) & (dims[1] == self.in_features)))
            checks.append(("bitmask", BITMASK_NOT_2_4, bitmask_ok(self.bitmask, self.in_features)))
        return checks

    def stored_value_problem(self) -> tuple[str, str] | None:
        """The first stored tensor whose values the format forbids, as (parameter name, what is wrong), or None.

        Scales finite and positive, fp8 values free of NaN codes, a 2:4 module's `shape` equal to its size and its
        bitmask keeping exactly two of every four columns (docs/FORMAT.md sections 6-8). Vectorised on the module's
        device: O(out) for scales, O(out * in / 8) for a bitmask, two byte-wide max reductions for fp8 values, and
        one boolean read back per module. Parameters on the meta device (offloaded) are not checked.
        """
        if self.weight_scale.device.type == "meta":
            return None
        checks = self._value_checks()
        if bool(torch.stack([ok for _, _, ok in checks]).all()):
            return None
        name, problem = next((name, problem) for name, problem, ok in checks if not bool(ok))
        if name == "bitmask":
            problem = bitmask_problem(self.bitmask, self.in_features) or problem
        return name, problem

    # -- kernels ---------------------------------------------------------------------------------------------
    def _prepare(self) -> Any:
        """Settle the kernel for the module's current device (and capability) once."""
        scheme = self.scheme
        values = self.quantized_weight()
        act = scheme.input_activations
        static = self.input_scale if scheme.has_static_input_scale else None
        bias = self.bias.detach() if self.bias is not None else None
        if scheme.weights.type == "float":
            op = Fp8Linear(values, self.weight_scale, bias, dynamic=act is not None and act.dynamic,
                           input_scale=static)
        elif act is None:
            op = Int8WeightOnly(values, self.weight_scale, bias)
        else:
            sparse = semi_structured_int8(values) if scheme.sparsity is not None else None
            op = Int8Dynamic(values, self.weight_scale, bias, static, sparse=sparse)
            if self.outlier_threshold is not None:
                op = Int8Outlier(op, self.outlier_threshold)
        self._op = op
        return op

    def set_outlier_threshold(self, threshold: float | None) -> QuantLinear:
        """Run LLM.int8()'s decomposition at `threshold` from the next call (None: plain W8A8). A no-op for a
        scheme it does not apply to (`qformat.spec.schemes.decomposes`)."""
        if decomposes(self.scheme):
            self.outlier_threshold = None if threshold is None else float(threshold)
            self._op = None
        return self

    def prepare(self) -> QuantLinear:
        """Prepare the kernel now (transformers' loader calls this after loading the weights).

        A weight-only int8 weight that transformers handed over at an address `_weight_int8pack_mm` cannot take is
        copied once to allocator-aligned memory (the mapped original is then released).
        """
        for name in QUANTIZED_TENSORS:
            param = self._parameters.get(name)
            if param is not None:
                param.requires_grad_(False)
        weight = self._parameters.get("weight")
        weight_only_int8 = self.scheme.weights.type == "int" and self.scheme.input_activations is None
        if weight_only_int8 and weight is not None and weight.data_ptr() % _INT8PACK_ALIGNMENT:
            self._parameters["weight"] = _frozen(weight.data.clone(memory_format=torch.contiguous_format))
        self._prepare()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        op = self._op if self._op is not None else self.prepare()._op
        lead = x.shape[:-1]
        with torch.no_grad():  # inference kernels: no gradient flows through a quantized layer
            y = op(x.reshape(-1, x.shape[-1]))
        return y.reshape(*lead, self.out_features)

    # -- device moves keep dtypes ------------------------------------------------------------------------------
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        held = {name: self._parameters.pop(name) for name in QUANTIZED_TENSORS if self._parameters.get(name) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            if held:
                first = next(iter(held.values()))
                target = fn(torch.empty(0, device=first.device)).device  # where `fn` sends tensors
                for name, param in held.items():
                    data = param.data if param.device == target else param.data.to(target)
                    self._parameters[name] = _frozen(data)
            self._op = None  # prepared again for the new device on the next call
        return self

    def extra_repr(self) -> str:
        scheme = self.scheme_name or "qformat"
        threshold = f", outlier_threshold={self.outlier_threshold:g}" if self.outlier_threshold is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={scheme}{threshold}")
