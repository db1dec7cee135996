"""Convert a Hugging Face model (local folder or Hub repo) into a qformat checkpoint, streaming tensor by tensor."""

from qformat.converter.api import ConvertResult, convert
from qformat.converter.options import ConvertOptions
from qformat.converter.plan import ConversionPlan, ModuleDecision, plan_conversion
from qformat.converter.structure import LinearModule, ModelStructure, analyze_structure

__all__ = [
    "ConversionPlan",
    "ConvertOptions",
    "ConvertResult",
    "LinearModule",
    "ModelStructure",
    "ModuleDecision",
    "analyze_structure",
    "convert",
    "plan_conversion",
]
