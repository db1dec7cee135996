"""What qformat knows about a model: its Linear modules (from a folder's config.json or a live module) and the one
mapping between checkpoint names and model module names."""

from qformat.models.names import NameMap, checkpoint_shapes
from qformat.models.structure import LinearModule, ModelStructure, analyze_structure, check_layer_counts, structure_of

__all__ = [
    "LinearModule",
    "ModelStructure",
    "NameMap",
    "analyze_structure",
    "check_layer_counts",
    "checkpoint_shapes",
    "structure_of",
]
