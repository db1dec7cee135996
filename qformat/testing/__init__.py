"""Helpers for tests and examples: tiny random models built from config, with no network."""

from qformat.testing.tiny_models import TINY_ARCHITECTURES, build_tiny_model, save_tiny_model

__all__ = ["TINY_ARCHITECTURES", "build_tiny_model", "save_tiny_model"]
