"""Export to compressed-tensors (the layout vLLM serves) and import from it or from bitsandbytes LLM.int8()."""

from qformat.export.bnb_import import import_bitsandbytes
from qformat.export.compressed_tensors import ExportResult, export_compressed_tensors
from qformat.export.ct_import import import_compressed_tensors
from qformat.export.imported import ImportResult

__all__ = ["ExportResult", "ImportResult", "export_compressed_tensors", "import_bitsandbytes",
           "import_compressed_tensors"]
