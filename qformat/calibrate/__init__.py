"""Calibration: run a full-precision model on text and collect statistics of its Linear modules' inputs.

SmoothQuant's factors use the per-channel maxima (`input_maxima`); static activation scales can use the same hooks.
"""

from qformat.calibrate.hooks import InputMaxima
from qformat.calibrate.run import input_maxima

__all__ = ["InputMaxima", "input_maxima"]
