"""Read, summarize and verify qformat checkpoints."""

from qformat.checkpoint.dequantize import dequantized_state_dict
from qformat.checkpoint.inspect import CheckpointSummary, describe_scheme, inspect
from qformat.checkpoint.reader import QFormatCheckpoint, open_checkpoint
from qformat.checkpoint.verify import VerifyReport, verify

__all__ = [
    "CheckpointSummary",
    "QFormatCheckpoint",
    "VerifyReport",
    "dequantized_state_dict",
    "describe_scheme",
    "inspect",
    "open_checkpoint",
    "verify",
]
