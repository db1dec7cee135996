"""The evaluation and fallback-search records of config.json (docs/FORMAT.md section 11.4) as a card reads them.

A stranger may have written config.json, so nothing here trusts a record: an entry whose fields have the wrong type
is skipped (a result row, a trial) or left out (a field of the search log), never an error, and long lists are read
up to a bound. What a card states about accuracy comes from these values only: the recorded `relative_change` and
`recovery` are shown as recorded, never recomputed from `quantized / baseline` (wrong where lower is better).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

__all__ = ["MAX_RESULTS", "MAX_TRIALS", "FallbackSearch", "Measurement", "SearchTrial", "TextRef",
           "parse_evaluation", "parse_fallback_search"]

#: At most this many evaluation results are read (a card table, not a dump).
MAX_RESULTS = 64
#: At most this many search trials are read.
MAX_TRIALS = 64

_MISSING = object()


class _Wrong(Exception):
    """A field has a type the format does not allow: the row it belongs to is skipped."""


def _string(value: Any, *, required: bool = False) -> str | None:
    if value is None or value is _MISSING:
        if required:
            raise _Wrong
        return None
    if not isinstance(value, str) or (required and not value):
        raise _Wrong
    return value


def _number(value: Any) -> float | None:
    """A finite number (bools are not numbers here), None for null/missing."""
    if value is None or value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Wrong
    return float(value)


def _count(value: Any) -> int | None:
    if value is None or value is _MISSING:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Wrong
    return value


def _flag(value: Any) -> bool | None:
    if value is None or value is _MISSING:
        return None
    if not isinstance(value, bool):
        raise _Wrong
    return value


def _lenient(read: Any, value: Any) -> Any:
    """`read(value)`, or None where the value has the wrong type (a field of a log, not a row: leave it out)."""
    try:
        return read(value)
    except _Wrong:
        return None


@dataclass(frozen=True)
class Measurement:
    """One recorded evaluation result. `quantized` is None where it was recorded as null (not finite, e.g. a
    perplexity that overflowed); `higher_is_better` is None for results recorded without a direction."""

    metric: str
    dataset: str
    task: str | None
    tokens: int | None
    higher_is_better: bool | None
    baseline: float | None
    quantized: float | None
    relative_change: float | None
    recovery: float | None
    command: str | None


def _measurement(entry: Any) -> Measurement:
    if not isinstance(entry, dict) or "quantized" not in entry:
        raise _Wrong
    quantized = entry["quantized"]
    if isinstance(quantized, float) and not math.isfinite(quantized):
        quantized = None  # recorded as a non-finite number: shown like a null
    return Measurement(
        metric=_string(entry.get("metric"), required=True) or "",
        dataset=_string(entry.get("dataset", _MISSING)) or "",
        task=_string(entry.get("task", _MISSING)),
        tokens=_count(entry.get("tokens", _MISSING)),
        higher_is_better=_flag(entry.get("higher_is_better", _MISSING)),
        baseline=_number(entry.get("baseline", _MISSING)),
        quantized=_number(quantized),
        relative_change=_number(entry.get("relative_change", _MISSING)),
        recovery=_number(entry.get("recovery", _MISSING)),
        command=_string(entry.get("command", _MISSING)),
    )


def parse_evaluation(value: Any) -> tuple[tuple[Measurement, ...], int]:
    """The readable results of `quantization_config.evaluation` (at most MAX_RESULTS) and how many recorded
    entries are not shown (unreadable, or past the bound)."""
    if not isinstance(value, list):
        return (), 0
    results = []
    for entry in value[:MAX_RESULTS]:
        try:
            results.append(_measurement(entry))
        except _Wrong:
            continue
    return tuple(results), len(value) - len(results)


@dataclass(frozen=True)
class TextRef:
    """A text a search or evaluation scored: its label and how many tokens of it."""

    dataset: str
    tokens: int | None


@dataclass(frozen=True)
class SearchTrial:
    """One full evaluation of the search: units and modules kept, the metric, its loss, whether the budget held."""

    kept_units: int
    kept_modules: int | None
    metric: float | None
    loss: float | None
    met: bool | None
    seconds: float | None


@dataclass(frozen=True)
class FallbackSearch:
    """`quantization_config.fallback_search`: the budget, the sensitivity pass, the trials and the result. Every
    field the log lacks, or records with a wrong type, is None."""

    metric: str | None
    loss_kind: str | None  # "relative_increase" | "value" | "one_minus" (qformat.eval.metrics)
    max_loss: float | None
    max_evals: int | None
    max_fallback: int | None
    method: str | None
    units: int | None
    sensitivity_seconds: float | None
    sensitivity_text: TextRef | None
    search_text: TextRef | None
    heldout_text: TextRef | None
    baseline: float | None
    trials: tuple[SearchTrial, ...]
    trials_recorded: int
    evaluations: int | None
    status: str | None
    kept_units: int | None
    kept_modules: int | None
    loss: float | None
    heldout_loss: float | None
    heldout_met: bool | None
    seconds: float | None

    @property
    def met(self) -> bool:
        """The budget was met on the search text and, where it was checked, on the held-out text too."""
        return self.status == "met" and self.heldout_met is not False


def _object(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text_ref(value: Any) -> TextRef | None:
    if not isinstance(value, dict):
        return None
    dataset = _lenient(_string, value.get("dataset"))
    return TextRef(dataset, _lenient(_count, value.get("tokens"))) if dataset else None


def _trial(entry: Any) -> SearchTrial:
    if not isinstance(entry, dict):
        raise _Wrong
    kept = _count(entry.get("kept_units"))
    if kept is None:
        raise _Wrong
    return SearchTrial(kept, _count(entry.get("kept_modules")), _number(entry.get("metric")),
                       _number(entry.get("loss")), _flag(entry.get("met")), _number(entry.get("seconds")))


def parse_fallback_search(value: Any) -> FallbackSearch | None:
    """The search log of `quantization_config.fallback_search`, or None where no search ran (null, or not an
    object). Trials are read up to MAX_TRIALS; a trial with wrong types is skipped."""
    if not isinstance(value, dict):
        return None
    criterion, sensitivity, result = (_object(value.get(k)) for k in ("criterion", "sensitivity", "result"))
    recorded = value.get("trials") if isinstance(value.get("trials"), list) else []
    trials = []
    for entry in recorded[:MAX_TRIALS]:
        try:
            trials.append(_trial(entry))
        except _Wrong:
            continue
    return FallbackSearch(
        metric=_lenient(_string, criterion.get("metric")) or None,
        loss_kind=_lenient(_string, criterion.get("loss")) or None,
        max_loss=_lenient(_number, criterion.get("max_loss")),
        max_evals=_lenient(_count, criterion.get("max_evals")),
        max_fallback=_lenient(_count, criterion.get("max_fallback")),
        method=_lenient(_string, sensitivity.get("method")) or None,
        units=_lenient(_count, sensitivity.get("units")),
        sensitivity_seconds=_lenient(_number, sensitivity.get("seconds")),
        sensitivity_text=_text_ref(sensitivity.get("text")),
        search_text=_text_ref(value.get("search_text")),
        heldout_text=_text_ref(value.get("heldout_text")),
        baseline=_lenient(_number, value.get("baseline")),
        trials=tuple(trials),
        trials_recorded=len(recorded),
        evaluations=_lenient(_count, value.get("evaluations")),
        status=_lenient(_string, result.get("status")) or None,
        kept_units=_lenient(_count, result.get("kept_units")),
        kept_modules=_lenient(_count, result.get("kept_modules")),
        loss=_lenient(_number, result.get("loss")),
        heldout_loss=_lenient(_number, result.get("heldout_loss")),
        heldout_met=_lenient(_flag, result.get("heldout_met")),
        seconds=_lenient(_number, value.get("seconds")),
    )
