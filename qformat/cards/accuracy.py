"""How a card words what was measured: the evaluation table, the accuracy lines of Limitations, and the log of an
automatic fallback search.

Everything is taken from the records as recorded (`qformat.cards.records`); record strings are shown through
`markdown.text`, so they can only ever be data. A change of more than LARGE_LOSS relative, against the metric's
direction, is called a large loss, and the card says so plainly: a 2:4 model whose perplexity went from 15 to 1578
is not "slightly less accurate", it is not usable without retraining.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from qformat.cards.markdown import code, text
from qformat.cards.records import FallbackSearch, Measurement, SearchTrial, TextRef

__all__ = ["LARGE_LOSS", "SIMILARITY_TO_SOURCE", "SearchReport", "accuracy_line", "budget_words", "change_phrase",
           "evaluation_rows", "large_losses", "number", "percent", "result_words", "search_report", "search_summary",
           "signed_percent", "sparsity_line", "worst"]

#: A relative change beyond this, against the metric's direction, is a large loss.
LARGE_LOSS = 0.10
#: How a card names the threshold.
LARGE_WORDS = f"more than {100 * LARGE_LOSS:.0f} % relative"

#: Metrics that measure how close the quantized model stays to its source (the source scores perfectly against
#: itself: KL 0, agreement and cosine 1). Their relative change is not a change in quality (where the source's
#: top choice was a near tie, a different top-1 token costs nothing), so the card reports them but judges the loss
#: by the other metrics.
SIMILARITY_TO_SOURCE = frozenset({"kl_divergence", "top1_agreement", "mean_cosine", "min_cosine", "rank_agreement",
                                  "rougeL"})

#: How many measured changes the Limitations line spells out (the table has them all).
_SPELLED = 3


def number(value: float) -> str:
    """A measured value in prose: 4 significant digits, thousands grouped past 9999 (1578, 13.91, 12,345)."""
    return f"{value:,.0f}" if abs(value) >= 10_000 else f"{value:.4g}"


def percent(fraction: float) -> str:
    """A fraction as an unsigned percentage: 0.985 -> "98.5 %"."""
    return f"{100 * fraction:.1f} %"


def signed_percent(fraction: float) -> str:
    """A relative change as a signed percentage, as precise as its size needs: +0.93 %, -1.8 %, +10,420 %."""
    pct = 100 * fraction
    size = abs(pct)
    body = f"{size:,.0f}" if size >= 100 else f"{size:.1f}" if size >= 1 else f"{size:.2f}"
    sign = "+" if pct > 0 else "-" if pct < 0 else ""
    return f"{sign}{body} %"


def _cell_value(value: float | None, missing: str = "-") -> str:
    return missing if value is None else f"{value:g}"


def _tokens(tokens: int | None) -> str:
    return "" if tokens is None else f" ({tokens:,} token{'s' if tokens != 1 else ''})"


def evaluation_rows(results: Iterable[Measurement]) -> list[dict[str, str]]:
    """The evaluation table's rows, Markdown-ready: Metric, Text (label and tokens), Source, Quantized, Change (the
    recorded relative change, signed) and Recovery (the recorded recovery); "-" where a value is not recorded."""
    return [{"metric": text(m.metric),
             "text": (text(m.dataset) if m.dataset else "-") + _tokens(m.tokens),
             "source": _cell_value(m.baseline),
             "quantized": _cell_value(m.quantized, "not finite"),
             "change": "-" if m.relative_change is None else signed_percent(m.relative_change),
             "recovery": "-" if m.recovery is None else percent(m.recovery)} for m in results]


def _loss(m: Measurement) -> float | None:
    """How much worse the quantized model is, as a relative change against the metric's direction (positive =
    worse); infinite where the quantized value is not finite; None where the record does not say, or where the
    metric measures closeness to the source rather than quality (SIMILARITY_TO_SOURCE)."""
    if m.quantized is None:
        return float("inf")
    if m.relative_change is None or m.higher_is_better is None or m.metric in SIMILARITY_TO_SOURCE:
        return None
    return -m.relative_change if m.higher_is_better else m.relative_change


def large_losses(results: Iterable[Measurement]) -> list[Measurement]:
    """The results whose loss is large (LARGE_LOSS)."""
    return [m for m in results if (loss := _loss(m)) is not None and loss > LARGE_LOSS]


def worst(results: Iterable[Measurement]) -> Measurement | None:
    """The result with the largest loss among those that have a phrase, else None."""
    ranked = [m for m in results if change_phrase(m)]
    return max(ranked, key=lambda m: _loss(m) if _loss(m) is not None else float("-inf"), default=None)


def change_phrase(m: Measurement) -> str:
    """"perplexity rose from 15 to 1578 (+10,420 %) on pydoc-topics/heldout"; "" where no source value is recorded
    to compare against."""
    where = f" on {text(m.dataset)}" if m.dataset else ""
    name = text(m.metric)
    if m.baseline is None:
        return ""
    if m.quantized is None:
        return f"{name} is not finite for the quantized model (the source's: {number(m.baseline)}){where}"
    if m.relative_change is None:  # e.g. a KL divergence, whose source value is 0
        return f"{name} is {number(m.quantized)} (the source's: {number(m.baseline)}){where}"
    if m.quantized == m.baseline:
        return f"{name} stayed at {number(m.quantized)}{where}"
    verb = "rose" if m.quantized > m.baseline else "fell"
    return (f"{name} {verb} from {number(m.baseline)} to {number(m.quantized)} "
            f"({signed_percent(m.relative_change)}){where}")


def accuracy_line(results: tuple[Measurement, ...], *, weight_error: bool, sparse_pruned: bool) -> str:
    """Limitations' first line: what quantization did to accuracy, as measured (or that it was not measured)."""
    measured = "the weight error above is measured, " if weight_error else ""
    if not results:
        return (f"Quantization changes the model's outputs slightly; {measured}the effect on accuracy is not measured "
                "for this checkpoint")
    phrases = [p for p in (change_phrase(m) for m in results) if p]
    if not phrases:
        return ("Quantization changes the model's outputs; the evaluation table has the measured values, without a "
                "source value to compare them with")
    more = len(phrases) - _SPELLED
    line = "Quantization changes the model's outputs; measured: " + "; ".join(phrases[:_SPELLED])
    line += f" (and {more} more in the evaluation table)" if more > 0 else ""
    if large_losses(results):
        line += (f". A change of {LARGE_WORDS} against the metric's direction is a large loss: "
                 + ("this model is not usable without retraining (see the 2:4 sparsity note)" if sparse_pruned else
                    "this model is not a drop-in replacement for the source; keep more modules in full precision "
                    "(`qformat convert --ignore`) or choose another scheme"))
    return line


