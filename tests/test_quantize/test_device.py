"""quantize_weight stays on the weight's device: a CUDA weight is quantized on the GPU, bit for bit as on the CPU."""

from __future__ import annotations

import pytest
import torch

from qformat.quantize import weights
from qformat.quantize.weights import quantize_weight
from qformat.spec import resolve_scheme_name
from qformat.spec.schemes import scheme_names

OBSERVERS = ("absmax", "mse")


def _weight(seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A random [64, 256] weight with an outlier column, a zero row and a tiny row (the zero rule, small scales)."""
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(seed))
    w[:, 5] *= 40.0
    w[9] = 0.0
    w[17] *= 1e-20
    return w.to(dtype)


@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("name", scheme_names())
def test_nothing_is_allocated_on_the_default_device(name, observer):
    # With the default device set to meta, any allocation that does not follow the weight's device lands on meta
    # and mixes with the CPU weight's tensors, which fails: the CPU stand-in for "a CUDA weight stays on the GPU".
    _, scheme = resolve_scheme_name(name)
    w = _weight(0)
    expected = quantize_weight(w, scheme, observer=observer)
    with torch.device("meta"):
        q = quantize_weight(w, scheme, observer=observer)
    assert q.values.device == q.scales.device == w.device
    assert torch.equal(q.values.view(torch.uint8), expected.values.view(torch.uint8))
    assert torch.equal(q.scales, expected.scales)


@pytest.mark.parametrize("name", scheme_names())
def test_cpu_outputs_stay_on_the_cpu(name):
    _, scheme = resolve_scheme_name(name)
    q = quantize_weight(_weight(1, torch.bfloat16), scheme)
    tensors = [q.values, q.scales] + ([q.bitmask] if scheme.sparsity else [])
    assert all(t.device.type == "cpu" for t in tensors)
    assert (q.bitmask is None) == (scheme.sparsity is None)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("observer", OBSERVERS)
@pytest.mark.parametrize("name", scheme_names())
def test_cuda_quantization_equals_the_cpu_bit_for_bit(name, observer, dtype, monkeypatch):
    monkeypatch.setattr(weights, "BLOCK_ELEMENTS", 16 * 256)  # 4 row blocks: offsets between blocks are exercised
    _, scheme = resolve_scheme_name(name)
    w = _weight(2, dtype)
    cpu = quantize_weight(w, scheme, observer=observer)
    gpu = quantize_weight(w.cuda(), scheme, observer=observer)
    tensors = [gpu.values, gpu.scales] + ([gpu.bitmask] if scheme.sparsity else [])
    assert all(t.is_cuda for t in tensors)
    assert torch.equal(gpu.values.cpu().view(torch.uint8), cpu.values.view(torch.uint8))  # fp8: compare the bytes
    assert torch.equal(gpu.scales.cpu(), cpu.scales)
    if scheme.sparsity:
        assert torch.equal(gpu.bitmask.cpu(), cpu.bitmask)
    else:
        assert gpu.bitmask is None
    # the statistics are float64 sums in another order on the GPU: equal to rounding, not bit for bit
    for field in ("sq_norm", "sq_error", "sq_quant_error", "sq_kept"):
        assert getattr(gpu, field) == pytest.approx(getattr(cpu, field), rel=1e-4, abs=1e-300)
