"""The metrics qformat reports, what "loss" means for each, and how a result is recorded.

Each metric has a direction. The *loss* of a quantized model under a metric is what a budget (`--max-loss 1%`)
bounds, always a non-negative fraction where 0 means "as good as the source":
- perplexity and teacher-forced loss: the relative increase, (quantized - source) / source;
- KL divergence from the source's next-token distribution: the value itself, in nats (0 for the source);
- agreements and cosines (1 for the source): 1 - value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from qformat.errors import OptionError
from qformat.plan.record import significant

__all__ = [
    "METRICS",
    "Metric",
    "loss_of",
    "metric",
    "result_record",
    "rouge_l",
    "spearman",
]


@dataclass(frozen=True)
class Metric:
    """A metric's name as recorded, its direction, and how its loss is measured (see the module docstring)."""

    name: str
    higher_is_better: bool
    loss: str  # "relative_increase" | "value" | "one_minus"
    description: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("perplexity", False, "relative_increase", "perplexity (exp of the mean next-token loss)"),
    Metric("loss", False, "relative_increase", "mean teacher-forced token loss (nats)"),
    Metric("kl_divergence", False, "value", "mean KL divergence from the source's next-token distribution (nats)"),
    Metric("top1_agreement", True, "one_minus", "fraction of positions whose most likely next token is the source's"),
    Metric("mean_cosine", True, "one_minus", "mean cosine similarity of pooled embeddings to the source's"),
    Metric("min_cosine", True, "one_minus", "worst cosine similarity of a pooled embedding to the source's"),
    Metric("rank_agreement", True, "one_minus",
           "Spearman correlation of all pairwise similarities with the source's"),
    Metric("rougeL", True, "one_minus", "ROUGE-L F1 of greedy outputs against the source's greedy outputs"),
)}

#: Short names accepted by --metric.
ALIASES = {"ppl": "perplexity", "kl": "kl_divergence", "top1": "top1_agreement", "cosine": "mean_cosine",
           "rouge": "rougeL", "rouge-l": "rougeL", "rank": "rank_agreement"}


def metric(name: str) -> Metric:
    """The metric named `name` (or a short name: ppl, kl, top1, cosine, rouge, rank)."""
    key = ALIASES.get(name.lower(), name)
    if key not in METRICS:
        raise OptionError(f"unknown metric {name!r}; choose one of: {', '.join([*ALIASES, *METRICS])}")
    return METRICS[key]


def loss_of(m: Metric, baseline: float | None, value: float) -> float:
    """The loss (a fraction, 0 = as good as the source) of `value` against the source's `baseline`."""
    if m.loss == "value":
        return max(value, 0.0)
    if m.loss == "one_minus":
        return 1.0 - value
    if baseline is None or baseline == 0:
        raise OptionError(f"{m.name} needs the source's value to measure a relative change")
    return (value - baseline) / abs(baseline)


def _relative_change(baseline: float | None, value: float) -> float | None:
    if baseline is None or baseline == 0:
        return None
    return (value - baseline) / abs(baseline)


def _recovery(m: Metric, baseline: float | None, value: float) -> float | None:
    if baseline is None or baseline == 0 or value == 0 or m.loss == "value":
        return None
    return value / baseline if m.higher_is_better else baseline / value


def _sig(x: float | None) -> float | None:
    return None if x is None else significant(x)


def result_record(name: str, *, task: str, text: dict[str, Any], baseline: float | None, quantized: float,
                  command: str) -> dict[str, Any]:
    """One entry of `quantization_config.evaluation` (docs/FORMAT.md §11.4): the metric, the text's identity
    (`text`: dataset, text_sha256, tokens), the source's and the quantized model's values, the signed relative
    change, the recovery (a fraction, 1 = the source's quality) and the command that measured it."""
    m = METRICS[name]
    if not math.isfinite(quantized):
        quantized = float("inf")
    return {
        "task": task,
        **text,
        "metric": name,
        "higher_is_better": m.higher_is_better,
        "baseline": _sig(baseline),
        "quantized": _sig(quantized) if math.isfinite(quantized) else None,
        "relative_change": _sig(_relative_change(baseline, quantized)) if math.isfinite(quantized) else None,
        "recovery": _sig(_recovery(m, baseline, quantized)) if math.isfinite(quantized) else None,
        "command": command,
    }


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position, which is fine for float scores)."""
    if a.numel() < 2:
        return 1.0
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / denom) if denom else 1.0


def rouge_l(references: list[str], predictions: list[str]) -> float:
    """Mean ROUGE-L F1 of `predictions` against `references`, scored by Google's `rouge-score` package (the scorer
    the summarization literature reports), with stemming. Two empty strings agree perfectly."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise OptionError("ROUGE-L needs the rouge-score package: pip install 'qformat-hf[eval]'") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = []
    for ref, pred in zip(references, predictions, strict=True):
        if not ref.strip() and not pred.strip():
            scores.append(1.0)
        else:
            scores.append(scorer.score(ref, pred)["rougeL"].fmeasure)
    return sum(scores) / len(scores) if scores else 1.0