def sparsity_line(results: tuple[Measurement, ...]) -> str:
    """Limitations' line about 2:4 sparsity from magnitude pruning: the measured loss when there is one."""
    pruned = "2:4 sparsity was applied by magnitude pruning without retraining"
    decode = ". CPUs decode it to the dense quantized weight at load"
    m = worst(results)
    if m is None:
        return f"{pruned}; it costs accuracy unless the source model was trained for it{decode}"
    if m in large_losses(results):
        return (f"{pruned}, and it cost accuracy here: {change_phrase(m)}. That is {LARGE_WORDS}: this model is not "
                f"usable without retraining (sparse fine-tuning of the source){decode}")
    judged = "" if _loss(m) is None else f" (below the {100 * LARGE_LOSS:.0f} % relative loss this card calls large)"
    return f"{pruned}; measured here: {change_phrase(m)}{judged}{decode}"


# -- the automatic fallback search -----------------------------------------------------------------------------------


def budget_words(s: FallbackSearch) -> str:
    """The search's criterion: "perplexity may rise at most 1 % over the source's"."""
    metric = text(s.metric) if s.metric else "the metric"
    if s.max_loss is None:
        return f"a loss budget on {metric} whose size is not recorded"
    if s.loss_kind == "relative_increase":
        return f"{metric} may rise at most {100 * s.max_loss:.3g} % over the source's"
    if s.loss_kind == "value":
        return f"{metric} may be at most {number(s.max_loss)}"
    if s.loss_kind == "one_minus":
        return f"{metric} must stay at {number(1 - s.max_loss)} or above"
    return f"the loss in {metric} may be at most {number(s.max_loss)}"


def _loss_words(s: FallbackSearch, loss: float | None) -> str:
    if loss is None:
        return "a loss that is not recorded"
    if s.loss_kind == "relative_increase":
        return signed_percent(loss)
    metric = text(s.metric) if s.metric else "metric"
    if s.loss_kind == "value":
        return f"{metric} {number(loss)}"
    if s.loss_kind == "one_minus":
        return f"{metric} {number(1 - loss)}"
    return f"a loss of {number(loss)}"


def _kept(s: FallbackSearch) -> str:
    units = "an unrecorded number of units" if s.kept_units is None else \
        f"{s.kept_units} unit{'s' if s.kept_units != 1 else ''}"
    modules = "" if s.kept_modules is None else f" ({s.kept_modules} Linear module{'s' if s.kept_modules != 1 else ''})"
    return f"{units}{modules} kept"


def _text_words(ref: TextRef | None) -> str:
    return "an unrecorded text" if ref is None else text(ref.dataset) + _tokens(ref.tokens)


