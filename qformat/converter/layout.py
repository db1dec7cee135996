"""Output layout: every tensor the converted checkpoint will hold, grouped into shards, before anything is written.

Knowing every output tensor's dtype and shape up front (they follow from the source header and the plan) is what
lets the converter write each shard's header first and stream tensor bytes after it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qformat.plan.rules import ConversionPlan, ModuleDecision
from qformat.io.safetensors_format import FileLayout, layout_file
from qformat.io.source import SourceCheckpoint, SourceTensor
from qformat.spec.layout import TensorSpec, module_tensors

__all__ = ["SHARD_METADATA", "SINGLE_FILE", "OutputLayout", "SourceJob", "plan_output"]

#: The safetensors metadata of every shard; old loaders check for {"format": "pt"}.
SHARD_METADATA = {"format": "pt"}
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class SourceJob:
    """One source tensor and the output tensors it becomes (itself, for a tensor that is copied)."""

    source: SourceTensor
    outputs: tuple[TensorSpec, ...]
    shard: int
    decision: ModuleDecision | None  # set when the tensor is a weight being quantized


@dataclass(frozen=True)
class OutputLayout:
    jobs: tuple[SourceJob, ...]
    shard_names: tuple[str, ...]
    shard_layouts: tuple[FileLayout, ...]

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for job in self.jobs for spec in job.outputs)


def _outputs(tensor: SourceTensor, decision: ModuleDecision | None) -> tuple[TensorSpec, ...]:
    if decision is None:
        return (TensorSpec(tensor.name, tensor.dtype, tensor.shape),)
    module = decision.module
    assert decision.scheme is not None
    return tuple(module_tensors(module.name, decision.scheme, module.out_features, module.in_features))


def plan_output(checkpoint: SourceCheckpoint, plan: ConversionPlan, max_shard_size: int) -> OutputLayout:
    """Assign every output tensor to a shard, in source order, starting a new shard before one would exceed
    `max_shard_size` (a tensor larger than that gets a shard of its own)."""
    by_weight_key = {d.module.weight_key: d for d in plan.quantized}
    staged: list[tuple[SourceTensor, tuple[TensorSpec, ...], ModuleDecision | None]] = []
    for tensor in checkpoint.tensors.values():
        decision = by_weight_key.get(tensor.name)
        staged.append((tensor, _outputs(tensor, decision), decision))
    shard_of: list[int] = []
    shard, size = 0, 0
    for _, outputs, _ in staged:
        nbytes = sum(o.nbytes for o in outputs)
        if size and size + nbytes > max_shard_size:
            shard, size = shard + 1, 0
        shard_of.append(shard)
        size += nbytes
    count = shard + 1
    names = (SINGLE_FILE,) if count == 1 else tuple(f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count))
    jobs = tuple(SourceJob(t, outs, s, d) for (t, outs, d), s in zip(staged, shard_of))
    layouts = tuple(
        layout_file([o for job in jobs if job.shard == i for o in job.outputs], SHARD_METADATA) for i in range(count)
    )
    return OutputLayout(jobs, names, layouts)
