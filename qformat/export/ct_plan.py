"""Plan the import of a compressed-tensors checkpoint: how each Linear module is stored and what qformat makes of it.

The plan reads config.json and the tensor headers (plus the few small tensors it must look at) and decides, per
Linear module: the qformat scheme (from the module's compressed-tensors scheme, `ct_config.scheme_from_ct`), the
layout it is stored in (`dense` weight, `packed` int32 words, or the legacy `bitmask` 2:4 layout), and whether qformat
stores it 2:4 compressed. Everything qformat v1 cannot represent is refused with the module named: group-wise or
asymmetric scales, other bit widths, kv-cache or output quantization, transforms, unstructured sparsity, tensors the
format has no place for, a fused group (q/k/v, gate/up) whose members disagree.

Module matching follows compressed-tensors: a target or ignore entry is a class name (`Linear`), an exact module
name, or `re:` + a regular expression applied with `re.match`; `ignore` wins over every group.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qformat.models.structure import LinearModule, ModelStructure, analyze_structure
from qformat.errors import FormatError, OptionError
from qformat.export.ct_config import scheme_from_ct
from qformat.export.packing import unpack_int8
from qformat.io.jsonfile import load_json
from qformat.io.source import SourceCheckpoint, SourceTensor, TensorReader
from qformat.plan.rules import default_fallback
from qformat.quantize.sparse24 import follows_2_4
from qformat.spec.config import FallbackEntry
from qformat.spec.fused import fused_groups_for, fused_mismatch, group_modules
from qformat.spec.layout import DENSE_SUFFIXES, FULL_PRECISION_DTYPES, SPARSE_SUFFIXES, VALUE_DTYPES, shape_problem
from qformat.spec._typed import list_at, str_at
from qformat.spec.patterns import PatternSet
from qformat.spec.schemes import SPARSITY_2_4, Scheme

__all__ = ["ImportPlan", "ModulePlan", "plan_import", "read_ct_config"]

#: Source tensors of each stored layout (besides weight_scale / input_scale / bias). compressed-tensors' dense and
#: legacy 2:4 layouts use qformat's names (spec.layout), which is what lets the import keep their bytes.
LAYOUT_TENSORS = {
    "dense": DENSE_SUFFIXES,
    "packed": ("weight_packed", "weight_shape"),
    "bitmask": SPARSE_SUFFIXES,
}
_FORMATS = ("int-quantized", "float-quantized", "naive-quantized", "pack-quantized")
_ZERO_POINTS = ("weight_zero_point", "input_zero_point")
_SCALE_DTYPES = {"F32", "BF16", "F16"}


@dataclass(frozen=True)
class ModulePlan:
    """One quantized Linear module: its qformat scheme (with "2:4" where stored compressed) and source layout."""

    name: str
    scheme: Scheme
    stored: str  # "dense" | "packed" | "bitmask" (the source's layout)
    out_features: int
    in_features: int
    source_tensors: tuple[str, ...]  # every source tensor of the module except its bias

    @property
    def sparse(self) -> bool:
        return self.scheme.sparsity is not None


@dataclass(frozen=True)
class ImportPlan:
    """Everything the importer writes, decided before a byte is written."""

    config: dict[str, Any]  # the source config.json
    structure: ModelStructure
    modules: dict[str, ModulePlan]
    fallback: tuple[FallbackEntry, ...]
    note: dict[str, Any]  # the `qformat` key of an export's quantization_config, if any
    record: dict[str, Any] = field(default_factory=dict)  # provenance.imported_from


def read_ct_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], Any]:
    """The raw `quantization_config` dict and compressed-tensors' parse of it; refuse anything but a compressed one."""
    from compressed_tensors.quantization import QuantizationConfig
    from pydantic import ValidationError

    raw = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(raw, dict):
        raise FormatError("SOURCE's config.json has no quantization_config, so it is not a compressed-tensors "
                          "checkpoint; quantize a full-precision model with `qformat convert` instead")
    method = raw.get("quant_method")
    if method == "qformat":
        raise FormatError("SOURCE is already a qformat checkpoint; there is nothing to import")
    if method != "compressed-tensors":
        raise FormatError(f"SOURCE is quantized with quant_method {method!r}; qformat import reads compressed-tensors "
                          "checkpoints only")
    try:
        ct = QuantizationConfig.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise FormatError(f"quantization_config is not a valid compressed-tensors config ({where}: "
                          f"{first.get('msg')})") from None
    except Exception as exc:  # compressed-tensors' validators compare values before checking types (TypeError)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise FormatError(f"quantization_config is not a valid compressed-tensors config ({type(exc).__name__}: "
                          f"{first}); fix the checkpoint's config.json") from None
    if not isinstance(raw.get("version"), (str, type(None))):
        raise FormatError(f"quantization_config.version must be a string, got {raw.get('version')!r}")
    status = str(getattr(ct.quantization_status, "value", ct.quantization_status))
    if status != "compressed":
        raise FormatError(f"quantization_status is {status!r}: the weights are stored in full precision, not as "
                          "quantized values; qformat imports compressed checkpoints only (or convert the original "
                          "model with `qformat convert`)")
    if ct.kv_cache_scheme is not None:
        raise OptionError("the checkpoint quantizes the kv cache (kv_cache_scheme); qformat v1 cannot represent that")
    if raw.get("transform_config"):
        raise OptionError("the checkpoint applies transforms (transform_config, e.g. rotations); qformat v1 cannot "
                          "represent them")
    return raw, ct


