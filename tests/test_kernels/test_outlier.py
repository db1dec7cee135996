"""LLM.int8()'s decomposition against its reference on every path, on both sides of the threshold and of every token
threshold of the int8 op underneath, asserting which paths ran (docs/FORMAT.md section 8.4)."""

from __future__ import annotations

import pytest
import torch

import qformat.kernels.int8_dynamic as int8_dynamic
from qformat.kernels import (
    CPU_WEIGHT_LEFT_MAX_TOKENS,
    Int8Dynamic,
    Int8Outlier,
    int8_dynamic_reference,
    int8_outlier_reference,
    outlier_columns,
    trace_paths,
)

CPU = torch.device("cpu")
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
THRESHOLD = 6.0


def _weights(n: int, k: int, device: torch.device):
    g = torch.Generator().manual_seed(n * 31 + k)
    w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    s = (torch.rand(n, 1, generator=g) * 0.02 + 1e-3).float()
    b = torch.randn(n, generator=g)
    return w.to(device), s.to(device), b.to(device)


def _inputs(kind: str, m: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(m * 7 + k)
    x = torch.randn(m, k, generator=g).clamp(-3, 3)  # below the threshold everywhere ...
    if kind == "features":  # ... except a few columns, large in every token (LLM.int8()'s outlier features)
        x[:, [1, k // 2, k - 1]] *= 25.0
    elif kind == "one_token":  # one token reaches it in one column: the whole column goes to the float part
        x[m // 2, 3] = -40.0
    elif kind == "all":
        x *= 10.0
        x[x.abs() < THRESHOLD] = THRESHOLD  # every column has a token at the threshold
    return x.to(dtype).to(device)


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    assert got.dtype == want.dtype and got.shape == want.shape and torch.isfinite(got).all()
    return float((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6))


TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("device", DEVICES, ids=str)
@pytest.mark.parametrize("native", [True, False], ids=["int_mm", "exact_float"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("m", [1, 2, 16, 17, CPU_WEIGHT_LEFT_MAX_TOKENS - 1, CPU_WEIGHT_LEFT_MAX_TOKENS])
@pytest.mark.parametrize("kind", ["features", "one_token", "all", "none"])
def test_decomposition_paths_against_the_reference(monkeypatch, device, native, dtype, m, kind):
    if device.type == "cuda" and not native:
        pytest.skip("the exact-float switch is a CPU path")
    monkeypatch.setattr(int8_dynamic, "CPU_NATIVE_INT_MM", native)
    n, k = 48, 80
    w, s, b = _weights(n, k, device)
    x = _inputs(kind, m, k, dtype, device)
    op = Int8Outlier(Int8Dynamic(w, s, b.to(dtype)), THRESHOLD)
    with trace_paths() as log:
        y = op(x)
    inner = "cuda_int_mm" if device.type == "cuda" else int8_dynamic.cpu_path(m)
    if kind == "none":
        assert log == [("int8_outlier", "none"), ("int8_w8a8", inner)]
        assert torch.equal(y, Int8Dynamic(w, s, b.to(dtype))(x))  # exactly plain W8A8
    else:
        assert log == [("int8_outlier", device.type), ("int8_w8a8", inner)]
    want = int8_outlier_reference(x, w, s, b.to(dtype), THRESHOLD)
    assert _rel(y, want) <= TOL[dtype]
    if kind != "none" and dtype == torch.float32:  # and it is not plain W8A8: the float part changed the result
        assert _rel(int8_dynamic_reference(x, w, s, b), want) > 100 * TOL[dtype]


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_both_sides_of_the_threshold(device):
    """|x| = t is an outlier, the next float below is not; the sign does not matter."""
    w, s, b = _weights(32, 64, device)
    below = torch.nextafter(torch.tensor(THRESHOLD), torch.tensor(0.0)).item()  # the float32 just below
    for value, outlier in ((THRESHOLD, True), (-THRESHOLD, True), (below, False), (-below, False)):
        x = _inputs("none", 5, 64, torch.float32, device)
        x[2, 9] = value
        assert outlier_columns(x, THRESHOLD).nonzero().reshape(-1).tolist() == ([9] if outlier else [])
        with trace_paths() as log:
            y = Int8Outlier(Int8Dynamic(w, s, b), THRESHOLD)(x)
        assert log[0] == ("int8_outlier", device.type if outlier else "none")
        plain = Int8Dynamic(w, s, b)(x)
        assert torch.equal(y, plain) != outlier
        assert _rel(y, int8_outlier_reference(x, w, s, b, THRESHOLD)) <= TOL[torch.float32]


def test_the_threshold_is_compared_exactly_whatever_the_dtype():
    x = torch.full((2, 4), 6.0, dtype=torch.bfloat16)  # 6.01 is no bfloat16: rounded there, it would be 6.0
    assert not outlier_columns(x, 6.01).any() and outlier_columns(x, 6.0).all()


def test_the_decomposition_recovers_what_outlier_columns_cost():
    """Against the float product with the same (dequantized) weights, plain per-token W8A8 loses most of its
    precision to three loud columns; the decomposition gets within a small factor of a quiet input's error."""
    w, s, b = _weights(64, 256, CPU)
    dense = w.float() * s
    loud = _inputs("features", 32, 256, torch.float32, CPU)
    exact = loud @ dense.t() + b
    plain = (Int8Dynamic(w, s, b)(loud) - exact).norm() / exact.norm()
    decomposed = (Int8Outlier(Int8Dynamic(w, s, b), THRESHOLD)(loud) - exact).norm() / exact.norm()
    assert plain > 5 * decomposed


def test_non_finite_tokens_poison_only_their_row():
    w, s, b = _weights(32, 64, CPU)
    x = _inputs("features", 6, 64, torch.float32, CPU)
    x[1, 5], x[4, 7] = float("inf"), float("nan")
    y = Int8Outlier(Int8Dynamic(w, s, b), THRESHOLD)(x)
    assert not torch.isfinite(y[1]).any() and not torch.isfinite(y[4]).any()
    others = [0, 2, 3, 5]
    assert torch.isfinite(y[others]).all()
    clean = x.clone()
    clean[1, 5] = THRESHOLD  # the same outlier columns (5 is one because of the Inf), finite everywhere
    clean[4, 7] = 0.0
    want = Int8Outlier(Int8Dynamic(w, s, b), THRESHOLD)(clean)
    assert torch.equal(y[others], want[others])


def test_static_activation_scales_are_refused():
    w, s, b = _weights(16, 32, CPU)
    with pytest.raises(ValueError, match="dynamic per-token"):
        Int8Outlier(Int8Dynamic(w, s, b, input_scale=torch.tensor([0.1])), THRESHOLD)


@pytest.mark.cuda
def test_cuda_decomposition_matches_the_cpu():
    w, s, b = _weights(256, 512, CPU)
    x = _inputs("features", 64, 512, torch.bfloat16, CPU)
    cpu = Int8Outlier(Int8Dynamic(w, s, b.bfloat16()), THRESHOLD)(x)
    dev = torch.device("cuda")
    with trace_paths() as log:
        gpu = Int8Outlier(Int8Dynamic(w.to(dev), s.to(dev), b.bfloat16().to(dev)), THRESHOLD)(x.to(dev))
    assert log == [("int8_outlier", "cuda"), ("int8_w8a8", "cuda_int_mm")]
    assert _rel(gpu.cpu(), cpu) <= TOL[torch.bfloat16]
