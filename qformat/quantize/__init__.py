"""Quantization math: per-channel int8/fp8 scales (absmax, MSE), 2:4 pruning and bitmasks, reference dequantization."""

from qformat.quantize.dequant import dequantize_2_4, dequantize_dense
from qformat.quantize.observers import OBSERVERS, QMAX, MseParams, absmax_scales, fp8_to_float32, mse_scales
from qformat.quantize.sparse24 import decompress_2_4, select_2_4, unpack_bitmask
from qformat.quantize.weights import QuantizedWeight, quantize_weight

__all__ = [
    "OBSERVERS",
    "QMAX",
    "MseParams",
    "QuantizedWeight",
    "absmax_scales",
    "decompress_2_4",
    "dequantize_2_4",
    "dequantize_dense",
    "fp8_to_float32",
    "mse_scales",
    "quantize_weight",
    "select_2_4",
    "unpack_bitmask",
]
