"""Kernels, one op per module: a pure-torch reference and the fast paths, chosen per device at load time and per
call by the number of tokens. `trace_paths()` records which path ran."""

from qformat.kernels._trace import record_path, trace_paths
from qformat.kernels.activations import fake_quantize, per_tensor_scales, quantize_per_tensor, quantize_per_token
from qformat.kernels.fp8 import Fp8Linear, fp8_reference, scaled_mm_supported
from qformat.kernels.int8_dynamic import CPU_WEIGHT_LEFT_MAX_TOKENS, Int8Dynamic, int8_dynamic_reference
from qformat.kernels.int8_outlier import Int8Outlier, int8_outlier_reference, outlier_columns
from qformat.kernels.int8_weight_only import (
    INT8PACK_MAX_TOKENS,
    SPLIT_MAX_TOKENS,
    TILE_ROWS,
    Int8WeightOnly,
    dequant_tiled_linear,
    int8_weight_only_reference,
)
from qformat.kernels.sparse24 import dense_from_2_4, semi_structured_int8

__all__ = [
    "CPU_WEIGHT_LEFT_MAX_TOKENS",
    "INT8PACK_MAX_TOKENS",
    "SPLIT_MAX_TOKENS",
    "TILE_ROWS",
    "Fp8Linear",
    "Int8Dynamic",
    "Int8Outlier",
    "Int8WeightOnly",
    "dense_from_2_4",
    "dequant_tiled_linear",
    "fake_quantize",
    "fp8_reference",
    "int8_dynamic_reference",
    "int8_outlier_reference",
    "int8_weight_only_reference",
    "outlier_columns",
    "per_tensor_scales",
    "quantize_per_tensor",
    "quantize_per_token",
    "record_path",
    "scaled_mm_supported",
    "semi_structured_int8",
    "trace_paths",
]
