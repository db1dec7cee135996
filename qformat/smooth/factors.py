"""SmoothQuant's per-channel factors: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (Xiao et al. 2023, eq. 4).

max|W_j| is taken over every Linear that reads input channel j (q, k and v share one input, so one factor). A
channel whose statistic is unusable gets s = 1 (left alone): never seen or always zero on the calibration text, a
zero weight column, or anything non-finite.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["group_heads", "smoothing_factors", "spread_heads"]


def smoothing_factors(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """The float32 factors of one input, from its per-channel activation maxima `act_max` [K] and the weights
    [out, K] of the Linear modules that read it. Computed in float64 so that float32 rounding happens once."""
    w_max = torch.stack([w.detach().abs().amax(dim=0).to(torch.float64) for w in weights]).amax(dim=0)
    x_max = act_max.detach().to(torch.float64).to(w_max.device)
    s = x_max.pow(alpha) / w_max.pow(1 - alpha)
    usable = (x_max > 0) & (w_max > 0) & torch.isfinite(x_max) & torch.isfinite(w_max) & torch.isfinite(s) & (s > 0)
    s = torch.where(usable, s, torch.ones_like(s)).to(torch.float32)
    usable &= torch.isfinite(s) & (s > 0)  # float64 factors beyond float32's range
    return torch.where(usable, s, torch.ones_like(s)).cpu()


def group_heads(factors: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """o_proj input factors [heads x head_dim] -> one factor per v_proj output channel [kv_heads x head_dim]: the
    largest over the query heads that share a kv head (query head h reads kv head h // (heads / kv_heads))."""
    head_dim = factors.numel() // heads
    return factors.view(kv_heads, heads // kv_heads, head_dim).amax(dim=1).reshape(-1)


def spread_heads(grouped: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """The inverse layout of `group_heads`: each v_proj channel's factor repeated for every query head reading it."""
    head_dim = grouped.numel() // kv_heads
    view = grouped.view(kv_heads, 1, head_dim).expand(kv_heads, heads // kv_heads, head_dim)
    return view.reshape(-1).clone()
