"""`qformat import SOURCE OUTPUT`: a compressed-tensors checkpoint (folder or Hub repo) as a qformat checkpoint.

Most tensors keep their bytes: compressed-tensors' `int-quantized`, `float-quantized` and `naive-quantized` formats
store 8-bit weights under the names qformat uses. What changes: `pack-quantized` int32 words are unpacked to int8;
scales become float32 `[out, 1]` (bf16/fp16 widen exactly, a per-tensor scale is repeated per channel); zero points
of symmetric schemes (all zero) are dropped; 2:4 modules (the legacy `sparse-24-bitmask` layout, or dense weights
that follow the pattern) are stored compressed so qformat's 2:4 kernels run them again. The plan (`ct_plan`) decides
and refuses first; then each source shard becomes one output shard, streamed tensor by tensor, and the result is
verified before it is renamed into place.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from qformat.export.ct_plan import ImportPlan, ModulePlan, plan_import
from qformat.export.imported import (
    ImportResult,
    import_parameters,
    import_provenance,
    imported_config,
    write_import_shards,
    write_imported,
)
from qformat.export.packing import unpack_int8
from qformat.io.resolve import resolve_source_for
from qformat.io.source import SourceCheckpoint, TensorReader
from qformat.quantize.sparse24 import compress_2_4, decompress_2_4
from qformat.quantize.stored import sparse_shape
from qformat.spec.config import CheckpointConfig
from qformat.spec.layout import module_tensors
from qformat.spec.schemes import scheme_name_for

__all__ = ["import_compressed_tensors"]

logger = logging.getLogger(__name__)


def _dense_values(plan: ModulePlan, ckpt: SourceCheckpoint, reader: TensorReader) -> torch.Tensor:
    t = ckpt.tensors
    name, shape = plan.name, (plan.out_features, plan.in_features)
    if plan.stored == "dense":
        return reader.tensor(t[f"{name}.weight"])
    if plan.stored == "packed":
        return unpack_int8(reader.tensor(t[f"{name}.weight_packed"]), shape)
    return decompress_2_4(reader.tensor(t[f"{name}.compressed"]), reader.tensor(t[f"{name}.bitmask"]),
                          plan.in_features)


def _module_data(plan: ModulePlan, ckpt: SourceCheckpoint, reader: TensorReader) -> dict[str, Any]:
    """The module's output tensors: torch tensors, or memoryviews of source bytes that are kept as they are."""
    t = ckpt.tensors
    name = plan.name
    data: dict[str, Any] = {}
    if plan.sparse and plan.stored == "bitmask":
        data[f"{name}.compressed"] = reader.raw(t[f"{name}.compressed"])
        data[f"{name}.bitmask"] = reader.raw(t[f"{name}.bitmask"])
    elif plan.sparse:
        # the plan saw these values follow 2:4: compress by their nonzeros, as select_2_4 would
        data[f"{name}.compressed"], data[f"{name}.bitmask"] = compress_2_4(_dense_values(plan, ckpt, reader))
    elif plan.stored == "dense":
        data[f"{name}.weight"] = reader.raw(t[f"{name}.weight"])
    else:
        data[f"{name}.weight"] = _dense_values(plan, ckpt, reader)
    if plan.sparse:
        data[f"{name}.shape"] = sparse_shape(plan.out_features, plan.in_features)
    scale = reader.tensor(t[f"{name}.weight_scale"]).to(torch.float32).reshape(-1, 1)
    data[f"{name}.weight_scale"] = scale.expand(plan.out_features, 1).contiguous()
    if plan.scheme.has_static_input_scale:
        data[f"{name}.input_scale"] = reader.tensor(t[f"{name}.input_scale"]).to(torch.float32).reshape(1)
    return data


def _write_shards(plan: ImportPlan, ckpt: SourceCheckpoint, reader: TensorReader,
                  folder: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Write one output shard per source shard (a module in the shard of its `weight_scale`); return (tensor ->
    content hash, tensor -> file)."""
    return write_import_shards(
        ckpt, reader, folder, plan.modules.values(), home=lambda m: ckpt.tensors[f"{m.name}.weight_scale"].file,
        specs=lambda m: module_tensors(m.name, m.scheme, m.out_features, m.in_features),
        data=lambda m: _module_data(m, ckpt, reader))


def _qformat_config(plan: ImportPlan, ckpt: SourceCheckpoint, repo_id: str | None, revision: str | None,
                    base_model: str | None, hashes: dict[str, str], nbytes: int) -> CheckpointConfig:
    provenance = import_provenance(ckpt, repo_id=repo_id, revision=revision, base_model=base_model,
                                   parameters=import_parameters(plan.modules.values(), ckpt),
                                   imported_from=plan.record, hashes=hashes)
    return imported_config({m: p.scheme for m, p in plan.modules.items()}, structure=plan.structure,
                           fallback=plan.fallback, provenance=provenance, nbytes=nbytes)


def import_compressed_tensors(source: str | os.PathLike[str], output: str | os.PathLike[str], *,
                              revision: str | None = None, base_model: str | None = None,
                              overwrite: bool = False) -> ImportResult:
    """Write the compressed-tensors checkpoint `source` (a folder or Hub repo id) as a qformat checkpoint.

    Raises:
        SourceError: SOURCE cannot be found or downloaded.
        FormatError: SOURCE is not a (consistent) compressed-tensors checkpoint.
        OptionError: SOURCE uses something qformat v1 cannot represent; the message names the module and feature.
    """
    out = Path(output)
    src = resolve_source_for(source, out, revision=revision, overwrite=overwrite)
    ckpt = SourceCheckpoint(src.path)
    with ckpt.reader() as reader:
        plan = plan_import(src.path, ckpt, reader)
        base = base_model or plan.note.get("base_model") or src.repo_id
        config = {k: v for k, v in plan.config.items() if k not in ("compression_config", "sparsity_config")}
        nbytes = write_imported(
            src.path, ckpt, out, overwrite=overwrite, config=config,
            write_shards=lambda folder: _write_shards(plan, ckpt, reader, folder),
            quantization_config=lambda hashes, size: _qformat_config(plan, ckpt, src.repo_id, src.revision, base,
                                                                     hashes, size))
    logger.info("wrote %s", out)
    sparse = sorted(m for m, p in plan.modules.items() if p.sparse)
    counts = Counter(scheme_name_for(p.scheme) for p in plan.modules.values())
    return ImportResult(out, len(plan.modules), len(plan.fallback), dict(counts.most_common()), sparse, nbytes)