def _shortfall(s: FallbackSearch) -> str:
    """Why a search that did not meet its budget stopped, and the best it reached."""
    best = f"the best reached was {_loss_words(s, s.loss)} with {_kept(s)}"
    if s.status == "unreachable":
        if s.max_fallback is not None and s.kept_units == s.max_fallback:
            return f"{best} (the --max-fallback limit)"
        if s.units is not None and s.kept_units == s.units:
            return f"{best} (every unit kept)"
        return best
    if s.status == "max_evals":
        limit = "its limit" if s.max_evals is None else f"its limit of {s.max_evals}"
        return f"the search stopped at {limit} full evaluations (--max-evals); {best}"
    return f"the result is recorded as {text(s.status) if s.status else 'nothing'}; {best}"


def result_words(s: FallbackSearch) -> str:
    """"met: +0.93 % on the search text with 5 units (7 Linear modules) kept", or "not met: the best reached was
    +1.8 % with 24 units kept (the --max-fallback limit)"."""
    if s.status == "met":
        return f"met: {_loss_words(s, s.loss)} on the search text with {_kept(s)}"
    return f"not met: {_shortfall(s)}"


def _heldout_words(s: FallbackSearch) -> str:
    verdict = {True: ": within the budget", False: ": over the budget", None: ""}[s.heldout_met]
    return f"{_loss_words(s, s.heldout_loss)} on {_text_words(s.heldout_text)}, text the search did not see{verdict}"


def search_summary(s: FallbackSearch) -> str:
    """The summary's sentence for a search that did not meet its budget ("" where it met it)."""
    if s.met:
        return ""
    if s.status == "met":  # met on the search text, not on held-out text
        return (f"**The automatic fallback search met its budget ({budget_words(s)}) on the text it searched on, but "
                f"not on held-out text**: {_heldout_words(s)}. See \"Modules kept in full precision\".")
    return (f"**The automatic fallback search did not meet its budget** ({budget_words(s)}): {_shortfall(s)}. See "
            "\"Modules kept in full precision\".")


@dataclass(frozen=True)
class SearchReport:
    """What the card shows of a fallback search: an intro sentence, label/value rows, the trials' rows and a note
    on trials not shown. Every string is Markdown-ready."""

    intro: str
    rows: list[tuple[str, str]]
    trials: list[dict[str, str]]
    more: str


def _trial_row(index: int, s: FallbackSearch, t: SearchTrial) -> dict[str, str]:
    return {"index": str(index), "units": str(t.kept_units),
            "modules": "-" if t.kept_modules is None else str(t.kept_modules),
            "metric": _cell_value(t.metric), "loss": "-" if t.loss is None else _loss_words(s, t.loss),
            "met": {True: "yes", False: "no", None: "-"}[t.met],
            "seconds": "-" if t.seconds is None else f"{t.seconds:.1f}"}


def search_report(s: FallbackSearch) -> SearchReport:
    """The card's account of an automatic fallback search: criterion, sensitivity pass, result, held-out check,
    full evaluations used against the number of units, time, and every trial (as far as MAX_TRIALS)."""
    rows = [("Budget", f"{budget_words(s)}, searched on {_text_words(s.search_text)}"
             + ("" if s.baseline is None else f"; the source's value there: {number(s.baseline)}"))]
    if s.method or s.units is not None:
        method = code(s.method, table=True) if s.method else "sensitivity"
        units = "" if s.units is None else f" of {s.units} unit{'s' if s.units != 1 else ''}"
        on = "" if s.sensitivity_text is None else f" on {_text_words(s.sensitivity_text)}"
        took = "" if s.sensitivity_seconds is None else f", {s.sensitivity_seconds:.1f} s"
        rows.append(("Sensitivity", f"{method} scores{units}{on}, measured once and ranked{took}"))
    rows.append(("Result", result_words(s)))
    if s.heldout_loss is not None or s.heldout_text is not None:
        rows.append(("Held-out check", _heldout_words(s)))
    if s.evaluations is not None:
        per = "" if s.units is None else f" for {s.units} unit{'s' if s.units != 1 else ''}"
        rows.append(("Full evaluations", f"{s.evaluations}{per} (the trials and the held-out check)"))
    if s.seconds is not None:
        rows.append(("Time", f"{s.seconds:.1f} s"))
    intro = ("An automatic fallback search (`--auto-fallback`) measured every unit's sensitivity once (a fused group "
             "is one unit), ranked them, and looked for the fewest top-ranked units to keep in full precision that "
             "meet the budget; the modules it kept have the reason `sensitivity` above.")
    shown = len(s.trials)
    more = "" if s.trials_recorded <= shown else \
        f"{s.trials_recorded - shown} more recorded trial(s) are in config.json and not shown here."
    return SearchReport(intro, rows, [_trial_row(i + 1, s, t) for i, t in enumerate(s.trials)], more)
