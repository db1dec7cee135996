"""Quantization math against the spec: error bounds, the zero rule, NaN refusal, 2:4 selection and bitmask bytes."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
import torch

from qformat.errors import NonFiniteWeightError
from qformat.quantize import (
    MseParams,
    dequantize_2_4,
    dequantize_dense,
    fp8_to_float32,
    mse_scales,
    quantize_weight,
    select_2_4,
)
from qformat.quantize.sparse24 import compress_2_4, decompress_2_4, follows_2_4, unpack_bitmask
from qformat.spec import resolve_scheme_name
from qformat.testing.bounds import spec_error_bound as spec_bound


def _weights(kind: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(hash(kind) % 2**31)
    w = torch.randn(48, 96, generator=gen)
    if kind == "outliers":
        w[::7, ::13] *= 300.0
    elif kind == "tiny":
        w *= 1e-30  # scales near the bottom of fp32's range
    elif kind == "mixed":
        w[3] = 0.0
        w[5, :] = 1e-3
        w[6, 0] = 1e4
    return w


@pytest.mark.parametrize("scheme", ["w8a8-int8", "fp8-dynamic", "w8a16-int8+2:4", "fp8-weight-only+2:4"])
@pytest.mark.parametrize("observer", ["absmax", "mse"])
@pytest.mark.parametrize("kind", ["normal", "outliers", "tiny", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantized_weights_are_within_the_spec_bound(scheme, observer, kind, dtype):
    _, sch = resolve_scheme_name(scheme)
    w = _weights(kind).to(dtype)
    q = quantize_weight(w, sch, observer=observer)
    assert q.scales.shape == (48, 1) and q.scales.dtype == torch.float32
    assert bool(torch.isfinite(q.scales).all()) and bool((q.scales > 0).all())
    w32 = w.float()
    if sch.sparsity:
        mask = torch.from_numpy(np.unpackbits(q.bitmask.numpy(), axis=-1, bitorder="little", count=96).astype(bool))
        w_hat = dequantize_2_4(q.values, q.bitmask, q.scales, 96)
        assert bool((w_hat[~mask] == 0).all())
        kept = w32.clone()
        kept[~mask] = 0  # the bound applies to kept elements; pruned ones are 0
        err, bound = (kept - w_hat).abs(), spec_bound(kept, q.scales, sch.weights.type)
        err, bound = err[mask], bound[mask]
        if float(kept.abs().max()) > 0:
            quant_rel = float((kept - w_hat).double().norm() / kept.double().norm())
            assert q.rel_quant_error == pytest.approx(quant_rel, rel=1e-3, abs=1e-9)
    else:
        w_hat = dequantize_dense(q.values, q.scales)
        err, bound = (w32 - w_hat).abs().double(), spec_bound(w32, q.scales, sch.weights.type)
    worst = (err.double() - bound).max()
    assert worst <= 0, f"error exceeds the spec bound by {worst}"
    if sch.weights.type == "int":
        assert int(q.values.min()) >= -127 and int(q.values.max()) <= 127
    rel = float((w32 - w_hat).double().norm() / w32.double().norm()) if float(w32.abs().max()) > 0 else 0.0
    assert q.rel_error == pytest.approx(rel, rel=1e-3, abs=1e-9)


def test_zero_channel_gets_a_finite_positive_scale_and_zero_values():
    w = torch.randn(32, 64)
    w[7] = 0.0
    for scheme in ("w8a8-int8", "fp8-dynamic"):
        q = quantize_weight(w, resolve_scheme_name(scheme)[1], observer="mse")
        assert float(q.scales[7]) == 1.0
        assert bool((q.values[7].float() == 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_with_the_tensor_name(bad):
    w = torch.randn(32, 64)
    w[20, 3] = bad
    with pytest.raises(NonFiniteWeightError, match=r"layer\.weight holds NaN or Inf \(first in row 20\).*--ignore layer"):
        quantize_weight(w, resolve_scheme_name("w8a8-int8")[1], name="layer.weight")


def test_absmax_int8_hits_127_exactly_and_mse_never_worse_in_its_own_norm():
    w = torch.randn(16, 256)
    absmax = quantize_weight(w, resolve_scheme_name("w8a8-int8")[1], observer="absmax")
    assert bool((absmax.values.abs().amax(dim=1) == 127).all())
    for qtype in ("int", "float"):
        s = mse_scales(w, w.abs().amax(dim=1), qtype)
        a = w.abs().amax(dim=1) / (127.0 if qtype == "int" else 448.0)
        assert bool((s <= a * (1 + 1e-6)).all()) and bool((s >= a * 0.80).all())


def test_mse_patience_stops_early_on_an_easy_tensor():
    w = torch.tensor([[1.0, -1.0, 0.5, 0.25] * 8])  # exactly representable: shrinking only hurts
    s = mse_scales(w, w.abs().amax(dim=1), "int", MseParams())
    assert float(s[0]) == pytest.approx(1.0 / 127)


def test_fp8_table_matches_the_cast_for_all_256_codes():
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ours = fp8_to_float32(codes, torch.empty(256))
    ref = codes.to(torch.float32)
    assert torch.equal(torch.isnan(ours), torch.isnan(ref))
    assert torch.equal(ours[~torch.isnan(ref)], ref[~torch.isnan(ref)])


def _reference_mask(w: torch.Tensor) -> torch.Tensor:
    """Brute force: in each group of 4 keep the two largest |w|, ties to the lower index."""
    rows, cols = w.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r in range(rows):
        for g in range(0, cols, 4):
            order = sorted(range(4), key=lambda i: (-abs(float(w[r, g + i])), i))
            for i in order[:2]:
                mask[r, g + i] = True
    return mask


@pytest.mark.parametrize("cols", [8, 12, 36])
def test_select_2_4_matches_brute_force_with_ties(cols):
    gen = torch.Generator().manual_seed(cols)
    w = torch.randint(-3, 4, (20, cols), generator=gen).float()  # many ties and zeros
    values, bitmask, dropped = select_2_4(w)
    mask = _reference_mask(w)
    assert torch.equal(dropped, w[~mask].reshape(20, cols // 2))
    assert torch.equal(bitmask, torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")))
    assert torch.equal(values, w[mask].reshape(20, cols // 2))


def test_every_tie_pattern_of_a_group_of_four():
    groups = torch.tensor(list(itertools.product([0.0, 1.0, -1.0, 2.0], repeat=4)))
    values, bitmask, _ = select_2_4(groups)
    mask = _reference_mask(groups)
    assert torch.equal(bitmask, torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")))


def test_already_2_4_sparse_weights_keep_their_pattern_exactly():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=gen)
    w[_reference_mask(torch.randn(32, 64, generator=gen)).logical_not()] = 0.0
    values, bitmask, _ = select_2_4(w)
    mask = torch.from_numpy(np.unpackbits(bitmask.numpy(), axis=-1, bitorder="little").astype(bool))
    assert torch.equal(mask, w != 0)
    assert torch.equal(values, w[w != 0].reshape(32, 32))


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("groups", [3, 4])  # an odd group count leaves half of the last bitmask byte as padding
def test_compress_2_4_equals_select_2_4_on_every_2_4_pattern(dtype, groups):
    """The import's fast path (nonzeros only) must give select_2_4's bytes, zero-filled groups included."""
    patterns = [p for p in itertools.product([0.0, 1.0, -3.0, 5.0], repeat=4) if sum(v != 0 for v in p) <= 2]
    patterns = patterns[: len(patterns) // groups * groups]  # 67 patterns: drop the remainder of a last row
    w = torch.tensor(patterns).reshape(-1, 4 * groups).to(dtype)
    w[0, :4] = torch.tensor([-0.0, 0.0, 2.0, 0.0]).to(dtype)  # fp8 -0.0 is a zero, not a kept value
    assert follows_2_4(w)
    kept, bitmask = compress_2_4(w)
    expected, expected_mask, _ = select_2_4(w.to(torch.float32))
    assert torch.equal(bitmask, expected_mask)
    kept_bytes = w.view(torch.uint8)[unpack_bitmask(bitmask, 4 * groups)].reshape(kept.shape)
    assert torch.equal(kept.view(torch.uint8), kept_bytes)
    assert torch.equal(kept.to(torch.float32), expected)
    assert torch.equal(decompress_2_4(kept, bitmask, 4 * groups).view(torch.uint8), w.view(torch.uint8))


def test_follows_2_4_finds_a_third_nonzero_in_any_block():
    w = torch.zeros(600, 8, dtype=torch.int8)
    assert follows_2_4(w)
    w[599, 4:7] = 1  # in the last block of rows
    assert not follows_2_4(w)
    assert not follows_2_4(torch.zeros(2, 6, dtype=torch.int8))  # in_features not a multiple of 4
    with pytest.raises(ValueError, match="select_2_4"):
        compress_2_4(w)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn, torch.bfloat16])
def test_decompress_2_4_places_values_where_the_bitmask_says(dtype):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(16, 44, generator=gen)  # 11 groups: the last byte is half padding
    values, bitmask, _ = select_2_4(w)
    dense = decompress_2_4(values.to(dtype), bitmask, 44)
    mask = unpack_bitmask(bitmask, 44)
    assert dense.dtype == dtype and dense.shape == (16, 44)
    assert torch.equal(dense.to(torch.float32)[mask], values.to(dtype).to(torch.float32).reshape(-1))
    assert not bool(dense.to(torch.float32)[~mask].any())


def test_spec_worked_example_bytes():
    """docs/FORMAT.md section 7, computed by hand."""
    w = torch.tensor([[0.5, -2.0, 1.0, 0.25, 0.0, 0.0, 3.0, -3.0],
                      [1.0, -1.0, 1.0, 0.5, 0.0, 0.0, 0.0, -0.125]])
    q = quantize_weight(w, resolve_scheme_name("w8a16-int8+2:4")[1])
    assert q.bitmask.flatten().tolist() == [0xC6, 0x93]
    assert bytes(q.values.view(torch.uint8).flatten().tolist()) == bytes.fromhex("AB2A7F81" "7F8100F0")
    assert [struct.pack("<f", x).hex() for x in q.scales.flatten().tolist()] == ["0683c13c", "0402013c"]
    assert torch.equal(dequantize_2_4(q.values, q.bitmask, q.scales, 8) != 0, w.abs() * torch.tensor(
        [[0, 1, 1, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0, 1]]) != 0)
