"""Kernel-backed modules that hold qformat tensors as stored."""

from qformat.nn.linear import QUANTIZED_TENSORS, QuantLinear

__all__ = ["QUANTIZED_TENSORS", "QuantLinear"]
