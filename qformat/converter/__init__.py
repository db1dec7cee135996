"""Convert a Hugging Face model (local folder or Hub repo) into a qformat checkpoint, streaming tensor by tensor."""

from qformat.converter.api import ConvertResult, convert
from qformat.converter.options import ConvertOptions

__all__ = ["ConvertOptions", "ConvertResult", "convert"]
