"""Run the fallback search for a model folder (what `qformat convert --auto-fallback` does before converting) or
for a live model (`quantize_` with `auto_fallback`)."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from torch import nn

from qformat.errors import OptionError
from qformat.models.structure import structure_of
from qformat.plan.recipe import QuantRecipe
from qformat.plan.rules import plan_conversion
from qformat.search.fallback import SearchOutcome, search_fallback

__all__ = ["search_folder", "search_model"]

logger = logging.getLogger(__name__)


def _eval_command(recipe: QuantRecipe, source_label: str) -> str:
    budget = recipe.auto_fallback
    assert budget is not None
    return shlex.join(["qformat", "eval", "OUTPUT", "--against", source_label, "--text",
                       Path(str(budget.heldout_text)).name, "--max-tokens", str(2 * budget.max_tokens)])


def search_model(model: nn.Module, tokenizer: Any, recipe: QuantRecipe, *, folder: Path | None = None,
                 source_label: str = "SOURCE", progress: bool = False) -> SearchOutcome:
    """Search on a live full-precision `model` (left in full precision) with `recipe.auto_fallback`."""
    if recipe.auto_fallback is None:
        raise OptionError("the recipe asks for no fallback search (auto_fallback is not set)")
    plan = plan_conversion(structure_of(model), recipe)
    outcome = search_fallback(model, tokenizer, plan, recipe.auto_fallback, folder=folder, progress=progress,
                              eval_command=_eval_command(recipe, source_label),
                              outlier_threshold=recipe.outlier_threshold)
    (logger.info if outcome.status == "met" else logger.warning)("%s", outcome.summary())
    return outcome


def search_folder(folder: Path, recipe: QuantRecipe, *, source_label: str = "SOURCE",
                  progress: bool = False) -> SearchOutcome:
    """Load the full-precision model in `folder` (float32) with its tokenizer and search on it."""
    import gc

    from qformat.eval.api import load_model, load_tokenizer

    tokenizer = load_tokenizer(folder)  # before the model: a folder without one fails at once
    model = load_model(folder)
    try:
        return search_model(model, tokenizer, recipe, folder=folder, source_label=source_label, progress=progress)
    finally:
        del model
        gc.collect()
