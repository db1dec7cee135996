"""Loaders: quant_method "qformat" in transformers (`from_pretrained`, `save_pretrained`, `push_to_hub`)."""

from __future__ import annotations

__all__ = ["QFormatConfig", "QuantizeResult", "quantize_", "register"]


def register() -> None:
    """Register qformat with transformers (imports transformers; idempotent)."""
    from qformat.loaders.transformers import register as _register

    _register()


def __getattr__(name: str):  # lazy: these import transformers
    if name == "QFormatConfig":
        from qformat.loaders.config import QFormatConfig

        return QFormatConfig
    if name in ("quantize_", "QuantizeResult"):
        import qformat.loaders.inplace as inplace

        return getattr(inplace, name)
    raise AttributeError(f"module 'qformat.loaders' has no attribute {name!r}")
