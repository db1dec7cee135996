"""2:4 structured sparsity: magnitude pruning, and the bitmask layout the format stores.

Pruning keeps, in every group of 4 consecutive weights along the input dimension, the two of largest magnitude; ties
go to the lower index. The rule is deterministic (torch.topk makes no promise about ties), and a weight that is
already 2:4 sparse keeps its pattern: two nonzeros in a group are always the two largest. A group with fewer than two
nonzeros keeps its nonzero and then the lowest-index zeros.

Bitmask layout (docs/FORMAT.md): uint8 [out, ceil(in/8)], bit j (least significant first) of byte k covers column
8k + j, 1 = kept; the same bytes as `numpy.packbits(mask, axis=-1, bitorder="little")`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

__all__ = ["decompress_2_4", "select_2_4", "unpack_bitmask"]

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
    code = torch.zeros(rows, cols // 4, dtype=torch.uint8)
    for p, (i, j) in enumerate(_PAIRS):
        # the lower index wins ties: element i beats element j when |w_i| >= |w_j|
        code |= (mag[..., i] >= mag[..., j]).to(torch.uint8) << p
    index = code.long()
    nibble = _NIBBLE[index]
    values = torch.gather(groups, 2, _KEPT_IDX[index]).reshape(rows, cols // 2)
    dropped = torch.gather(groups, 2, _DROPPED_IDX[index]).reshape(rows, cols // 2)
    if (cols // 4) % 2:
        nibble = torch.nn.functional.pad(nibble, (0, 1))
    pairs = nibble.reshape(rows, -1, 2)
    bitmask = pairs[..., 0] | (pairs[..., 1] << 4)
    return values, bitmask, dropped


def unpack_bitmask(bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Boolean [rows, in_features] mask from a stored bitmask (least significant bit first)."""
    bits = np.unpackbits(bitmask.cpu().numpy(), axis=-1, bitorder="little", count=in_features)
    return torch.from_numpy(bits.astype(bool))


def decompress_2_4(values: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """Dense [rows, in_features] tensor of `values`' dtype with the kept values in place and zeros elsewhere."""
    mask = unpack_bitmask(bitmask, in_features).to(values.device)
    flat = values.reshape(-1)
    raw = flat.view(torch.uint8) if flat.element_size() == 1 else flat  # fp8 has no index_put on every backend
    dense = torch.zeros(mask.shape, dtype=raw.dtype, device=values.device)
    dense[mask] = raw
    return dense.view(values.dtype)
