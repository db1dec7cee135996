"""Quantization-aware training: self-distilled quantization (SDQ) that writes a qformat checkpoint.

`options` (the run, frozen), `data` (examples and deterministic batches), `fakequant` (the student's Linear layers,
on the converter's arithmetic), `losses` (task, output and attention-output terms), `loop` (the steps), `state`
(resumable training state), `distributed` (torchrun/accelerate: DDP or FSDP), `api` (`distill`)."""

from qformat.train.api import DistillResult, distill
from qformat.train.options import DistillOptions, LossWeights

__all__ = ["DistillOptions", "DistillResult", "LossWeights", "distill"]
