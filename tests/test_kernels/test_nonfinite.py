"""Numerics at the edges (issue 9): a token holding NaN or Inf gives a non-finite output row on every kernel path and
token-count threshold, as nn.Linear does, with the other tokens' outputs unchanged; scales in the subnormal range
never let stored values wrap around or leave FORMAT.md section 8's error bound."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from qformat.kernels.int8_dynamic import cpu_path
from qformat.kernels import (
    CPU_WEIGHT_LEFT_MAX_TOKENS,
    INT8PACK_MAX_TOKENS,
    SPLIT_MAX_TOKENS,
    Fp8Linear,
    Int8Dynamic,
    Int8WeightOnly,
    fake_quantize,
    fp8_reference,
    int8_dynamic_reference,
    int8_weight_only_reference,
    quantize_per_token,
    trace_paths,
)
from qformat.nn import QuantLinear
from qformat.quantize import decompress_2_4, dequantize_dense, quantize_weight
from qformat.spec import resolve_scheme_name
from qformat.testing.bounds import FP32_SLACK, spec_error_bound

CPU = torch.device("cpu")
DEVICES = [CPU, pytest.param(torch.device("cuda"), marks=pytest.mark.cuda)]
BAD = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
STATIC = torch.tensor([0.05])


def _operands(n: int, k: int, qtype: str, device: torch.device):
    gen = torch.Generator().manual_seed(n * 31 + k)
    scale = (torch.rand(n, 1, generator=gen) * 0.02 + 1e-3).to(device)
    if qtype == "int":
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    return w.to(device), scale, torch.randn(n, generator=gen).to(device)


# name -> (qtype, make op from (w, s, bias, device), [(m, dtype, k, CPU path or None for a reference)])
Make = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.device], Callable[[torch.Tensor], torch.Tensor]]
OPS: dict[str, tuple[str, Make]] = {
    "w8a16": ("int", lambda w, s, b, d: Int8WeightOnly(w, s, b)),
    "w8a16 reference": ("int", lambda w, s, b, d: lambda x: int8_weight_only_reference(x, w, s, b)),
    "w8a8 dynamic": ("int", lambda w, s, b, d: Int8Dynamic(w, s, b)),
    "w8a8 static": ("int", lambda w, s, b, d: Int8Dynamic(w, s, b, STATIC.to(d))),
    "w8a8 dynamic reference": ("int", lambda w, s, b, d: lambda x: int8_dynamic_reference(x, w, s, b)),
    "w8a8 static reference": ("int", lambda w, s, b, d: lambda x: int8_dynamic_reference(x, w, s, b, STATIC.to(d))),
    "fp8 dynamic": ("float", lambda w, s, b, d: Fp8Linear(w, s, b, dynamic=True)),
    "fp8 weight-only": ("float", lambda w, s, b, d: Fp8Linear(w, s, b, dynamic=False)),
    "fp8 static": ("float", lambda w, s, b, d: Fp8Linear(w, s, b, dynamic=False, input_scale=STATIC.to(d))),
    "fp8 dynamic reference": ("float", lambda w, s, b, d: lambda x: fp8_reference(x, w, s, b, True)),
    "fp8 static reference": ("float", lambda w, s, b, d: lambda x: fp8_reference(x, w, s, b, False, STATIC.to(d))),
}
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
W8A16_CASES = [  # every CPU path on both sides of its token thresholds; K = 40 rules out int8pack
    (1, BF16, 128, "cpu_int8pack"), (INT8PACK_MAX_TOKENS - 1, BF16, 128, "cpu_int8pack"),
    (INT8PACK_MAX_TOKENS, BF16, 128, "cpu_int_mm_split"), (SPLIT_MAX_TOKENS - 1, F16, 128, "cpu_int_mm_split"),
    (1, BF16, 40, "cpu_int_mm_split"), (1, F16, 128, "cpu_int8pack"),
    (SPLIT_MAX_TOKENS, BF16, 128, "dequant_tiled"), (1, F32, 128, "dequant_tiled"),
]
W8A8_CASES = [(m, dtype, 128, cpu_path(m)) for dtype in (BF16, F32)  # this CPU's paths (int8_dynamic.cpu_path)
              for m in (1, CPU_WEIGHT_LEFT_MAX_TOKENS - 1, CPU_WEIGHT_LEFT_MAX_TOKENS)]
FP8_CASES = [(m, dtype, 128, "upcast") for m in (1, 17) for dtype in (BF16, F32)]
CASES = {"w8a16": W8A16_CASES, "w8a8": W8A8_CASES, "fp8": FP8_CASES}


def _params():
    for name in OPS:
        family = name.split()[0]
        for m, dtype, k, path in CASES[family]:
            yield pytest.param(name, m, dtype, k, None if "reference" in name else path,
                               id=f"{name}-m{m}-{str(dtype).removeprefix('torch.')}-k{k}")


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("name, m, dtype, k, path", list(_params()))
def test_a_non_finite_token_gives_a_non_finite_row_and_leaves_the_others(device, bad, name, m, dtype, k, path):
    qtype, make = OPS[name]
    w, s, b = _operands(64, k, qtype, device)
    op = make(w, s, b.to(dtype), device)
    gen = torch.Generator().manual_seed(m + k)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    row = m // 2
    poisoned = x.clone()
    poisoned[row, k // 3] = BAD[bad]
    with trace_paths() as log:
        y = op(poisoned)
    if path is not None and device.type == "cpu":
        assert [p for _, p in log] == [path]
    assert not bool(torch.isfinite(y[row]).any()), f"token {row} with {bad} gave finite outputs"
    others = torch.arange(m, device=device) != row
    assert torch.equal(y[others], op(x)[others])  # the other tokens are bit-identical to a clean run


@pytest.mark.parametrize("scheme", ["w8a16-int8", "w8a8-int8", "fp8-dynamic", "fp8-weight-only", "w8a8-int8+2:4"])
@pytest.mark.parametrize("tokens", [1, 40, 300])
def test_quant_linear_propagates_nan_like_nn_linear(scheme, tokens):
    torch.manual_seed(tokens)
    linear = nn.Linear(128, 64).to(torch.bfloat16)
    module = QuantLinear.from_float(linear, resolve_scheme_name(scheme)[1])
    x = torch.randn(1, tokens, 128, dtype=torch.bfloat16)
    x[0, tokens - 1, 5] = float("nan")
    want = torch.isfinite(linear(x))
    got = torch.isfinite(module(x))
    assert torch.equal(got, want)


# -- subnormal scales -------------------------------------------------------------------------------------------------


def _tiny_rows() -> torch.Tensor:
    """Rows whose absmax runs from a subnormal 3e-46 up to 1e-35, so absmax / qmax lands across the subnormal range;
    the first element of each row is its (positive) absmax."""
    gen = torch.Generator().manual_seed(0)
    absmax = torch.logspace(-45.5, -35, 96, dtype=torch.float64)
    # and absmax = 1.49 qmax 2^-149 (int8, fp8): absmax / qmax rounds down to 2^-149, so w / s would be 1.49 qmax
    absmax[::12] = torch.tensor([189.0, 667.0, 150.0, 500.0, 250.0, 900.0, 1000.0, 3000.0]) * 2.0**-149
    w = (torch.rand(96, 64, generator=gen, dtype=torch.float64) * 2 - 1) * absmax[:, None]
    w[:, 0] = absmax
    return w.float()


@pytest.mark.parametrize("scheme", ["w8a8-int8", "fp8-dynamic", "w8a16-int8+2:4"])
@pytest.mark.parametrize("observer", ["absmax", "mse"])
def test_subnormal_scales_never_wrap_and_keep_the_spec_bound(scheme, observer):
    sch = resolve_scheme_name(scheme)[1]
    w = _tiny_rows()
    if sch.sparsity is not None:
        w[:, 1::4] = 0.0  # already 2:4, so every element is kept and the bound applies to all
        w[:, 2::4] = 0.0
    q = quantize_weight(w, sch, observer=observer)
    assert bool(torch.isfinite(q.scales).all()) and bool((q.scales > 0).all())
    dense = q.values if q.bitmask is None else decompress_2_4(q.values, q.bitmask, w.shape[1])
    assert bool((dense[:, 0].float() >= 0).all()), "a positive absmax was stored as a negative value (wrap-around)"
    if sch.weights.type == "int":
        assert int(dense.min()) >= -127 and int(dense.max()) <= 127
    w_hat = dequantize_dense(dense, q.scales)
    err = (w.double() - w_hat.double()).abs()
    assert bool((err <= spec_error_bound(w, q.scales, sch.weights.type)).all())
    if observer == "absmax":  # absmax never clips: its scale covers the row, so int8's B is s/2 everywhere
        qmax = 127.0 if sch.weights.type == "int" else 448.0
        assert bool((w.double().abs().amax(dim=1) / q.scales.double().flatten() <= qmax * (1 + 2**-20)).all())
        if sch.weights.type == "int":
            assert bool((err <= q.scales.double() / 2 + FP32_SLACK * w.double().abs()).all())


@pytest.mark.parametrize("qtype", ["int", "float"])
def test_tiny_tokens_quantize_in_range(qtype):
    x = _tiny_rows()
    values, scale = quantize_per_token(x, qtype)
    assert bool((values[:, 0].float() >= 0).all()), "a positive token max was quantized to a negative value"
    if qtype == "int":
        assert int(values.min()) >= -127 and int(values.max()) <= 127
    qmax = 127.0 if qtype == "int" else 448.0
    assert bool((x.double().abs().amax(dim=1) / scale.double().flatten() <= qmax * (1 + 2**-20)).all())
    err = (fake_quantize(x, qtype).double() - x.double()).abs()
    assert bool((err <= spec_error_bound(x, scale, qtype)).all())
