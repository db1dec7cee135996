"""Plan the import of a bitsandbytes LLM.int8() checkpoint: which Linear modules bitsandbytes stored in 8 bits, and
what qformat makes of them.

What bitsandbytes writes (0.50.2 through transformers' `save_pretrained`, safetensors): for every 8-bit Linear `M`,
`M.weight` I8 `[N, K]` (row-wise absmax quantized, values in [-127, 127]), `M.SCB` F32 `[N]` (the row absmax of the
source weight: bitsandbytes dequantizes `weight * SCB * (1/127)`) and `M.weight_format` U8 scalar (0 = "row", the
only layout it still writes or reads); `M.bias` and every other tensor in the model's dtype. config.json's
`quantization_config` is `BitsAndBytesConfig.to_dict()`: `quant_method: "bitsandbytes"`, `load_in_8bit`,
`load_in_4bit`, `llm_int8_threshold`, `llm_int8_skip_modules`, `llm_int8_has_fp16_weight`, ... (no bitsandbytes
version is recorded).

The plan is decided by the tensors, not by re-matching `llm_int8_skip_modules`: a Linear is quantized exactly when
it stores an `SCB`. The skip list only words the fallback entries (see `skip_entry_for`), because transformers'
matching has changed over releases (substring before 5.x; now a prefix up to a module boundary, a regex with that
boundary, or a suffix) and the stored tensors are what bitsandbytes actually did.

Everything qformat v1 cannot hold is refused with the module named: 4-bit checkpoints, fp16 master weights,
weight layouts other than row-major, scales that are not one finite non-negative F32 per row, a quantized module
whose shape qformat's kernels do not take, a fused group (q/k/v) stored partly in 8 bits.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qformat.errors import FormatError, OptionError
from qformat.io.jsonfile import load_json
from qformat.io.source import SourceCheckpoint, SourceTensor, TensorReader
from qformat.models.structure import LinearModule, ModelStructure, analyze_structure
from qformat.quantize.observers import MAX_SCALE
from qformat.spec._typed import bool_at, list_at, number_at, str_at
from qformat.spec.config import FallbackEntry
from qformat.spec.fused import fused_groups_for, fused_mismatch, group_modules
from qformat.spec.layout import FULL_PRECISION_DTYPES, shape_problem
from qformat.spec.schemes import BUILTIN_SCHEMES, Scheme

__all__ = ["BNB_FORMAT", "BnbModule", "BnbPlan", "DEFAULT_THRESHOLD", "MAX_SCB", "plan_bnb_import",
           "read_bnb_config", "skip_entry_for"]

#: provenance.imported_from.format of a bitsandbytes import
BNB_FORMAT = "bitsandbytes-llm-int8"
#: LLM.int8() computes int8 activations per token (bitsandbytes' int8_vectorwise_quant of each input row) against
#: int8 per-row weights: qformat's W8A8 with dynamic per-token activations, plus the outlier threshold.
SCHEME: Scheme = BUILTIN_SCHEMES["w8a8-int8"]
#: BitsAndBytesConfig's default, which transformers applies when config.json does not name a threshold.
DEFAULT_THRESHOLD = 6.0
#: The largest SCB whose scale SCB / 127 a qformat reader accepts (MAX_SCALE: q * s finite for q down to -128).
MAX_SCB = MAX_SCALE["int"] * 127
#: bitsandbytes' weight_format codes (LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING); only "row" is representable.
_ROW = 0
_WEIGHT_FORMATS = {0: "row", 1: "col32", 2: "col_turing", 3: "col_ampere"}
_BNB_SUFFIXES = ("weight", "SCB", "weight_format", "bias")


@dataclass(frozen=True)
class BnbModule:
    """One 8-bit Linear module: its source tensors and the rows whose SCB is 0 (bitsandbytes' all-zero rows)."""

    name: str
    out_features: int
    in_features: int
    weight: SourceTensor
    scb: SourceTensor
    weight_format: SourceTensor | None
    zero_rows: int

    @property
    def source_tensors(self) -> tuple[str, ...]:
        """Every source tensor the import replaces (the bias is kept as it is)."""
        return tuple(t.name for t in (self.weight, self.scb, self.weight_format) if t is not None)


@dataclass(frozen=True)
class BnbPlan:
    """Everything the importer writes, decided before a byte is written."""

    config: dict[str, Any]  # the source config.json
    structure: ModelStructure
    modules: dict[str, BnbModule]
    fallback: tuple[FallbackEntry, ...]
    outlier_threshold: float | None
    record: dict[str, Any] = field(default_factory=dict)  # provenance.imported_from (bytes added by the writer)


@dataclass(frozen=True)
class BnbSettings:
    """The parts of a bitsandbytes quantization_config that decide the import."""

    threshold: float
    skip_modules: tuple[str, ...]


def read_bnb_config(config: Mapping[str, Any]) -> BnbSettings:
    """The settings of a bitsandbytes 8-bit `quantization_config`; refuse what qformat v1 cannot represent."""
    where = "quantization_config"
    raw = config.get("quantization_config")
    if not isinstance(raw, dict) or raw.get("quant_method") != "bitsandbytes":
        raise FormatError("SOURCE's config.json has no bitsandbytes quantization_config (quant_method "
                          "'bitsandbytes'); it is not a bitsandbytes checkpoint")
    four_bit = raw.get("load_in_4bit", raw.get("_load_in_4bit"))
    eight_bit = raw.get("load_in_8bit", raw.get("_load_in_8bit"))
    if four_bit is True:
        kind = str(raw.get("bnb_4bit_quant_type") or "4-bit").upper()
        raise OptionError(f"SOURCE is a bitsandbytes 4-bit ({kind}) checkpoint; NF4/FP4 blockwise 4-bit weights are "
                          "not representable in qformat v1 (8-bit only): import the 8-bit (load_in_8bit) checkpoint "
                          "or convert the full-precision model")
    if eight_bit is not True:
        raise FormatError(f"{where}.load_in_8bit is {eight_bit!r}; a bitsandbytes LLM.int8() checkpoint says true")
    if raw.get("llm_int8_has_fp16_weight") not in (None, False):
        bool_at(raw.get("llm_int8_has_fp16_weight"), f"{where}.llm_int8_has_fp16_weight")
        raise OptionError("SOURCE keeps fp16 master weights (llm_int8_has_fp16_weight: true), a bitsandbytes "
                          "training setup whose stored weights are not int8; convert the full-precision weights "
                          "with `qformat convert` instead")
    threshold = number_at(raw.get("llm_int8_threshold"), f"{where}.llm_int8_threshold", nullable=True)
    if threshold is None:
        threshold = DEFAULT_THRESHOLD
    if not math.isfinite(threshold):
        raise FormatError(f"{where}.llm_int8_threshold is {threshold}; it must be a finite number")
    skip = list_at(raw.get("llm_int8_skip_modules"), f"{where}.llm_int8_skip_modules", nullable=True) or []
    for i, entry in enumerate(skip):
        str_at(entry, f"{where}.llm_int8_skip_modules[{i}]")
    return BnbSettings(float(threshold), tuple(skip))


def skip_entry_for(name: str, skip_modules: tuple[str, ...]) -> str | None:
    """The `llm_int8_skip_modules` entry that names module `name`, or None.

    An entry names a module when any matching rule transformers has used applies: the entry is a substring of the
    name (bitsandbytes' and transformers' rule up to 4.x: `key in name`), or a regular expression that matches from
    the start up to a module boundary, or a suffix of the name (transformers 5's `should_convert_module`). Only the
    fallback entry's wording depends on it: whether a module is quantized is read from its tensors.
    """
    for entry in skip_modules:
        if entry in name or name.endswith(entry):
            return entry
        try:
            if re.match(rf"(?:{entry})(?:(?<=\.)|(?=\.|$))", name):
                return entry
        except re.error:
            continue
    return None


def _fallback_entry(module: LinearModule, skip_modules: tuple[str, ...]) -> FallbackEntry:
    entry = skip_entry_for(module.name, skip_modules)
    if entry is not None:
        return FallbackEntry(module=module.name, reason="user",
                             detail=f"kept in full precision by the bitsandbytes checkpoint (llm_int8_skip_modules "
                                    f"entry {entry!r})")
    if module.tied:
        detail = "output embedding tied to the input embeddings; bitsandbytes left it unquantized"
    elif not module.in_checkpoint:
        detail = "not in the source checkpoint (transformers initializes it); bitsandbytes left it unquantized"
    else:
        detail = ("kept in full precision by the bitsandbytes checkpoint (not named by llm_int8_skip_modules; "
                  "transformers' defaults kept it)")
    return FallbackEntry(module=module.name, reason="user", detail=detail)


def _parts(ckpt: SourceCheckpoint, linears: Mapping[str, LinearModule]) -> dict[str, dict[str, SourceTensor]]:
    by_module: dict[str, dict[str, SourceTensor]] = {}
    for name, tensor in ckpt.tensors.items():
        module, _, suffix = name.rpartition(".")
        if suffix in ("SCB", "weight_format") and module not in linears:
            raise OptionError(f"{module} is stored in 8 bits (it has an {suffix}) but is not a torch.nn.Linear of the "
                              "model (e.g. a Conv1D or an embedding); qformat v1 quantizes Linear modules only")
        if module in linears:
            by_module.setdefault(module, {})[suffix] = tensor
    return by_module


def _check_weight_format(name: str, tensor: SourceTensor | None, reader: TensorReader) -> None:
    if tensor is None:
        return  # bitsandbytes reads a missing weight_format as "row"
    if tensor.dtype not in ("U8", "I8", "I16", "I32", "I64") or math.prod(tensor.shape) != 1:
        raise FormatError(f"{tensor.name} is {tensor.dtype} {list(tensor.shape)}; bitsandbytes writes one integer "
                          "code (U8, 0 = row)")
    code = int(reader.tensor(tensor).reshape(-1)[0])
    if code != _ROW:
        layout = _WEIGHT_FORMATS.get(code, f"unknown code {code}")
        raise OptionError(f"{name}.weight_format is {layout!r}; qformat imports the row-major layout only (code 0, "
                          "what bitsandbytes >= 0.43 writes): re-save the model with a current bitsandbytes")


def _check_scb(name: str, scb: SourceTensor, out_f: int, reader: TensorReader) -> int:
    """Refuse an SCB that is not F32 [out] with finite, non-negative, representable values; return its zero count."""
    if scb.dtype != "F32" or scb.shape != (out_f,):
        raise FormatError(f"{scb.name} is {scb.dtype} {list(scb.shape)}; bitsandbytes stores one F32 row absmax per "
                          f"output row ([{out_f}]); the checkpoint is damaged")
    values = reader.tensor(scb)
    if not bool(torch.isfinite(values).all()):
        raise FormatError(f"{scb.name} holds NaN or Inf; the checkpoint is damaged (re-download or re-quantize it)")
    if bool((values < 0).any()):
        raise FormatError(f"{scb.name} holds a negative row absmax; the checkpoint is damaged")
    if bool((values > MAX_SCB).any()):
        raise OptionError(f"{scb.name} holds a row absmax above {MAX_SCB:.4g}, whose scale SCB/127 would "
                          "dequantize to Inf in fp32; qformat cannot store it")
    return int((values == 0).sum())


def _module(linear: LinearModule, parts: dict[str, SourceTensor], reader: TensorReader) -> BnbModule:
    name = linear.name
    for suffix in ("weight", "SCB"):
        if suffix not in parts:
            raise FormatError(f"{name} is stored in 8 bits but has no {suffix}; the checkpoint is incomplete")
    extra = sorted(set(parts) - set(_BNB_SUFFIXES))
    if extra:
        raise OptionError(f"{name}.{extra[0]} has no place in a bitsandbytes LLM.int8() module or in qformat v1")
    weight = parts["weight"]
    out_f, in_f = linear.out_features, linear.in_features
    if weight.dtype != "I8" or weight.shape != (out_f, in_f):
        raise FormatError(f"{weight.name} is {weight.dtype} {list(weight.shape)}, but its SCB makes it an 8-bit "
                          f"module: bitsandbytes stores I8 [{out_f}, {in_f}]")
    _check_weight_format(name, parts.get("weight_format"), reader)
    zero_rows = _check_scb(name, parts["SCB"], out_f, reader)
    problem = shape_problem(SCHEME, out_f, in_f)
    if problem is not None:
        raise OptionError(f"{name}: {problem}; qformat v1 cannot store it quantized (its kernels need that shape) and "
                          "an import does not requantize")
    return BnbModule(name, out_f, in_f, weight, parts["SCB"], parts.get("weight_format"), zero_rows)


def _check_fused(structure: ModelStructure, modules: Mapping[str, BnbModule]) -> None:
    """bitsandbytes quantizes each Linear on its own; a fused group stored partly in 8 bits cannot be served."""
    groups = group_modules(list(structure.linears), fused_groups_for(structure.model_type))
    group = fused_mismatch(groups, {m: m in modules for g in groups for m in g})
    if group is not None:
        listing = ", ".join(f"{m} ({'8-bit' if m in modules else 'full precision'})" for m in group)
        raise OptionError(f"{', '.join(group)} are one fused matrix in serving engines and must share one scheme in "
                          f"qformat, but the bitsandbytes checkpoint stores them differently: {listing}")


def _shapes(ckpt: SourceCheckpoint) -> dict[str, tuple[int, ...]]:
    return {n: t.shape for n, t in ckpt.tensors.items() if n.rpartition(".")[2] not in ("SCB", "weight_format")}


def plan_bnb_import(folder: Path, ckpt: SourceCheckpoint, reader: TensorReader) -> BnbPlan:
    """Decide how every Linear module of the bitsandbytes checkpoint in `folder` is imported."""
    config = load_json(folder / "config.json", error=FormatError)
    if not isinstance(config, dict):
        raise FormatError("SOURCE's config.json is not a JSON object; fix or re-download it")
    settings = read_bnb_config(config)
    if ckpt.format != "safetensors":
        raise FormatError("SOURCE stores its weights as .bin; qformat imports bitsandbytes checkpoints saved as "
                          "safetensors (load it with bitsandbytes and save_pretrained it again)")
    structure = analyze_structure(folder, _shapes(ckpt), quantized=True)
    parts_of = _parts(ckpt, structure.linears)
    modules: dict[str, BnbModule] = {}
    fallback: list[FallbackEntry] = []
    for name, linear in structure.linears.items():
        parts = parts_of.get(name, {})
        if "SCB" in parts or "weight_format" in parts or (parts.get("weight") and parts["weight"].dtype == "I8"):
            modules[name] = _module(linear, parts, reader)
            continue
        weight = parts.get("weight")
        if weight is not None and weight.dtype not in FULL_PRECISION_DTYPES:
            raise FormatError(f"{weight.name} is {weight.dtype} without an SCB; bitsandbytes stores kept modules in "
                              "the model's float dtype and 8-bit ones as I8 + SCB")
        fallback.append(_fallback_entry(linear, settings.skip_modules))
    if not modules:
        raise OptionError("the bitsandbytes checkpoint stores no Linear module in 8 bits (no SCB tensor); there is "
                          "nothing to import: convert it with `qformat convert`")
    _check_fused(structure, modules)
    threshold = settings.threshold if settings.threshold > 0 else None  # bitsandbytes decomposes only above 0
    record: dict[str, Any] = {
        "format": BNB_FORMAT,
        "bitsandbytes_version": None,  # bitsandbytes records none; transformers_version says what saved it
        "transformers_version": config.get("transformers_version") if isinstance(
            config.get("transformers_version"), str) else None,
        "llm_int8_threshold": settings.threshold,
        "llm_int8_skip_modules": list(settings.skip_modules),
        "scale": "weight_scale = SCB / 127 (fp32 division); SCB == 0 rows: weight_scale 1.0, values 0",
        "zero_rows": {m: p.zero_rows for m, p in modules.items() if p.zero_rows},
    }
    return BnbPlan(config, structure, modules, tuple(fallback), threshold, record)
