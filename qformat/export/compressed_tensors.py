"""`qformat export DIR OUTPUT --to vllm`: a compressed-tensors checkpoint that vLLM loads unchanged.

What changes (format-facts.md sections 1-3): the config becomes compressed-tensors' (one group per scheme, modules
named explicitly, `ignore` = the fallback list, `sparsity_config: {}`); weight-only int8 modules are repacked as
`weight_packed` + `weight_shape` (vLLM runs int8 weight-only only as `pack-quantized`); 2:4 modules are written dense
(vLLM and compressed-tensors dropped 2:4; the card says so). Every other tensor is the same bytes under the same name,
so a shard with nothing to change is hard-linked (or reflinked, or copied where neither is possible) instead of being
rewritten. vLLM's constraints are checked first and violations refused with the modules named: a fused group
(q/k/v, gate/up) whose members differ, and a quantized output embedding (vLLM never quantizes `ParallelLMHead`).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qformat._version import __version__
from qformat.checkpoint.reader import QFormatCheckpoint, format_errors, open_checkpoint
from qformat.checkpoint.verify import verify
from qformat.io.support_files import copy_support_files
from qformat.errors import FormatError, OptionError
from qformat.export.ct_config import ct_format, ct_quantization_config
from qformat.export.packing import pack_int8
from qformat.io.atomic import atomic_output_dir, check_output_location
from qformat.io.index import write_weight_index
from qformat.io.jsonfile import load_json
from qformat.io.dtypes import tensor_bytes
from qformat.io.safetensors_format import SHARD_METADATA, iter_tensor_chunks, layout_file, open_tensor_data
from qformat.io.writer import ShardWriter, write_error, write_json
from qformat.quantize.sparse24 import decompress_2_4
from qformat.spec.fused import fused_groups_for, fused_mismatch, group_modules
from qformat.spec.layout import DENSE_SUFFIXES, SPARSE_SUFFIXES, TensorSpec
from qformat.spec.schemes import Scheme

__all__ = ["ExportResult", "export_compressed_tensors"]


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: how many modules were repacked or densified, and how each shard got there."""

    output: Path
    groups: dict[str, str]  # group name -> compressed-tensors format
    repacked: list[str]  # weight-only int8 modules now pack-quantized
    densified: list[str]  # 2:4 modules written dense
    shards: dict[str, str]  # file -> "linked" | "reflinked" | "copied" | "rewritten"
    dropped_outlier_threshold: float | None = None  # the checkpoint's, when exported with drop_outlier_threshold


def _dense(scheme: Scheme) -> Scheme:
    return scheme.with_sparsity(None)


def _check_vllm(ckpt: QFormatCheckpoint, schemes: dict[str, Scheme]) -> None:
    structure = ckpt.structure()
    for name, module in structure.linears.items():
        if module.output_embedding and name in schemes:
            raise OptionError(f"{name} (the output embedding) is quantized, but vLLM never quantizes its lm_head; "
                              "convert again keeping it in full precision (qformat's default) to export for vLLM")
    fallback = ckpt.qconfig.fallback_modules
    groups = group_modules(list(structure.linears), fused_groups_for(structure.model_type))
    # 2:4 is written dense, so members that differ only in sparsity agree once exported
    kinds = {m: None if m in fallback else _dense(schemes[m]) for g in groups for m in g}
    group = fused_mismatch(groups, kinds)
    if group is not None:
        listing = ", ".join(f"{m} ({'full precision' if kinds[m] is None else ct_format(kinds[m])})" for m in group)
        raise OptionError(f"vLLM runs {', '.join(group)} as one fused matrix, so they need one scheme, but the "
                          f"checkpoint has {listing}; convert again with one scheme for the whole group")


def _link_or_copy(src: Path, dst: Path) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        pass
    try:  # a copy-on-write clone where the filesystem has them (btrfs, xfs): no bytes duplicated
        import fcntl

        with open(src, "rb") as fin, open(dst, "wb") as fout:
            fcntl.ioctl(fout.fileno(), 0x40049409, fin.fileno())  # FICLONE
        return "reflinked"
    except (OSError, ImportError):
        pass
    try:
        shutil.copyfile(src, dst)
    except OSError as exc:
        raise write_error(dst, exc) from None
    return "copied"


