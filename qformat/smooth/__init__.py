"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8 quantization.

`SmoothQuant` (the options, no torch) is imported by `qformat.plan.recipe`; `smooth_model` and `SmoothingRecord`
(torch, transformers) load on first use, which also keeps `qformat.plan` free of an import cycle.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qformat.smooth.options import DEFAULT_ALPHA, SmoothQuant

if TYPE_CHECKING:
    from qformat.smooth.api import SmoothingRecord, smooth_model

__all__ = ["DEFAULT_ALPHA", "SmoothQuant", "SmoothingRecord", "smooth_model"]


def __getattr__(name: str) -> Any:
    if name in ("SmoothingRecord", "smooth_model"):
        from qformat.smooth import api

        return getattr(api, name)
    raise AttributeError(f"module 'qformat.smooth' has no attribute {name!r}")
