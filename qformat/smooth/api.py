"""`smooth_model`: SmoothQuant on a live full-precision model, in place, with the record the checkpoint keeps.

Steps: find the exact folds of the architecture (`qformat.smooth.mappings`), run the calibration text through the
model once with hooks on one reader of each smoothed input (`qformat.calibrate`), compute the factors
(`qformat.smooth.factors`) and fold them (`qformat.smooth.fold`). The returned record carries the per-parameter
edits too, so the streaming converter writes the same tensors from the source checkpoint (`checkpoint_edits`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qformat.models.names import NameMap, checkpoint_shapes
from qformat.plan.record import significant
from qformat.smooth.factors import group_heads, smoothing_factors, spread_heads
from qformat.smooth.fold import TensorEdit, apply_edits, place_edits
from qformat.smooth.mappings import ResolvedPlace, Skipped, resolve_places
from qformat.smooth.options import SmoothQuant

__all__ = ["SmoothingRecord", "checkpoint_edits", "smooth_model"]

logger = logging.getLogger(__name__)

#: What `provenance.smoothquant.method` says: the factors' formula and where it is from.
METHOD = "smoothquant"


@dataclass(frozen=True)
class SmoothingRecord:
    """What SmoothQuant did to a model: `alpha`, the calibration text's identity (`{"dataset", "text_sha256",
    "tokens"}`, None when nothing could be folded so nothing was run), the folds made and the Linear inputs left
    alone with the reason (module names are checkpoint names). `edits` (parameter path -> `TensorEdit`) is how
    every changed tensor is computed; it is not recorded."""

    alpha: float
    calibration: dict[str, Any] | None
    smoothed: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, Any], ...]
    edits: dict[str, TensorEdit] = field(default_factory=dict, repr=False, compare=False)

    @property
    def smoothed_inputs(self) -> int:
        """Linear modules whose input was smoothed."""
        return sum(len(entry["linears"]) for entry in self.smoothed)

    @property
    def skipped_inputs(self) -> int:
        return sum(len(entry["linears"]) for entry in self.skipped)

    def to_dict(self) -> dict[str, Any]:
        """`provenance.smoothquant` (docs/FORMAT.md section 11.1)."""
        return {"method": METHOD, "alpha": self.alpha, "calibration": self.calibration, "folded_in": "float32",
                "linear_inputs": {"smoothed": self.smoothed_inputs, "skipped": self.skipped_inputs},
                "smoothed": list(self.smoothed), "skipped": list(self.skipped)}


def _module_names(model: nn.Module) -> dict[str, str]:
    """Model module path -> checkpoint module name (through each module's `weight`, the one name mapping)."""
    names = NameMap(model)
    out = {}
    for key in checkpoint_shapes(model):
        if key.endswith(".weight"):
            out[names.key(key)[0].removesuffix(".weight")] = key.removesuffix(".weight")
    return out


def _factors(place: ResolvedPlace, act_max: torch.Tensor | None, modules: dict[str, nn.Module],
             alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(source row factors, target column factors) of one place; all ones where the input was never seen."""
    weights = [modules[t].weight for t in place.targets]
    channels = weights[0].shape[1]
    cols = smoothing_factors(act_max, weights, alpha) if act_max is not None else torch.ones(channels)
    if not place.heads:
        return cols, cols
    v_out = modules[place.source].weight.shape[0]
    kv_heads = v_out // (channels // place.heads)
    rows = group_heads(cols, place.heads, kv_heads)
    return rows, spread_heads(rows, place.heads, kv_heads)


def _skipped_entries(skipped: list[Skipped], names: dict[str, str]) -> tuple[dict[str, Any], ...]:
    return tuple({"source": names.get(s.source, s.source) if s.source else None,
                  "linears": [names.get(t, t) for t in s.targets], "reason": s.reason} for s in skipped)


@torch.no_grad()
def smooth_model(model: nn.Module, tokenizer: Any, spec: SmoothQuant, *, progress: bool = False) -> SmoothingRecord:
    """Fold SmoothQuant's factors into `model` (full precision, any device) in place where the fold is exact; run
    `spec.calib` (at most `spec.max_tokens` tokens) through it first. The model's outputs are unchanged up to
    float rounding; its Linear inputs are flatter across channels."""
    from qformat.calibrate.run import input_maxima
    from qformat.eval.data import load_text

    text = load_text(spec.calib)  # a missing file fails before anything runs
    places, skipped = resolve_places(model)
    names = _module_names(model)
    modules = dict(model.named_modules())
    calibration = None
    maxima: dict[str, torch.Tensor] = {}
    if places:
        watched = {place.targets[0]: modules[place.targets[0]] for place in places}
        maxima, calibration = input_maxima(model, tokenizer, text, watched, max_tokens=spec.max_tokens,
                                           progress=progress)
    edits: dict[str, TensorEdit] = {}
    smoothed = []
    for place in places:
        act_max = maxima.get(place.targets[0])
        rows, cols = _factors(place, act_max, modules, spec.alpha)
        place_edits(edits, place.source, place.targets, rows, cols, modules)
        smoothed.append({"source": names.get(place.source, place.source), "kind": place.kind,
                         "linears": [names.get(t, t) for t in place.targets], "channels": int(rows.numel()),
                         "factor_min": significant(float(rows.min())), "factor_max": significant(float(rows.max())),
                         "unchanged_channels": int((rows == 1).sum())})
    apply_edits(model, edits)
    record = SmoothingRecord(spec.alpha, calibration, tuple(smoothed), _skipped_entries(skipped, names), edits)
    logger.info("SmoothQuant (alpha %g): %d Linear inputs smoothed, %d left alone", spec.alpha,
                record.smoothed_inputs, record.skipped_inputs)
    return record


def checkpoint_edits(record: SmoothingRecord, model: nn.Module, keys: Iterable[str]) -> dict[str, TensorEdit]:
    """The record's edits by checkpoint tensor name, for the checkpoint whose tensor names are `keys` (mapped to
    `model`'s parameters as transformers loads them). Every edit must find its tensor."""
    names = NameMap(model)
    by_param = {names.key(key)[0]: key for key in keys}
    missing = [p for p in record.edits if p not in by_param]
    if missing:
        raise ValueError(f"SmoothQuant changed {missing[0]}, which the checkpoint does not store; report this bug")
    return {by_param[param]: edit for param, edit in record.edits.items()}