def _packed(scheme: Scheme) -> bool:
    """vLLM runs int8 weight-only only as `pack-quantized`: such modules get `weight_packed` + `weight_shape`."""
    return scheme.weights.type == "int" and scheme.input_activations is None


def _module_specs(ckpt: QFormatCheckpoint, module: str, scheme: Scheme) -> list[TensorSpec]:
    """The export's tensor names, dtypes and shapes for a module that changes, known before any value is read."""
    out_f, in_f = ckpt.weight_shape(module)
    dtype = ckpt.tensors[f"{module}.compressed" if scheme.sparsity is not None else f"{module}.weight"][1].dtype
    if _packed(scheme):
        return [TensorSpec(f"{module}.weight_packed", "I32", (out_f, in_f // 4)),
                TensorSpec(f"{module}.weight_shape", "I64", (2,))]
    return [TensorSpec(f"{module}.weight", dtype, (out_f, in_f))]


def _module_outputs(ckpt: QFormatCheckpoint, module: str, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The export's tensors for a module that changes (2:4 -> dense, weight-only int8 -> packed)."""
    if scheme.sparsity is not None:
        values = decompress_2_4(ckpt.load(f"{module}.compressed"), ckpt.load(f"{module}.bitmask"),
                                ckpt.weight_shape(module)[1])
    else:
        values = ckpt.load(f"{module}.weight")
    if _packed(scheme):
        return {f"{module}.weight_packed": pack_int8(values),
                f"{module}.weight_shape": torch.tensor(list(values.shape), dtype=torch.int64)}
    return {f"{module}.weight": values}


# a changed module's value tensors are rewritten; its scales are kept
_REPLACED = DENSE_SUFFIXES + SPARSE_SUFFIXES
_COPY_CHUNK = 8 * 2**20


def _write_shard(ckpt: QFormatCheckpoint, file: str, target: Path, changed: dict[str, Scheme]) -> list[str]:
    """Rewrite one shard: every unchanged tensor's bytes as they are, then the changed modules' new tensors one
    module at a time (peak memory is one module's weight, not the shard's)."""
    keep = []
    for _, entry in (v for v in ckpt.tensors.values() if v[0] == file):
        module, _, suffix = entry.name.rpartition(".")
        if not (module in changed and suffix in _REPLACED):
            keep.append(entry)
    specs = [TensorSpec(e.name, e.dtype, e.shape) for e in keep]
    for module, scheme in changed.items():
        specs += _module_specs(ckpt, module, scheme)
    writer = ShardWriter(target, layout_file(specs, SHARD_METADATA), hashes=False)
    try:
        # positional reads, not a memory map: a shard that shrinks meanwhile is one error, never a SIGBUS
        buffer = memoryview(bytearray(_COPY_CHUNK))
        with format_errors():
            fd = open_tensor_data(ckpt.headers[file])
            try:
                for entry in keep:
                    sink = writer.sink(entry.name)
                    for chunk in iter_tensor_chunks(fd, ckpt.folder / file, entry, buffer):
                        sink.write(chunk)
                    sink.finish()
            finally:
                os.close(fd)
        for module, scheme in changed.items():
            for name, tensor in _module_outputs(ckpt, module, scheme).items():
                sink = writer.sink(name)
                sink.write(tensor_bytes(tensor))
                sink.finish()
        writer.close()
    finally:
        writer.abort()
    return [s.name for s in specs]


def _refuse_compressed_tensors(folder: Path) -> None:
    try:
        config = load_json(folder / "config.json", error=FormatError)
    except FormatError:
        return  # verify() names the problem
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "compressed-tensors":
        raise FormatError(f"{folder} is already a compressed-tensors checkpoint (vLLM serves it as it is); "
                          "`qformat import` turns it into a qformat one")


def _check_outlier_threshold(qc: Any, drop: bool) -> None:
    """compressed-tensors has no LLM.int8() decomposition: vLLM would run the checkpoint as plain W8A8, less
    precisely than it was made and measured. Only an explicit `drop_outlier_threshold` accepts that."""
    if qc.outlier_threshold is not None and not drop:
        raise OptionError(f"this checkpoint runs LLM.int8() outlier decomposition (threshold {qc.outlier_threshold:g})"
                          ", which compressed-tensors cannot express: vLLM would run it as plain W8A8, less precisely "
                          "than it was measured; export with --drop-outlier-threshold to accept that, or convert "
                          "with --smoothquant instead")


def export_compressed_tensors(folder: str | os.PathLike[str], output: str | os.PathLike[str], *,
                              overwrite: bool = False, drop_outlier_threshold: bool = False) -> ExportResult:
    """Write a compressed-tensors (vLLM) checkpoint of the qformat checkpoint in `folder` to `output`.

    `drop_outlier_threshold`: export a checkpoint with an `outlier_threshold` anyway, as plain W8A8 (the export's
    config records the dropped threshold).

    Raises:
        FormatError: `folder` fails `qformat verify`.
        OptionError: the checkpoint has something vLLM cannot serve (named in the message).
    """
    from qformat.cards.export import render_export_card

    folder, out = Path(folder), Path(output)
    _refuse_compressed_tensors(folder)
    try:
        verify(folder)
    except FormatError as exc:
        raise FormatError(f"refusing to export a checkpoint that fails verification: {exc}") from None
    check_output_location(out, source=folder, overwrite=overwrite)
    ckpt = open_checkpoint(folder)
    qc = ckpt.qconfig
    _check_outlier_threshold(qc, drop_outlier_threshold)
    schemes = {m: resolved[1] for m in ckpt.quantized_modules if (resolved := qc.scheme_for(m)) is not None}
    _check_vllm(ckpt, schemes)
    groups: dict[str, tuple[Scheme, list[str]]] = {}
    for module, scheme in schemes.items():
        dense = _dense(scheme)
        groups.setdefault(json.dumps(dense.to_dict(), sort_keys=True), (dense, []))[1].append(module)
    ordered = sorted(groups.values(), key=lambda g: (-len(g[1]), ct_format(g[0])))
    changed = {m: s for m, s in schemes.items() if s.sparsity is not None or _packed(s)}
    densified = sorted(m for m, s in changed.items() if s.sparsity is not None)
    note: dict[str, Any] = {"exported_by": f"qformat {__version__}", "format_version": qc.format_version,
                            "base_model": (qc.provenance.get("source") or {}).get("base_model"),
                            "sparse_2_4_written_dense": densified,
                            "fallback": [e.to_dict() for e in qc.fallback]}
    if qc.outlier_threshold is not None:
        note["outlier_threshold_dropped"] = qc.outlier_threshold
    quant_config = ct_quantization_config([(s, mods) for s, mods in ordered], [e.module for e in qc.fallback], note)
    shards: dict[str, str] = {}
    weight_map: dict[str, str] = {}
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        copy_support_files(folder, tmp)
        for file in ckpt.files:
            in_file = {m: s for m, s in changed.items() if ckpt.tensors[f"{m}.weight_scale"][0] == file}
            if in_file:
                names = _write_shard(ckpt, file, tmp / file, in_file)
                shards[file] = "rewritten"
            else:
                shards[file] = _link_or_copy(ckpt.folder / file, tmp / file)
                names = [n for n, (f, _) in ckpt.tensors.items() if f == file]
            weight_map.update(dict.fromkeys(names, file))
        if ckpt.index is not None:
            total = sum((tmp / f).stat().st_size for f in ckpt.files)
            write_weight_index(tmp, weight_map, total)
        config = dict(ckpt.config)
        config["quantization_config"] = quant_config
        write_json(tmp / "config.json", config)
        (tmp / "README.md").write_text(render_export_card(folder, quant_config, densified), encoding="utf-8")
    repacked = sorted(m for m, s in changed.items() if _packed(s))
    return ExportResult(out, {g: c["format"] for g, c in quant_config["config_groups"].items()}, repacked, densified,
                        shards, qc.outlier_threshold)

