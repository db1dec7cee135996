"""Helpers for tests and examples: tiny random models built from config, real models from local packages
(`qformat.testing.real_models`), checkpoint comparisons; no network."""

from qformat.testing.bounds import FP32_SLACK, spec_error_bound
from qformat.testing.judges import checkpoint_differences, checkpoint_tensors, model_class, quantization_block
from qformat.testing.tiny_models import TINY_ARCHITECTURES, build_tiny_model, save_random_llama, save_tiny_model

__all__ = [
    "FP32_SLACK",
    "TINY_ARCHITECTURES",
    "build_tiny_model",
    "checkpoint_differences",
    "checkpoint_tensors",
    "model_class",
    "quantization_block",
    "save_random_llama",
    "save_tiny_model",
    "spec_error_bound",
]