def _sparsity(raw: dict[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    sp = raw.get("sparsity_config") or config.get("sparsity_config") or {}
    if not isinstance(sp, dict):
        return {}
    fmt = str_at(sp.get("format"), "quantization_config.sparsity_config.format", nullable=True)
    structure = str_at(sp.get("sparsity_structure"), "quantization_config.sparsity_config.sparsity_structure",
                       nullable=True) or ""
    if fmt in (None, "dense") or fmt == "sparse-24-bitmask":
        return {"format": fmt or "dense", "structure": structure}
    raise OptionError(f"sparsity format {fmt!r} ({structure or 'unstructured'}) is not representable in qformat v1, "
                      "which stores 2:4 sparsity only (legacy 'sparse-24-bitmask', or dense weights in the 2:4 pattern)")


class _Targets:
    """A compressed-tensors `targets` or `ignore` list, compiled once: the class name `Linear` (every Linear
    module), exact module names, or `re:` patterns applied with `re.match` (bounded, see `qformat.spec.patterns`)."""

    def __init__(self, patterns: Any, where: str) -> None:
        listed = list_at(patterns, where, nullable=True) or []
        for i, pattern in enumerate(listed):
            str_at(pattern, f"{where}[{i}]")
        self.every_linear = "Linear" in listed
        self.patterns = PatternSet([p for p in listed if p != "Linear"], what=where)

    def matches(self, name: str) -> bool:
        return self.every_linear or self.patterns.matches(name)


@dataclass(frozen=True)
class _Groups:
    """The config's ignore list and each config group's targets, compiled once for the whole model."""

    ignore: _Targets
    targets: dict[str, _Targets]

    @classmethod
    def of(cls, ct: Any) -> _Groups:
        groups = ct.config_groups or {}
        return cls(_Targets(ct.ignore, "quantization_config.ignore"),
                   {name: _Targets(scheme.targets, f"quantization_config.config_groups.{name}.targets")
                    for name, scheme in groups.items()})


def _module_suffixes(tensors: Mapping[str, SourceTensor], linears: Mapping[str, LinearModule]) -> dict[str, dict]:
    """Source tensors grouped by the Linear module they belong to: module -> {suffix: tensor}."""
    by_module: dict[str, dict[str, SourceTensor]] = {}
    for name, tensor in tensors.items():
        module, _, suffix = name.rpartition(".")
        if module in linears:
            by_module.setdefault(module, {})[suffix] = tensor
    return by_module


def _dense_shapes(ckpt: SourceCheckpoint, reader: TensorReader) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in checkpoint order, with `<module>.weight` standing in for packed and 2:4 layouts."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, tensor in ckpt.tensors.items():
        module, _, suffix = name.rpartition(".")
        stand_in = {"weight_packed": "weight_shape", "compressed": "shape"}.get(suffix)
        if stand_in is not None and f"{module}.{stand_in}" in ckpt.tensors:
            dims = reader.tensor(ckpt.tensors[f"{module}.{stand_in}"]).reshape(-1).tolist()
            if len(dims) == 2:
                shapes.setdefault(f"{module}.weight", (int(dims[0]), int(dims[1])))
        shapes[name] = tensor.shape
    return shapes


def _check_dtype(module: str, scheme: Scheme, stored: str, parts: dict[str, SourceTensor]) -> None:
    want = VALUE_DTYPES[scheme.weights.type]
    if stored == "packed":
        if parts["weight_packed"].dtype != "I32" or scheme.weights.type != "int":
            raise FormatError(f"{module}.weight_packed is {parts['weight_packed'].dtype}; 8-bit pack-quantized "
                              "weights are int32 words of int8 values")
        return
    values = parts["weight" if stored == "dense" else "compressed"]
    if values.dtype != want:
        raise FormatError(f"{values.name} is {values.dtype}, but its scheme stores {scheme.weights.type} 8-bit values "
                          f"({want}); the checkpoint is inconsistent")


def _check_scales(module: str, scheme: Scheme, parts: dict[str, SourceTensor], out_f: int,
                  reader: TensorReader) -> None:
    scale = parts.get("weight_scale")
    if scale is None:
        raise FormatError(f"{module} is quantized but has no weight_scale; the checkpoint is incomplete")
    numel = math.prod(scale.shape)
    if scale.dtype not in _SCALE_DTYPES or numel not in (1, out_f):
        raise OptionError(f"{module}.weight_scale is {scale.dtype} {list(scale.shape)}; qformat v1 takes one scale per "
                          f"output channel ({out_f}) or one per tensor")
    if scheme.has_static_input_scale:
        act = parts.get("input_scale")
        if act is None or act.dtype not in _SCALE_DTYPES or math.prod(act.shape) != 1:
            raise OptionError(f"{module} has static activation quantization but no single input_scale; qformat v1 "
                              "takes one static scale per tensor")
    for zp in _ZERO_POINTS:
        if zp in parts and bool(reader.tensor(parts[zp]).to(torch.float32).any()):
            raise OptionError(f"{module}.{zp} is nonzero; qformat v1 is symmetric only")


def _values(plan_stored: str, parts: dict[str, SourceTensor], shape: tuple[int, int],
            reader: TensorReader) -> torch.Tensor | None:
    """The dense quantized values of a module stored dense or packed (None for the 2:4 layout)."""
    if plan_stored == "dense":
        return reader.tensor(parts["weight"])
    if plan_stored == "packed":
        return unpack_int8(reader.tensor(parts["weight_packed"]), shape)
    return None


def _refuse_foreign(structure: ModelStructure, ckpt: SourceCheckpoint) -> None:
    for name in ckpt.tensors:
        module, _, suffix = name.rpartition(".")
        if suffix in ("weight_scale", "weight_packed", "compressed") and module not in structure.linears:
            raise OptionError(f"{module} is quantized but is not a Linear module of the model (e.g. an embedding); "
                              "qformat v1 quantizes Linear modules only")


def _group_scheme(ct: Any, raw: dict[str, Any], groups: _Groups, name: str) -> tuple[Any, str] | None:
    """The compressed-tensors scheme and format that apply to module `name`, or None if it is not quantized."""
    if groups.ignore.matches(name):
        return None
    found: list[tuple[str, Any, str]] = []
    for group_name, scheme in (ct.config_groups or {}).items():
        if groups.targets[group_name].matches(name):
            fmt = getattr(scheme, "format", None) or raw.get("format") or ""
            found.append((group_name, scheme, str(fmt)))
    if not found:
        return None
    distinct = {json.dumps(s.model_dump(exclude={"targets", "format"}, mode="json"), sort_keys=True) for _, s, _ in found}
    if len(distinct) > 1:
        raise OptionError(f"{name} is targeted by config groups {', '.join(g for g, _, _ in found)} with different "
                          "schemes; the checkpoint is ambiguous")
    return found[0][1], found[0][2]


def _fallback_entry(module: LinearModule, groups: _Groups, note: dict[str, Any]) -> FallbackEntry:
    notes = list_at(note.get("fallback"), "quantization_config.qformat.fallback", nullable=True) or []
    for i, entry in enumerate(notes):
        if isinstance(entry, dict) and entry.get("module") == module.name:
            return FallbackEntry.from_dict(entry, f"quantization_config.qformat.fallback[{i}]")
    default = default_fallback(module)
    if default is not None:
        return default
    where = "its ignore list" if groups.ignore.matches(module.name) else "no config group targets it"
    return FallbackEntry(module=module.name, reason="user",
                         detail=f"kept in full precision by the compressed-tensors checkpoint ({where})")


def _decide_sparsity(modules: dict[str, ModulePlan], candidates: set[str], structure: ModelStructure,
                     record: dict[str, Any]) -> dict[str, ModulePlan]:
    """Store a module 2:4 compressed when it (and every member of its fused group) follows 2:4 and the 2:4 kernels
    take its shape; a legacy 2:4 module that cannot stay 2:4 is written dense."""
    groups = group_modules(list(structure.linears), fused_groups_for(structure.model_type))
    group_of = {m: g for g in groups for m in g}
    kept_dense: dict[str, str] = {}
    decided: dict[str, ModulePlan] = {}
    for name, plan in modules.items():
        members = [m for m in group_of.get(name, (name,)) if m in modules]
        sparse_scheme = plan.scheme.with_sparsity(SPARSITY_2_4)
        why = None
        for m in members:
            if m not in candidates:
                why = f"{m} does not follow 2:4" if m != name else "does not follow 2:4"
                break
            problem = shape_problem(sparse_scheme, modules[m].out_features, modules[m].in_features)
            if problem is not None:
                why = problem if m == name else f"its fused partner {m}: {problem}"
                break
        if why is None:
            decided[name] = ModulePlan(name, sparse_scheme, plan.stored, plan.out_features, plan.in_features,
                                       plan.source_tensors)
        else:
            decided[name] = plan
            if name in candidates:
                kept_dense[name] = why
    record["sparse_2_4"] = sorted(n for n, p in decided.items() if p.sparse)
    record["sparse_2_4_kept_dense"] = dict(sorted(kept_dense.items()))
    return decided


def _check_fused(structure: ModelStructure, modules: dict[str, ModulePlan]) -> None:
    """Refuse a fused group whose members the checkpoint stores differently (the import cannot requantize)."""
    groups = group_modules(list(structure.linears), fused_groups_for(structure.model_type))
    group = fused_mismatch(groups, {m: modules[m].scheme if m in modules else None for g in groups for m in g})
    if group is not None:
        listing = ", ".join(f"{m} ({'full precision' if m not in modules else 'quantized'})" for m in group)
        raise OptionError(f"{', '.join(group)} are one fused matrix in serving engines and must share one scheme "
                          f"in qformat, but the checkpoint stores them differently: {listing}")


def plan_import(folder: Path, ckpt: SourceCheckpoint, reader: TensorReader) -> ImportPlan:
    """Decide how every Linear module of the compressed-tensors checkpoint in `folder` is imported."""
    config = load_json(folder / "config.json", error=FormatError)
    if not isinstance(config, dict):
        raise FormatError("SOURCE's config.json is not a JSON object; fix or re-download it")
    raw, ct = read_ct_config(config)
    groups = _Groups.of(ct)
    sparsity = _sparsity(raw, config)
    note = raw.get("qformat") if isinstance(raw.get("qformat"), dict) else {}
    if ckpt.format != "safetensors":
        raise FormatError("SOURCE stores its weights as .bin; compressed-tensors checkpoints are safetensors")
    structure = analyze_structure(folder, _dense_shapes(ckpt, reader), quantized=True)
    _refuse_foreign(structure, ckpt)
    parts_of = _module_suffixes(ckpt.tensors, structure.linears)
    modules: dict[str, ModulePlan] = {}
    candidates: set[str] = set()
    fallback: list[FallbackEntry] = []
    formats: set[str] = set()
    for name, linear in structure.linears.items():
        parts = parts_of.get(name, {})
        found = _group_scheme(ct, raw, groups, name)
        if found is None:
            if "weight_scale" in parts:
                raise FormatError(f"{name} stores quantized tensors but no config group quantizes it")
            weight = parts.get("weight")
            if weight is not None and weight.dtype not in FULL_PRECISION_DTYPES:
                raise FormatError(f"{name} is not quantized by the config but stores a {weight.dtype} weight")
            fallback.append(_fallback_entry(linear, groups, note))
            continue
        ct_scheme, fmt = found
        if fmt not in _FORMATS:
            raise OptionError(f"{name} is stored in compressed-tensors format {fmt!r}; qformat imports "
                              f"{', '.join(_FORMATS)} (8-bit)")
        formats.add(fmt)
        scheme = scheme_from_ct(ct_scheme, name)
        stored = next((k for k, names in LAYOUT_TENSORS.items() if all(n in parts for n in names)), None)
        if stored is None or (stored == "packed") != (fmt == "pack-quantized"):
            raise FormatError(f"{name} does not store the tensors of format {fmt!r} "
                              f"(found {', '.join(sorted(parts)) or 'none'})")
        allowed = {*LAYOUT_TENSORS[stored], "weight_scale", "bias", *_ZERO_POINTS}
        if scheme.has_static_input_scale:
            allowed.add("input_scale")
        extra = sorted(set(parts) - allowed)
        if extra:
            raise OptionError(f"{name}.{extra[0]} has no place in qformat v1 (scheme {fmt}); the checkpoint uses a "
                              "feature qformat cannot represent")
        out_f, in_f = linear.out_features, linear.in_features
        _check_dtype(name, scheme, stored, parts)
        _check_scales(name, scheme, parts, out_f, reader)
        problem = shape_problem(scheme, out_f, in_f)
        if problem is not None and stored != "bitmask":
            raise OptionError(f"{name}: {problem}; qformat v1 cannot store it quantized (its kernels need that shape)")
        values = _values(stored, parts, (out_f, in_f), reader)
        if stored == "bitmask" or (values is not None and follows_2_4(values)):
            candidates.add(name)
        modules[name] = ModulePlan(name, scheme, stored, out_f, in_f,
                                   tuple(t.name for s, t in parts.items() if s != "bias"))
    if not modules:
        raise OptionError("the compressed-tensors config quantizes no Linear module of this model; nothing to import")
    record: dict[str, Any] = {"format": "compressed-tensors", "compressed_tensors_version": raw.get("version"),
                              "formats": sorted(formats), "sparsity_format": sparsity.get("format"),
                              "sparsity_structure": sparsity.get("structure") or None}
    decided = _decide_sparsity(modules, candidates, structure, record)
    _check_fused(structure, decided)
    for name, plan in decided.items():
        if not plan.sparse and shape_problem(plan.scheme, plan.out_features, plan.in_features):
            raise OptionError(f"{name}: {shape_problem(plan.scheme, plan.out_features, plan.in_features)}; qformat v1 "
                              "cannot store it quantized")
    return ImportPlan(config, structure, decided, tuple(fallback), note, record)
