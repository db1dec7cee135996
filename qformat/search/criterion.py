"""`FallbackBudget`: what an accuracy-driven fallback search must achieve and may spend (no torch here).

It is part of a `QuantRecipe` (`auto_fallback=`), so `qformat convert --auto-fallback`, `QFormatConfig` and
`quantize_` take the same options, validated once, recorded once in provenance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qformat.errors import OptionError

__all__ = ["DEFAULT_MAX_LOSS", "FallbackBudget", "parse_fraction"]

#: The default budget: 1 % (relative perplexity increase for a causal LM, 1 - cosine for an encoder).
DEFAULT_MAX_LOSS = 0.01


def parse_fraction(value: str | float, what: str = "--max-loss") -> float:
    """"1%" -> 0.01, "0.5 %" -> 0.005, "0.01" or 0.01 -> 0.01. Must be finite and >= 0."""
    text = str(value).strip()
    try:
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise OptionError(f"{what} {value!r} is not a number; write it like 1% or 0.01") from None
    if not 0 <= number < float("inf"):
        raise OptionError(f"{what} must be a finite fraction >= 0, got {value!r}")
    return number


@dataclass(frozen=True, kw_only=True)
class FallbackBudget:
    """The search's goal and limits.

    max_loss: the largest acceptable loss on the search text, as a fraction ("1%" accepted): the relative increase
        for perplexity and loss, 1 - value for cosines and agreements, the value for KL (qformat.eval.metrics).
    metric: what is measured; None = the model kind's default (perplexity, mean_cosine, loss).
    calib, eval_text, heldout_text: the texts for the sensitivity estimate, the search, and the final confirmation
        (a file, or a built-in split "calibration"/"search"/"heldout"); they must differ.
    max_evals: the most full evaluations of quantized models (search trials plus the confirmation); None = as many
        as bisection needs (about log2 of the number of units, plus 2).
    max_fallback: the most units the search may keep in full precision (an int, or a fraction of all units such as
        "10%"); None = all of them.
    max_tokens: tokens of the search text (the calibration text uses a quarter, the held-out text twice as many).
        4096 by default: the standard error of a relative perplexity change measured on n tokens is about
        24 % / sqrt(n) on SmolLM2 W8A8 (0.75 % at 1024 tokens, 0.37 % at 4096), so a 1 % budget needs thousands.
    """

    max_loss: float = DEFAULT_MAX_LOSS
    metric: str | None = None
    calib: str = "calibration"
    eval_text: str = "search"
    heldout_text: str = "heldout"
    max_evals: int | None = None
    max_fallback: int | float | None = None
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_loss", parse_fraction(self.max_loss))
        if self.metric is not None:
            from qformat.eval.metrics import metric

            object.__setattr__(self, "metric", metric(self.metric).name)
        texts = [str(self.calib), str(self.eval_text), str(self.heldout_text)]
        if len(set(texts)) != 3:
            raise OptionError("the calibration, search and held-out texts must differ (a result measured on the "
                              f"text it was tuned on is not a result); got {', '.join(texts)}")
        if self.max_evals is not None and (not isinstance(self.max_evals, int) or self.max_evals < 2):
            raise OptionError("--max-evals must be at least 2 (one trial and the held-out confirmation)")
        if isinstance(self.max_fallback, str):
            text = self.max_fallback.strip()
            object.__setattr__(self, "max_fallback",
                               parse_fraction(text, "--max-fallback") if text.endswith("%") else _int(text))
        if isinstance(self.max_fallback, float) and not 0 <= self.max_fallback <= 1:
            raise OptionError("--max-fallback as a fraction must be between 0% and 100%")
        if isinstance(self.max_fallback, int) and self.max_fallback < 0:
            raise OptionError("--max-fallback must be >= 0")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 64:
            raise OptionError("the search needs at least 64 tokens of text")

    def unit_cap(self, units: int) -> int:
        """The most units that may be kept, out of `units`."""
        if self.max_fallback is None:
            return units
        if isinstance(self.max_fallback, float):
            return min(units, int(self.max_fallback * units))
        return min(units, self.max_fallback)

    def to_record(self) -> dict[str, Any]:
        return {"max_loss": self.max_loss, "metric": self.metric, "calib": _label(self.calib),
                "eval_text": _label(self.eval_text), "heldout_text": _label(self.heldout_text),
                "max_evals": self.max_evals, "max_fallback": self.max_fallback, "max_tokens": self.max_tokens}

    def command_args(self) -> list[str]:
        parts = ["--auto-fallback", "--max-loss", f"{100 * self.max_loss:g}%"]
        if self.metric is not None:
            parts += ["--metric", self.metric]
        for flag, value, default in (("--calib", self.calib, "calibration"), ("--eval-text", self.eval_text, "search"),
                                     ("--heldout-text", self.heldout_text, "heldout")):
            if str(value) != default:
                parts += [flag, _label(value)]
        if self.max_evals is not None:
            parts += ["--max-evals", str(self.max_evals)]
        if self.max_fallback is not None:
            parts += ["--max-fallback", f"{100 * self.max_fallback:g}%" if isinstance(self.max_fallback, float)
                      else str(self.max_fallback)]
        if self.max_tokens != 4096:
            parts += ["--search-tokens", str(self.max_tokens)]
        return parts


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise OptionError(f"--max-fallback {text!r} must be a count (24) or a percentage (10%)") from None


def _label(value: Any) -> str:
    """A file's name, never its path: provenance records no local paths."""
    from pathlib import PurePath

    return PurePath(str(value)).name
