"""`SmoothQuant`: the options of SmoothQuant (Xiao et al. 2023) as part of a `QuantRecipe` (no torch here).

Smoothing divides each input channel j of a Linear by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and multiplies the
weight's column j by s_j, folding 1/s_j into the layer that produces X (the preceding norm, or a preceding Linear where
the fold is exact). The product is unchanged in exact arithmetic; the activation outliers move into the weights,
which per-channel weight scales absorb better than per-token activation scales. `max|X_j|` comes from calibration
text, so the text's identity is part of the recipe's record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from qformat.errors import OptionError

__all__ = ["DEFAULT_ALPHA", "SmoothQuant"]

#: The paper's default migration strength, also llm-compressor's `SmoothQuantModifier` default.
DEFAULT_ALPHA = 0.5


@dataclass(frozen=True, kw_only=True)
class SmoothQuant:
    """alpha: migration strength in [0, 1] (0: the weights become channel-flat; 1: the activations do; the paper
        uses 0.5 for most models, up to 0.75-0.85 for those with larger outliers).
    calib: calibration text, a UTF-8 file or a built-in split ("calibration"), whose per-channel activation maxima
        set the factors. max_tokens: tokens of it that are run through the model."""

    alpha: float = DEFAULT_ALPHA
    calib: str = "calibration"
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1 or math.isnan(alpha):
            raise OptionError(f"--alpha must be a number between 0 and 1 (SmoothQuant's migration strength), "
                              f"got {alpha!r}")
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "calib", str(self.calib))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 16:
            raise OptionError("SmoothQuant needs at least 16 tokens of calibration text")

    def to_record(self) -> dict[str, Any]:
        """As recorded in provenance: a file's name, never its path."""
        return {"alpha": self.alpha, "calib": PurePath(self.calib).name, "max_tokens": self.max_tokens}

    def command_args(self) -> list[str]:
        parts = ["--smoothquant", "--alpha", f"{self.alpha:g}"]
        if self.calib != "calibration":
            parts += ["--calib", PurePath(self.calib).name]
        if self.max_tokens != 2048:
            parts += ["--smooth-tokens", str(self.max_tokens)]
        return parts
