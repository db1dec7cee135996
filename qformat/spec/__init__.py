"""The qformat checkpoint format v1 as code: schemes, patterns, fused groups, tensor layout and the config block.

Importing this subpackage does not import torch. docs/FORMAT.md is the normative text.
"""

from qformat.spec.config import (
    FALLBACK_REASONS,
    FORMAT_VERSION,
    OUTLIER_FORMAT_VERSION,
    QUANT_METHOD,
    READABLE_VERSIONS,
    CheckpointConfig,
    FallbackEntry,
)
from qformat.spec.fused import (
    DEFAULT_FUSED_GROUPS,
    FUSED_GROUPS_BY_MODEL_TYPE,
    fused_groups_for,
    fused_mismatch,
    group_modules,
)
from qformat.spec.layout import DTYPE_SIZES, SCALE_DTYPE, TensorSpec, module_tensors, quantized_nbytes, shape_problem
from qformat.spec.patterns import (
    MATCH_TIMEOUT_S,
    MAX_PATTERN_LENGTH,
    MAX_REGEX_PATTERNS,
    PATTERN_BUDGET_S,
    REGEX_PREFIX,
    PatternSet,
    RuleSet,
    first_match,
    pattern_matches,
    validate_pattern,
)
from qformat.spec.schemes import BUILTIN_SCHEMES, SPARSITY_2_4, QuantArgs, Scheme, resolve_scheme_name, scheme_names

__all__ = [
    "BUILTIN_SCHEMES",
    "DEFAULT_FUSED_GROUPS",
    "DTYPE_SIZES",
    "FALLBACK_REASONS",
    "FORMAT_VERSION",
    "OUTLIER_FORMAT_VERSION",
    "READABLE_VERSIONS",
    "FUSED_GROUPS_BY_MODEL_TYPE",
    "MATCH_TIMEOUT_S",
    "MAX_PATTERN_LENGTH",
    "MAX_REGEX_PATTERNS",
    "PATTERN_BUDGET_S",
    "QUANT_METHOD",
    "REGEX_PREFIX",
    "SCALE_DTYPE",
    "SPARSITY_2_4",
    "FallbackEntry",
    "PatternSet",
    "CheckpointConfig",
    "QuantArgs",
    "RuleSet",
    "Scheme",
    "TensorSpec",
    "first_match",
    "fused_groups_for",
    "fused_mismatch",
    "group_modules",
    "module_tensors",
    "pattern_matches",
    "quantized_nbytes",
    "resolve_scheme_name",
    "scheme_names",
    "shape_problem",
    "validate_pattern",
]
