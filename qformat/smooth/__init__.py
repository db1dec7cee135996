"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8 quantization."""

from qformat.smooth.options import DEFAULT_ALPHA, SmoothQuant

__all__ = ["DEFAULT_ALPHA", "SmoothQuant"]
