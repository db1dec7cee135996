"""Output layout: every tensor the converted checkpoint will hold, grouped into shards, before anything is written.

Knowing every output tensor's dtype and shape up front (they follow from the source header, the plan and the
requested full-precision dtype) is what lets the converter write each shard's header first and stream tensor bytes
after it. The full-precision dtype (`--dtype`) is resolved here too: "auto" means what config.json declares, as
`from_pretrained(dtype="auto")` reads it, else each tensor's stored dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qformat.io.safetensors_format import SHARD_METADATA, FileLayout, layout_file
from qformat.io.source import SourceCheckpoint, SourceTensor
from qformat.plan.recipe import AUTO_DTYPE, DTYPES
from qformat.plan.rules import ConversionPlan, ModuleDecision
from qformat.smooth.fold import TensorEdit
from qformat.spec.layout import FULL_PRECISION_DTYPES, TensorSpec, module_tensors

__all__ = ["CASTABLE_DTYPES", "CONFIG_DTYPE_KEYS", "SINGLE_FILE", "OutputLayout", "SourceJob",
           "declare_dtype", "plan_output", "resolve_dtype"]

SINGLE_FILE = "model.safetensors"
#: Stored dtypes of copied tensors that `--dtype` casts; integer and bool buffers and fp8 data are copied as stored.
CASTABLE_DTYPES = FULL_PRECISION_DTYPES
#: config.json keys naming the model's dtype: transformers 5 writes `dtype`, older versions `torch_dtype`.
CONFIG_DTYPE_KEYS = ("dtype", "torch_dtype")


def resolve_dtype(requested: str, config: Mapping[str, Any]) -> str | None:
    """The dtype name ("bfloat16", "float16", "float32") copied float tensors are written in, or None to keep each
    tensor's stored dtype. "auto" takes config.json's `dtype` (else `torch_dtype`) when it names one of those."""
    if requested != AUTO_DTYPE:
        return requested
    for key in CONFIG_DTYPE_KEYS:
        value = config.get(key)
        if isinstance(value, str):
            name = value.removeprefix("torch.")
            return name if name in DTYPES else None
    return None


def declare_dtype(config: dict[str, Any], name: str | None) -> dict[str, Any]:
    """`config` with its dtype key(s) set to `name`, so `from_pretrained(dtype="auto")` loads the full-precision
    tensors in the dtype they are stored in. The keys the source has are set (a composite model's sub-configs'
    included); `dtype` where it has none. `name=None` (stored dtypes kept) leaves the config as it is."""
    if name is None:
        return config
    if not any(key in config for key in CONFIG_DTYPE_KEYS):
        config["dtype"] = name
    _set_dtype_keys(config, name)
    return config


def _set_dtype_keys(node: dict[str, Any], name: str) -> None:
    for key, value in node.items():
        if key in CONFIG_DTYPE_KEYS:
            node[key] = name
        elif isinstance(value, dict):
            _set_dtype_keys(value, name)


@dataclass(frozen=True)
class SourceJob:
    """One source tensor and the output tensors it becomes (itself, for a tensor that is copied). `edit`: how
    SmoothQuant changes it before it is quantized or written (`qformat.smooth.fold.apply_edit`)."""

    source: SourceTensor
    outputs: tuple[TensorSpec, ...]
    shard: int
    decision: ModuleDecision | None  # set when the tensor is a weight being quantized
    edit: TensorEdit | None = None

    @property
    def cast(self) -> str | None:
        """The dtype code a copied tensor is cast to; None when it is quantized or copied byte for byte."""
        if self.decision is not None or self.outputs[0].dtype == self.source.dtype:
            return None
        return self.outputs[0].dtype


@dataclass(frozen=True)
class OutputLayout:
    jobs: tuple[SourceJob, ...]
    shard_names: tuple[str, ...]
    shard_layouts: tuple[FileLayout, ...]

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for job in self.jobs for spec in job.outputs)


def _outputs(tensor: SourceTensor, decision: ModuleDecision | None, dtype: str | None) -> tuple[TensorSpec, ...]:
    if decision is None:
        cast = dtype is not None and tensor.dtype in CASTABLE_DTYPES
        return (TensorSpec(tensor.name, DTYPES[dtype] if cast else tensor.dtype, tensor.shape),)
    module = decision.module
    assert decision.scheme is not None
    return tuple(module_tensors(module.name, decision.scheme, module.out_features, module.in_features))


def plan_output(checkpoint: SourceCheckpoint, plan: ConversionPlan, max_shard_size: int, *,
                dtype: str | None = None, edits: Mapping[str, TensorEdit] | None = None) -> OutputLayout:
    """Assign every output tensor to a shard, in source order, starting a new shard before one would exceed
    `max_shard_size` (a tensor larger than that gets a shard of its own). `dtype` (a `resolve_dtype` name) is the
    dtype of every copied float tensor; None keeps each as stored. `edits` (source tensor name -> edit) are
    SmoothQuant's changes; an edited tensor keeps its output dtype and shape."""
    by_weight_key = {d.module.weight_key: d for d in plan.quantized}
    staged: list[tuple[SourceTensor, tuple[TensorSpec, ...], ModuleDecision | None]] = []
    for tensor in checkpoint.tensors.values():
        decision = by_weight_key.get(tensor.name)
        staged.append((tensor, _outputs(tensor, decision, dtype), decision))
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
    edits = edits or {}
    unknown = sorted(set(edits) - set(checkpoint.tensors))
    if unknown:
        raise ValueError(f"SmoothQuant edits {unknown[0]}, which the source does not store; report this bug")
    jobs = tuple(SourceJob(t, outs, s, d, edits.get(t.name)) for (t, outs, d), s in zip(staged, shard_of))
    layouts = tuple(
        layout_file([o for job in jobs if job.shard == i for o in job.outputs], SHARD_METADATA) for i in range(count)
    )
    return OutputLayout(jobs, names, layouts)
