"""Every fast path against its reference, on random and adversarial inputs, on both sides of every token threshold,
asserting which path actually ran (a silent fall-back to the reference must not pass as the fast path)."""

from __future__ import annotations

import pytest
import torch

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

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _inputs(kind: str, m: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(m * 1000 + k)
    x = torch.randn(m, k, generator=gen)
    if kind == "zeros":
        x.zero_()
    elif kind == "outliers":
        x[:, ::7] *= 100.0
    elif kind == "zero_rows":
        x[::2] = 0.0
    return x.to(dtype).to(device)


def _weights(n: int, k: int, qtype: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(n + 7 * k)
    scale = (torch.rand(n, 1, generator=gen) * 0.02 + 1e-3).float()
    if qtype == "int":
        w = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    else:
        w = (torch.randn(n, k, generator=gen) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    bias = torch.randn(n, generator=gen)
    return w.to(device), scale.to(device), bias.to(device)


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = want.float().abs().max().clamp_min(1e-6)
    err = (got.float() - want.float()).abs().max() / scale
    assert err <= rtol, f"relative error {err:.3g} > {rtol}"


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
MS = [1, INT8PACK_MAX_TOKENS - 1, INT8PACK_MAX_TOKENS, SPLIT_MAX_TOKENS - 1, SPLIT_MAX_TOKENS]
SHAPES = [(64, 128), (48, 40), (96, 16)]  # (N, K): K = 40 is no multiple of 16


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("kind", ["random", "outliers", "zeros"])
def test_int8_weight_only_paths(device, dtype, m, n, k, kind):
    w, s, b = _weights(n, k, "int", device)
    x = _inputs(kind, m, k, dtype, device)
    op = Int8WeightOnly(w, s, b.to(dtype))
    with trace_paths() as log:
        y = op(x)
    if device.type == "cpu" and dtype != torch.float32 and m < SPLIT_MAX_TOKENS:
        path = "cpu_int8pack" if k % 16 == 0 and m < INT8PACK_MAX_TOKENS else "cpu_int_mm_split"
    else:
        path = "dequant_tiled"
    assert log == [("int8_weight_only", path)]
    _close(y, int8_weight_only_reference(x, w, s, b.to(dtype)), TOL[dtype])


@pytest.mark.parametrize("kind", ["random", "outliers", "zero_rows"])
def test_int8_split_is_more_precise_than_a_bf16_gemm(kind):
    """The many-token weight-only path may replace a bf16 GEMM only because it is closer to the exact product."""
    from qformat.kernels import dequant_tiled_linear

    w, s, _ = _weights(512, 1024, "int", CPU)
    x = _inputs(kind, 96, 1024, torch.bfloat16, CPU)
    exact = int8_weight_only_reference(x.double(), w, s.double(), None)
    with trace_paths() as log:
        split = Int8WeightOnly(w, s, None)(x)
    assert log == [("int8_weight_only", "cpu_int_mm_split")]
    bf16_gemm = dequant_tiled_linear(x, w, s, None)
    assert (split.double() - exact).norm() < (bf16_gemm.double() - exact).norm()


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 2, 16, 17, CPU_WEIGHT_LEFT_MAX_TOKENS - 1, CPU_WEIGHT_LEFT_MAX_TOKENS])
@pytest.mark.parametrize("n, k", SHAPES)
@pytest.mark.parametrize("kind", ["random", "outliers", "zeros", "zero_rows"])
def test_int8_dynamic_paths(device, dtype, m, n, k, kind):
    w, s, b = _weights(n, k, "int", device)
    x = _inputs(kind, m, k, dtype, device)
    op = Int8Dynamic(w, s, b.to(dtype))
    with trace_paths() as log:
        y = op(x)
    if device.type == "cuda":
        path = "cuda_int_mm"
    else:
        path = cpu_path(m)
    assert log == [("int8_w8a8", path)]
    want = int8_dynamic_reference(x, w, s, b.to(dtype))
    if dtype == torch.float32:  # integer products are exact on both sides; only the final rescale rounds
        _close(y, want, 1e-6)
    else:
        _close(y, want, TOL[dtype])


def test_int8_dynamic_static_scale_and_per_token_never_per_tensor():
    w, s, b = _weights(32, 64, "int", CPU)
    x = _inputs("outliers", 4, 64, torch.float32, CPU)
    x[0] *= 1000.0  # one loud token must not coarsen the others' quantization
    y = Int8Dynamic(w, s, b)(x)
    per_token = int8_dynamic_reference(x, w, s, b)
    _close(y, per_token, 1e-6)
    scale = torch.tensor([float(x.abs().max()) / 127])
    per_tensor = int8_dynamic_reference(x, w, s, b, input_scale=scale)
    assert (y[1:] - per_tensor[1:]).abs().max() > 10 * (y[1:] - per_token[1:]).abs().max()
    static = Int8Dynamic(w, s, b, input_scale=scale)(x)
    _close(static, per_tensor, 1e-6)


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("dynamic", [True, False], ids=["fp8-dynamic", "fp8-weight-only"])
@pytest.mark.parametrize("m", [1, 17])
@pytest.mark.parametrize("kind", ["random", "outliers", "zeros"])
def test_fp8_paths(device, dtype, dynamic, m, kind):
    w, s, b = _weights(64, 128, "float", device)
    x = _inputs(kind, m, 128, dtype, device)
    op = Fp8Linear(w, s, b.to(dtype), dynamic=dynamic)
    with trace_paths() as log:
        y = op(x)
    assert log == [("fp8", "cuda_scaled_mm" if op.native else "upcast")]
    assert op.weight.dtype == torch.float8_e4m3fn  # stays fp8 in memory
    _close(y, fp8_reference(x, w, s, b.to(dtype), dynamic), TOL[dtype])


def test_per_token_quantization_follows_the_spec():
    x = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [3.0, 1e-8, -3.0]])
    q, s = quantize_per_token(x, "int")
    assert torch.equal(s.flatten(), torch.tensor([1.0, 2.0, 3.0]) / torch.tensor([1.0, 127.0, 127.0]))
    assert q.tolist() == [[0, 0, 0], [64, -127, 32], [127, 0, -127]]  # 63.5 rounds half to even: 64
    q8, s8 = quantize_per_token(x, "float")
    assert q8.dtype == torch.float8_e4m3fn and s8[1].item() == pytest.approx(2.0 / 448)
    assert torch.equal(fake_quantize(torch.zeros(2, 4), "int"), torch.zeros(2, 4))


