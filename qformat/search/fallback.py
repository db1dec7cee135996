"""The accuracy-driven fallback search: rank units by sensitivity once, bisect on the ranked list, confirm once.

1. Score every unit in one pass (`fisher_sensitivity`, on the calibration text) and rank them, most sensitive first.
2. Let f(k) be the loss with the top k units kept in full precision. f(0) is measured first; f(M) = 0 needs no
   measurement (the full-precision model), unless `max_fallback` caps k below M, in which case f(cap) is measured
   to know whether the budget is reachable at all. Where the task can bound its metric (perplexity: a one-sided
   95 % bound from the paired per-token loss differences), a trial meets the budget only if the bound does, so
   that the bisection does not pick a lucky draw. Bisection then finds the smallest k with f(k) <= budget:
   about log2(M) trials, each one full evaluation of the quantized model on the search text. INC's default
   strategy needs about N + k evaluations for N modules.
3. The chosen set is evaluated once more on held-out text that neither the ranking nor the search saw; that
   figure, not the search's, is what the checkpoint records as its evaluation.
Stop rules: the budget is met; or it is unreachable within `max_fallback`, or `max_evals` is spent: the outcome then
says so (status "unreachable" / "max_evals") and carries the best set measured; the caller writes that model and
reports, the user decides. Every trial is logged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qformat.errors import OptionError
from qformat.eval.data import load_text
from qformat.eval.metrics import loss_of, metric as metric_named, result_record
from qformat.eval.tasks import Reference, Task, make_task
from qformat.plan.record import significant
from qformat.plan.rules import ConversionPlan
from qformat.search.criterion import FallbackBudget
from qformat.search.sensitivity import fisher_sensitivity
from qformat.search.units import Unit, units_of
from qformat.search.variants import QuantizedVariants
from qformat.spec.config import FallbackEntry

__all__ = ["SearchOutcome", "search_fallback"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOutcome:
    """What the search decided: the modules to keep (checkpoint name -> entry with reason `sensitivity`), the
    `fallback_search` log and the held-out `evaluation` records for config.json."""

    fallback: dict[str, FallbackEntry]
    record: dict[str, Any]
    evaluation: list[dict[str, Any]] = field(default_factory=list)

    @property
    def status(self) -> str:
        return str(self.record["result"]["status"])

    def summary(self) -> str:
        """One line for the user: what was kept, what it cost, whether the budget holds on held-out text."""
        r, c = self.record["result"], self.record["criterion"]
        budget = f"{c['metric']} loss <= {100 * c['max_loss']:g} %"
        kept = f"{r['kept_units']} of {self.record['sensitivity']['units']} units ({r['kept_modules']} modules)"
        measured = (f"search text {100 * r['loss']:+.2f} %, held-out {100 * r['heldout_loss']:+.2f} %"
                    if r.get("heldout_loss") is not None else f"search text {100 * r['loss']:+.2f} %")
        evals = f"{self.record['evaluations']} evaluations"
        if r["status"] == "met":
            held = "" if r.get("heldout_met", True) else "; NOT met on held-out text"
            return f"auto-fallback: {budget} met keeping {kept}: {measured}, {evals}{held}"
        why = {"unreachable": "unreachable within --max-fallback", "max_evals": "not met within --max-evals"}[
            r["status"]]
        return (f"auto-fallback: {budget} {why}; the best reached keeps {kept}: {measured}, {evals}. "
                "The checkpoint was written with that set; raise --max-fallback or --max-evals, or accept it")


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def _entries(ranked: list[tuple[Unit, float]], k: int) -> dict[str, FallbackEntry]:
    entries = {}
    for rank, (unit, score) in enumerate(ranked[:k], start=1):
        group = f"; fused group of {len(unit.members)}" if len(unit.members) > 1 else ""
        for member in unit.members:
            entries[member.name] = FallbackEntry(
                module=member.name, reason="sensitivity",
                detail=f"sensitivity rank {rank} of {len(ranked)} units (Fisher score {score:.3g}){group}",
                measured={"score": significant(score), "rank": rank, "units": len(ranked)})
    return entries


def search_fallback(model: nn.Module, tokenizer: Any, plan: ConversionPlan, budget: FallbackBudget, *,
                    folder: Any = None, progress: bool = False, eval_command: str = "",
                    outlier_threshold: float | None = None) -> SearchOutcome:
    """Run the search (module docstring) on the live full-precision `model` planned by `plan`; the model is left
    in full precision. `folder` is where the model came from (encoder pooling config); `eval_command` is the
    `qformat eval` line that reproduces the held-out evaluation; `outlier_threshold` is the recipe's (the trials
    run the decomposition the checkpoint will)."""
    start = time.perf_counter()
    units = units_of(plan)
    texts = {"calib": load_text(budget.calib), "search": load_text(budget.eval_text),
             "heldout": load_text(budget.heldout_text)}
    if len({t.sha256 for t in texts.values()}) != 3:
        raise OptionError("the calibration, search and held-out texts have the same content; give three "
                          "different texts (--calib, --eval-text, --heldout-text)")
    tokens = {"calib": max(budget.max_tokens // 4, 64), "search": budget.max_tokens,
              "heldout": 2 * budget.max_tokens}
    tasks: dict[str, Task] = {k: make_task(model, tokenizer, t, max_tokens=tokens[k], folder=folder)
                              for k, t in texts.items()}
    search_task = tasks["search"]
    chosen = metric_named(budget.metric or search_task.default_metric)
    variants = QuantizedVariants(model, plan, units, outlier_threshold=outlier_threshold)
    try:
        return _search(variants, units, tasks, chosen, budget, start, progress, eval_command)
    finally:
        variants.restore()


def _bisect(trial: Any, units: list[Unit], cap: int, max_trials: int) -> tuple[dict[str, Any] | None, str]:
    """Find the smallest k <= cap whose trial meets the budget (module docstring, step 2). Returns the trial that
    met it (None where that is k = M, the full-precision model, which needs no trial) and the status."""
    if not units:
        return None, "met"
    trials = 0

    def run(k: int) -> dict[str, Any]:
        nonlocal trials
        trials += 1
        return trial(k)

    first = run(0)
    if first["met"]:
        return first, "met"
    lo, hi, best = 0, cap, None
    if cap < len(units):  # f(cap) is not known to be 0: measure whether the budget is reachable at all
        if cap == 0:
            return None, "unreachable"
        if trials >= max_trials:
            return None, "max_evals"
        best = run(cap)
        if not best["met"]:
            return None, "unreachable"
    while hi - lo > 1:
        if trials >= max_trials:
            return best, "met" if best is not None else "max_evals"
        mid = (lo + hi) // 2
        entry = run(mid)
        if entry["met"]:
            hi, best = mid, entry
        else:
            lo = mid
    return best, "met"


def _search(variants: QuantizedVariants, units: list[Unit], tasks: dict[str, Task], chosen: Any,
            budget: FallbackBudget, start: float, progress: bool, eval_command: str) -> SearchOutcome:
    model = variants.model
    search_task, heldout_task = tasks["search"], tasks["heldout"]
    if chosen.name not in search_task.comparison_metrics and chosen.name != search_task.default_metric:
        raise OptionError(f"--metric {chosen.name} does not apply to a {search_task.kind} model; choose one of "
                          f"{', '.join(dict.fromkeys([search_task.default_metric, *search_task.comparison_metrics]))}")
    variants.apply(u.name for u in units)  # full precision: the references
    with torch.inference_mode():  # cache=None: no comparisons needed, only the source's own values
        search_ref: Reference = search_task.reference(
            model, cache=True if chosen.name in search_task.comparison_metrics else None)
        heldout_ref: Reference = heldout_task.reference(model, cache=True)
    scores, sens_seconds = _timed(fisher_sensitivity, variants, tasks["calib"], progress=progress)
    ranked = sorted(((u, scores[u.name]) for u in units), key=lambda p: -p[1])
    baseline = search_ref.values[chosen.name]
    trials: list[dict[str, Any]] = []

    def trial(k: int) -> dict[str, Any]:
        kept = [u.name for u, _ in ranked[:k]]
        variants.apply(kept)
        with torch.inference_mode():
            values, seconds = _timed(search_task.measure, model, search_ref)
        loss = loss_of(chosen, baseline, values[chosen.name])
        upper = search_task.upper.get(chosen.name)
        bound = loss_of(chosen, baseline, upper) if upper is not None else loss
        entry = {"kept_units": k, "kept_modules": sum(len(u.members) for u, _ in ranked[:k]),
                 "metric": significant(values[chosen.name]), "loss": significant(loss), "loss_upper_95": significant(bound),
                 "met": bound <= budget.max_loss, "seconds": round(seconds, 2), "fallback": kept}
        trials.append(entry)
        logger.info("trial: %d units kept, %s %.6g (loss %+.3f %%)", k, chosen.name, values[chosen.name],
                    100 * loss)
        return entry

    max_trials = (budget.max_evals - 1) if budget.max_evals is not None else len(units) + 2
    best_met, status = _bisect(trial, units, budget.unit_cap(len(units)), max_trials)
    if best_met is None and status == "met":  # everything kept: the full-precision model, loss 0 by definition
        best_met = {"kept_units": len(units), "kept_modules": sum(len(u.members) for u in units), "loss": 0.0}
    final = best_met if best_met is not None else (min(trials, key=lambda t: t["loss"]) if trials else None)
    k = final["kept_units"] if final is not None else 0
    variants.apply([u.name for u, _ in ranked[:k]])
    with torch.inference_mode():
        held, held_seconds = _timed(heldout_task.measure, model, heldout_ref)
    held_loss = loss_of(chosen, heldout_ref.values[chosen.name], held[chosen.name])
    evaluation = [result_record(name, task=heldout_task.hub_task, text=heldout_task.identity(),
                                baseline=heldout_ref.values.get(name), quantized=value, command=eval_command)
                  for name, value in held.items()]
    record = {
        "criterion": {"metric": chosen.name, "loss": chosen.loss, "max_loss": budget.max_loss,
                      "met_when": "loss_upper_95" if search_task.upper else "loss",
                      "max_evals": budget.max_evals, "max_fallback": budget.max_fallback},
        "sensitivity": {"method": "fisher", "units": len(units), "seconds": round(sens_seconds, 2),
                        "text": tasks["calib"].identity()},
        "search_text": search_task.identity(),
        "heldout_text": heldout_task.identity(),
        "baseline": significant(baseline),
        "trials": trials,
        "evaluations": len(trials) + 1,
        "result": {"status": status, "kept_units": k,
                   "kept_modules": sum(len(u.members) for u, _ in ranked[:k]),
                   "loss": final["loss"] if final is not None else 0.0, "heldout_loss": significant(held_loss),
                   "heldout_met": held_loss <= budget.max_loss, "heldout_seconds": round(held_seconds, 2)},
        "seconds": round(time.perf_counter() - start, 2),
    }
    return SearchOutcome(_entries(ranked, k), record, evaluation)
