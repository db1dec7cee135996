"""Loaders: quant_method "qformat" in transformers (`from_pretrained`, `save_pretrained`, `push_to_hub`)."""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register qformat with transformers (imports transformers; idempotent)."""
    from qformat.loaders.transformers import register as _register

    _register()
