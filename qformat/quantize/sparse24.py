"""2:4 structured sparsity: magnitude pruning, and the bitmask layout the format stores.

Pruning keeps, in every group of 4 consecutive weights along the input dimension, the two of largest magnitude; ties
go to the lower index. The rule is deterministic (torch.topk makes no promise about ties), and a weight that is
already 2:4 sparse keeps its pattern: two nonzeros in a group are always the two largest. A group with fewer than two
nonzeros keeps its nonzero and then the lowest-index zeros.

Bitmask layout (docs/FORMAT.md): uint8 [out, ceil(in/8)], bit j (least significant first) of byte k covers column
8k + j, 1 = kept; the same bytes as `numpy.packbits(mask, axis=-1, bitorder="little")`.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import torch

__all__ = [
    "BITMASK_NOT_2_4",
    "BITMASK_PADDING",
    "bitmask_ok",
    "bitmask_problem",
    "compress_2_4",
    "decompress_2_4",
    "follows_2_4",
    "select_2_4",
    "unpack_bitmask",
]

#: What is wrong with a bitmask that `bitmask_problem` refuses (verify and the loader say the same).
BITMASK_NOT_2_4 = "every group of 4 columns must keep exactly 2 values"
BITMASK_PADDING = "padding bits beyond in_features must be 0"

_PAIRS = list(itertools.combinations(range(4), 2))  # (0,1) (0,2) (0,3) (1,2) (1,3) (2,3)


def _build_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Map the 6 pairwise comparisons of a group (bit p set: the lower index of pair p wins) to the kept nibble
    (bit i set: element i kept), the two kept indices and the two dropped indices, in ascending order."""
    nibble = torch.zeros(64, dtype=torch.uint8)
    kept_idx = torch.zeros(64, 2, dtype=torch.int64)
    dropped_idx = torch.zeros(64, 2, dtype=torch.int64)
    for code in range(64):
        beaten = [0, 0, 0, 0]
        for p, (i, j) in enumerate(_PAIRS):
            if code >> p & 1:
                beaten[j] += 1
            else:
                beaten[i] += 1
        kept = [i for i in range(4) if beaten[i] < 2]
        if len(kept) == 2:  # inconsistent (cyclic) codes cannot arise from real comparisons
            nibble[code] = sum(1 << i for i in kept)
            kept_idx[code] = torch.tensor(kept)
            dropped_idx[code] = torch.tensor([i for i in range(4) if i not in kept])
    return nibble, kept_idx, dropped_idx


_NIBBLE, _KEPT_IDX, _DROPPED_IDX = _build_tables()


