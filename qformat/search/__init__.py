"""Accuracy-driven fallback: which modules to keep in full precision so that a measured loss fits a budget.

`criterion.FallbackBudget` (the goal and limits, part of a `QuantRecipe`), `units` (fused groups fall back as one),
`variants` (every planned module quantized once, swapped per trial), `sensitivity` (a one-pass Fisher estimate per
unit), `fallback.search_fallback` (bisection on the ranked units, held-out confirmation, the logged record) and
`api` (run it for a model folder or a live model).
"""

from qformat.search.criterion import DEFAULT_MAX_LOSS, FallbackBudget, parse_fraction

__all__ = ["DEFAULT_MAX_LOSS", "FallbackBudget", "parse_fraction"]
