"""Checkpoint I/O: the safetensors container (read and streamed), source readers, atomic output folders."""

from qformat.io.atomic import atomic_output_dir, check_output_location
from qformat.io.safetensors_format import FileLayout, HeaderEntry, SafetensorsHeader, layout_file, read_header
from qformat.io.source import SourceCheckpoint, SourceTensor, TensorReader
from qformat.io.writer import ShardWriter, TensorSink

__all__ = [
    "FileLayout",
    "HeaderEntry",
    "SafetensorsHeader",
    "ShardWriter",
    "SourceCheckpoint",
    "SourceTensor",
    "TensorReader",
    "TensorSink",
    "atomic_output_dir",
    "check_output_location",
    "layout_file",
    "read_header",
]