@functools.cache
def _tables_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_build_tables`' tables on `device` (copied there once), so that pruning a CUDA block stays on the GPU."""
    return _NIBBLE.to(device), _KEPT_IDX.to(device), _DROPPED_IDX.to(device)


def select_2_4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prune `w` ([rows, in], in % 4 == 0) to 2:4.

    Returns (kept values [rows, in/2], bitmask uint8 [rows, ceil(in/8)], dropped values [rows, in/2]). Values keep
    `w`'s dtype and appear row by row in column order; the dropped ones let callers measure the pruning error
    without cancellation.
    """
    rows, cols = w.shape
    if cols % 4:
        raise ValueError(f"2:4 sparsity needs in_features divisible by 4, got {cols}")
    groups = w.reshape(rows, cols // 4, 4)
    mag = groups.abs()
    nibbles, kept_idx, dropped_idx = _tables_on(w.device)
    code = torch.zeros(rows, cols // 4, dtype=torch.uint8, device=w.device)
    for p, (i, j) in enumerate(_PAIRS):
        # the lower index wins ties: element i beats element j when |w_i| >= |w_j|
        code |= (mag[..., i] >= mag[..., j]).to(torch.uint8) << p
    index = code.long()
    nibble = nibbles[index]
    values = torch.gather(groups, 2, kept_idx[index]).reshape(rows, cols // 2)
    dropped = torch.gather(groups, 2, dropped_idx[index]).reshape(rows, cols // 2)
    return values, _pack_nibbles(nibble), dropped


def _pack_nibbles(nibble: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, groups] kept nibbles -> the bitmask [rows, ceil(groups / 2)] (group 2k in byte k's low nibble,
    a last odd group's high nibble 0); `_nibbles` is the inverse."""
    if nibble.shape[1] % 2:
        nibble = torch.nn.functional.pad(nibble, (0, 1))
    pairs = nibble.reshape(nibble.shape[0], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_bitmask(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Boolean [rows, in_features] mask from a stored bitmask (least significant bit first)."""
    bits = np.unpackbits(bitmask.cpu().numpy(), axis=-1, bitorder="little", count=in_features)
    return torch.from_numpy(bits.astype(bool))


def _nibble_popcounts(bitmask: torch.Tensor) -> torch.Tensor:
    """uint8 of `bitmask`'s shape: each nibble replaced by its number of set bits (0..4)."""
    pairs = bitmask - ((bitmask >> 1) & 0x55)  # each 2-bit field: the count of its two bits
    return (pairs & 0x33) + ((pairs >> 2) & 0x33)  # each nibble: the count of its four bits


def _valid_byte_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """Which bitmask bytes are valid, as 256-entry bool tables: inside a row both nibbles keep exactly 2 columns
    (`_BYTE_OK`); as the last byte of a row with in_features % 8 == 4, the low nibble keeps 2 and the high nibble,
    padding past in_features, is 0 (`_HALF_OK`)."""
    counts = _nibble_popcounts(torch.arange(256, dtype=torch.uint8))
    return counts == 0x22, counts == 0x02


_BYTE_OK, _HALF_OK = _valid_byte_tables()


def _all_valid(table: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: `table` holds True for every byte of `data` (a lookup per byte, on `data`'s device).

    On CPU through numpy, whose byte-indexed lookup is several times faster than torch's indexing (torch 2.13); on
    other devices in torch, read back only as the one boolean.
    """
    if data.device.type == "cpu":
        return torch.tensor(bool(table.numpy()[data.numpy()].all()))
    return table.to(data.device)[data.long()].all()


def bitmask_ok(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """0-dim bool tensor on `bitmask`'s device: the stored 2:4 bitmask (uint8 [rows, ceil(in/8)]) is valid.

    Valid: every byte inside the row keeps exactly 2 of each nibble's 4 columns; where in_features % 8 == 4 the last
    byte holds one group (low nibble keeps 2) and padding (high nibble 0). One lookup per byte, O(rows * in / 8),
    cheap enough to run on every load, and no host copy of a CUDA tensor.
    """
    full = in_features // 8  # bytes covering two whole groups
    ok = _all_valid(_BYTE_OK, bitmask[:, :full])
    if in_features % 8:
        ok = ok & _all_valid(_HALF_OK, bitmask[:, full])
    return ok


def bitmask_problem(bitmask: torch.Tensor, in_features: int) -> str | None:
    """Why a stored 2:4 bitmask is invalid (`BITMASK_NOT_2_4` or `BITMASK_PADDING`), or None if `bitmask_ok`."""
    if bool(bitmask_ok(bitmask, in_features)):
        return None
    full = in_features // 8
    if not bool(_all_valid(_BYTE_OK, bitmask[:, :full])):
        return BITMASK_NOT_2_4
    low_ok = (_nibble_popcounts(bitmask[:, full]) & 0x0F) == 2  # only a last half byte can be wrong here
    return BITMASK_PADDING if bool(low_ok.all()) else BITMASK_NOT_2_4


def _shift_tables() -> tuple[np.ndarray, np.ndarray]:
    """Kept nibble -> bit offsets (8 x index) of its first and second kept element in a group's 4 bytes."""
    first, second = np.zeros(16, np.int32), np.zeros(16, np.int32)
    for nib in range(16):
        kept = [i for i in range(4) if nib >> i & 1]
        if len(kept) == 2:
            first[nib], second[nib] = 8 * kept[0], 8 * kept[1]
    return first, second


_FIRST, _SECOND = _shift_tables()


def _nibbles(bitmask: torch.Tensor, groups: int) -> np.ndarray:
    """uint8 [rows, groups]: each group's kept nibble, from the bitmask (low nibble of byte k = group 2k)."""
    data = bitmask.cpu().numpy()
    return np.stack((data & 15, data >> 4), axis=-1).reshape(data.shape[0], -1)[:, :groups]


def decompress_2_4(values: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense [rows, in_features] tensor of `values`' dtype with the kept values in place and zeros elsewhere."""
    if values.element_size() == 1 and values.device.type == "cpu" and in_features % 4 == 0:
        # int8 / fp8: a group is 4 bytes (one int32) and its 2 kept bytes one int16; place them by shifts
        rows = values.shape[0]
        nib = _nibbles(bitmask, in_features // 4)
        pair = values.contiguous().view(torch.int16).reshape(rows, -1).to(torch.int32)
        low, high = pair & 0xFF, (pair >> 8) & 0xFF
        dense = (low << torch.from_numpy(np.take(_FIRST, nib))) | (high << torch.from_numpy(np.take(_SECOND, nib)))
        return dense.view(torch.uint8).reshape(rows, in_features).view(values.dtype)
    mask = unpack_bitmask(bitmask, in_features).to(values.device)
    flat = values.reshape(-1)
    raw = flat.view(torch.uint8) if flat.element_size() == 1 else flat  # fp8 has no masked_scatter on every backend
    dense = torch.zeros(mask.shape, dtype=raw.dtype, device=values.device)
    dense.masked_scatter_(mask, raw)
    return dense.view(values.dtype)


def _nonzero(values: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 per element: nonzero, with fp8's -0.0 counted as zero."""
    if values.dtype == torch.float8_e4m3fn:
        return ((values.view(torch.uint8) & 0x7F) != 0).view(torch.uint8)
    return (values != 0).view(torch.uint8)


def follows_2_4(values: torch.Tensor, *, block_rows: int = 256) -> bool:
    """True if every group of 4 consecutive values along the input dimension holds at most two nonzeros.

    Checked a block of rows at a time, so a dense (not 2:4) weight is usually rejected after its first block.
    """
    rows, cols = values.shape
    if cols % 4:
        return False
    return not any(_more_than_two(_nonzero(values[r0 : r0 + block_rows]).reshape(-1, cols // 4, 4))
                   for r0 in range(0, rows, block_rows))


def _more_than_two(nz: torch.Tensor) -> bool:
    """Whether any group of `nz` ([..., groups, 4] of 0/1) holds more than two ones."""
    return bool(((nz[..., 0] + nz[..., 1] + nz[..., 2] + nz[..., 3]) > 2).any())


def _fill_table() -> np.ndarray:
    """Nonzero nibble -> kept nibble: the nonzeros, then the lowest-index zeros until two are kept (select_2_4's
    tie rule: zeros tie, and ties go to the lower index)."""
    table = np.zeros(16, dtype=np.uint8)
    for nib in range(16):
        kept = [i for i in range(4) if nib >> i & 1]
        kept += [i for i in range(4) if not nib >> i & 1][: max(0, 2 - len(kept))]
        table[nib] = sum(1 << i for i in kept) if len(kept) == 2 else 0  # > 2 nonzeros: not 2:4, never looked up
    return table


_FILL = _fill_table()


def compress_2_4(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept values [rows, in/2], bitmask) of a weight that already follows 2:4 (`follows_2_4`), without sorting.

    The result equals `select_2_4(values)`'s: in a group with two nonzeros those are the two largest magnitudes, and
    the zeros that fill a group with fewer are the lowest-index ones. Much cheaper than `select_2_4` because only
    zero / nonzero matters.
    """
    rows, cols = values.shape
    nz = _nonzero(values).reshape(rows, cols // 4, 4) if cols % 4 == 0 else None
    if nz is None or _more_than_two(nz):
        raise ValueError("compress_2_4 needs a weight with at most two nonzeros in every group of 4; use select_2_4")
    nibble = nz[..., 0] | (nz[..., 1] << 1) | (nz[..., 2] << 2) | (nz[..., 3] << 3)
    nib = np.take(_FILL, nibble.numpy())
    bitmask = _pack_nibbles(torch.from_numpy(nib))
    if values.element_size() == 1:  # int8 / fp8: pick each group's 2 kept bytes out of its int32 by shifts
        group = values.contiguous().view(torch.uint8).view(torch.int32).reshape(rows, cols // 4)
        first = (group >> torch.from_numpy(np.take(_FIRST, nib))) & 0xFF
        second = (group >> torch.from_numpy(np.take(_SECOND, nib))) & 0xFF
        kept = (first | (second << 8)).to(torch.int16).view(torch.uint8).reshape(rows, cols // 2)
        return kept.view(values.dtype), bitmask
    return values[unpack_bitmask(bitmask, cols)].reshape(rows, cols // 2), bitmask
