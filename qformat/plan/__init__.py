"""Planning: what to quantize and how (`QuantRecipe`), and every Linear module's decision under it (`plan_conversion`).

The rules live here once and are used by the streaming converter, the in-memory paths (`from_pretrained` with a
`QFormatConfig`, `qformat.quantize_`) and import/export.
"""

from qformat.plan.recipe import AUTO_DTYPE, DTYPES, FULL_PRECISION, QuantRecipe, parse_override
from qformat.plan.execute import quantize_module
from qformat.plan.record import checkpoint_block
from qformat.plan.rules import ConversionPlan, ModuleDecision, plan_conversion

__all__ = [
    "AUTO_DTYPE",
    "DTYPES",
    "FULL_PRECISION",
    "ConversionPlan",
    "ModuleDecision",
    "QuantRecipe",
    "checkpoint_block",
    "parse_override",
    "plan_conversion",
    "quantize_module",
]
