"""QuantLinear: parameter names and dtypes as stored, dtype-safe moves, 2:4 decoding, no full-precision copy."""

from __future__ import annotations

import pytest
import torch

from qformat.nn import QuantLinear
from qformat.spec import module_tensors, resolve_scheme_name
from qformat.testing import spec_error_bound

SCHEMES = ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only", "w8a8-int8+2:4", "fp8-weight-only+2:4"]


def _linear(k: int = 128, n: int = 64, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(k, n).to(dtype)


@pytest.mark.parametrize("name", SCHEMES)
def test_parameters_are_the_checkpoint_tensors(name):
    _, scheme = resolve_scheme_name(name)
    q = QuantLinear.from_float(_linear(), scheme)
    expected = {t.name.split(".", 1)[1]: (t.dtype, t.shape) for t in module_tensors("m", scheme, 64, 128)}
    codes = {torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.uint8: "U8",
             torch.int64: "I64"}
    state = q.state_dict()
    assert set(state) == set(expected) | {"bias"}
    for key, (dtype, shape) in expected.items():
        assert (codes[state[key].dtype], tuple(state[key].shape)) == (dtype, shape), key
    assert all(not p.requires_grad for p in q.parameters())


@pytest.mark.parametrize("name", SCHEMES)
def test_dtype_conversions_keep_quantized_tensors(name):
    _, scheme = resolve_scheme_name(name)
    q = QuantLinear.from_float(_linear(), scheme)
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    x = torch.randn(3, 128)
    q(x)
    assert q._op is not None
    for convert in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float(), lambda m: m.to("cpu")):
        convert(q)
        assert q._op is None  # the kernel is prepared again for the new placement
        for key, value in before.items():
            now = q.state_dict()[key]
            assert now.dtype == value.dtype and torch.equal(now.view(torch.uint8), value.view(torch.uint8)), key
    q.to(torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
    assert q(x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", SCHEMES)
def test_dequantized_weight_within_spec_bound(name):
    _, scheme = resolve_scheme_name(name)
    lin = _linear()
    q = QuantLinear.from_float(lin, scheme)
    w = lin.weight.detach()
    w_hat = q.dequantized_weight()
    if scheme.sparsity:
        kept = w_hat != 0
        w = torch.where(kept, w, torch.zeros_like(w))
    excess = ((w.double() - w_hat.double()).abs() - spec_error_bound(w, q.weight_scale, scheme.weights.type)).max()
    assert excess <= 0


def test_2_4_module_computes_like_its_dense_twin():
    _, sparse = resolve_scheme_name("w8a8-int8+2:4")
    _, dense = resolve_scheme_name("w8a8-int8")
    q = QuantLinear.from_float(_linear(), sparse)
    twin = QuantLinear(128, 64, dense, bias=True)
    with torch.no_grad():
        twin.weight.copy_(q.quantized_weight())
        twin.weight_scale.copy_(q.weight_scale)
        twin.bias.copy_(q.bias)
    x = torch.randn(5, 128)
    assert torch.equal(q(x), twin(x))
    assert (q.quantized_weight() != 0).sum() <= 64 * 64  # 2 of every 4 kept


@pytest.mark.parametrize("name", ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only"])
def test_no_full_precision_copy_of_the_weight(name):
    _, scheme = resolve_scheme_name(name)
    q = QuantLinear.from_float(_linear(256, 128), scheme).to(torch.bfloat16)
    q(torch.randn(2, 256, dtype=torch.bfloat16))
    held = list(q.state_dict().values()) + [v for v in vars(q._op).values() if isinstance(v, torch.Tensor)]
    for cache in getattr(q._op, "_pack_scales", {}).values():
        held.append(cache)
    big_float = [t for t in held if t.is_floating_point() and t.element_size() > 1 and t.numel() >= 128 * 256]
    assert big_float == []


def test_static_activation_scale_is_required_and_used():
    scheme = resolve_scheme_name("w8a8-int8")[1]
    from qformat.spec.schemes import QuantArgs, Scheme

    static = Scheme(weights=scheme.weights, input_activations=QuantArgs(type="int", strategy="tensor"))
    with pytest.raises(ValueError, match="input_scale"):
        QuantLinear.from_float(_linear(), static)
    q = QuantLinear.from_float(_linear(), static, input_scale=0.05)
    assert "input_scale" in q.state_dict() and float(q.input_scale) == pytest.approx(0.05)
    x = torch.randn(4, 128)
    from qformat.kernels import int8_dynamic_reference

    want = int8_dynamic_reference(x, q.weight, q.weight_scale, q.bias, input_scale=q.input_scale)
    assert torch.allclose(q(x), want, rtol=1e-6, atol=1e-6)