@pytest.mark.cuda
def test_cuda_paths_are_the_fast_ones():
    dev = torch.device("cuda")
    w, s, b = _weights(256, 256, "int", dev)
    x = _inputs("random", 64, 256, torch.bfloat16, dev)
    with trace_paths() as log:
        Int8Dynamic(w, s, b.bfloat16())(x)
        Int8WeightOnly(w, s, b.bfloat16())(x)
    assert log == [("int8_w8a8", "cuda_int_mm"), ("int8_weight_only", "dequant_tiled")]
    if torch.cuda.get_device_capability() >= (8, 9):
        wf, sf, bf = _weights(256, 256, "float", dev)
        with trace_paths() as log:
            Fp8Linear(wf, sf, bf.bfloat16(), dynamic=True)(x)
        assert log == [("fp8", "cuda_scaled_mm")]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_upcast_table_matches_the_cast_for_all_256_codes(dtype):
    """The fp8 kernel upcasts through the quantize package's table (one table for the weight math and the kernels)."""
    from qformat.quantize.observers import fp8_to_float

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).reshape(16, 16)
    ours, ref = fp8_to_float(codes, dtype), codes.to(dtype)
    assert ours.shape == ref.shape and ours.dtype == dtype
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(ours[~torch.isnan(ref)], ref[~torch.isnan(ref)])


@pytest.mark.parametrize("m, k", [(1, 64), (17, 1024), (300, 1025), (64, 3000)])
def test_int8_dynamic_cpu_paths_give_identical_integers(monkeypatch, m, k):
    """`cpu_exact_float` (CPUs without int8 dot products) and `_int_mm` give the same int32 sums, bit for bit, at
    full-range operands (+-127) and K across the float32 chunk boundary."""
    import qformat.kernels.int8_dynamic as mod

    g = torch.Generator().manual_seed(k)
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (48, k), dtype=torch.int8, generator=g)
    xq[0], w[0] = 127, 127  # the largest sums
    native = torch._int_mm(torch.nn.functional.pad(xq, (0, 0, 0, max(0, 17 - m))), w.t())[:m]
    assert torch.equal(mod.exact_float_mm(xq, w), native)
    assert torch.equal(native, (xq.to(torch.float64) @ w.to(torch.float64).t()).to(torch.int32))
    x = torch.randn(m, k)
    ws = torch.rand(48) + 0.5
    outputs = {}
    for flag in (True, False):
        monkeypatch.setattr(mod, "CPU_NATIVE_INT_MM", flag)
        with trace_paths() as log:
            outputs[flag] = Int8Dynamic(w, ws, None)(x)
        assert log == [("int8_w8a8", mod.cpu_path(m))]
        assert (log[0][1] == "cpu_exact_float") == (not flag)
    assert torch.equal(outputs[True], outputs[False])
