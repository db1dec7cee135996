"""Tensor names, dtypes and shapes of a quantized module, and the shape rules a module must meet to be quantized.

Dtypes are safetensors header codes ("I8", "F8_E4M3", ...), so this module needs no torch. The names are those
compressed-tensors uses for the same data: `weight` + `weight_scale` for dense modules, and the legacy
`sparse-24-bitmask` names `compressed` + `bitmask` + `shape` for 2:4 modules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from qformat.spec.schemes import Scheme

__all__ = [
    "DENSE_SUFFIXES",
    "DTYPE_SIZES",
    "FULL_PRECISION_DTYPES",
    "QUANTIZABLE_DTYPES",
    "QUANTIZED_MARKER",
    "SCALE_DTYPE",
    "SCALE_SUFFIXES",
    "SPARSE_SUFFIXES",
    "StoredTensor",
    "VALUE_DTYPES",
    "WEIGHT_SUFFIXES",
    "TensorSpec",
    "module_tensors",
    "quantized_nbytes",
    "shape_problem",
    "stored_tensors_problem",
]

#: Scales are always stored as float32, whatever the model's dtype.
SCALE_DTYPE = "F32"

#: Bytes per element of every safetensors dtype code a qformat checkpoint may contain.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip

#: The dtypes of full-precision tensors: what a fallback module's weight and every other float parameter is stored as.
FULL_PRECISION_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
#: The stored dtypes a source weight may have to be quantized: any float (an fp8 source is re-quantized from its
#: values).
QUANTIZABLE_DTYPES = FULL_PRECISION_DTYPES | {"F8_E4M3", "F8_E5M2"}

#: The dtype a quantized module's values are stored in, per quantization type (`QuantArgs.type`).
VALUE_DTYPES = {"int": "I8", "float": "F8_E4M3"}

# Tensor-name suffixes (relative to the module name) of a quantized module, by role:
#: the values of a dense module;
DENSE_SUFFIXES = ("weight",)
#: the values of a 2:4 module (compressed-tensors' legacy `sparse-24-bitmask` names);
SPARSE_SUFFIXES = ("compressed", "bitmask", "shape")
#: its scales (`input_scale` only with static activation quantization);
SCALE_SUFFIXES = ("weight_scale", "input_scale")
#: every one of them.
WEIGHT_SUFFIXES = DENSE_SUFFIXES + SCALE_SUFFIXES + SPARSE_SUFFIXES
#: The suffix every quantized module stores and no other tensor has: a module is quantized iff it stores one.
QUANTIZED_MARKER = "weight_scale"


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a checkpoint as the header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = DTYPE_SIZES[self.dtype]
        for dim in self.shape:
            n *= dim
        return n


def module_tensors(module: str, scheme: Scheme, out_features: int, in_features: int) -> list[TensorSpec]:
    """The tensors a module quantized with `scheme` stores (a bias, if any, is stored unchanged and not listed).

    Dense: `weight` [out, in] (I8 or F8_E4M3) and `weight_scale` [out, 1] F32. 2:4: `compressed` [out, in/2] holding
    the kept values row by row, `bitmask` U8 [out, ceil(in/8)] (bit j of byte k is column 8k+j, 1 = kept) and `shape`
    I64 [2, 1] = [[out], [in]], plus `weight_scale`. A static activation scale adds `input_scale` F32 [1].
    """
    value = VALUE_DTYPES[scheme.weights.type]
    if scheme.sparsity is None:
        tensors = [TensorSpec(f"{module}.weight", value, (out_features, in_features))]
    else:
        tensors = [
            TensorSpec(f"{module}.compressed", value, (out_features, in_features // 2)),
            TensorSpec(f"{module}.bitmask", "U8", (out_features, -(-in_features // 8))),
            TensorSpec(f"{module}.shape", "I64", (2, 1)),
        ]
    tensors.append(TensorSpec(f"{module}.weight_scale", SCALE_DTYPE, (out_features, 1)))
    if scheme.has_static_input_scale:
        tensors.append(TensorSpec(f"{module}.input_scale", SCALE_DTYPE, (1,)))
    return tensors


class StoredTensor(Protocol):
    """What a reader knows of a stored tensor before reading it (a safetensors header entry has both)."""

    dtype: str
    shape: tuple[int, ...]


def stored_tensors_problem(stored: Mapping[str, StoredTensor], module: str,
                           specs: list[TensorSpec]) -> tuple[str, str] | None:
    """How the tensors stored for `module` differ from the scheme's `specs` (from `module_tensors`), as
    (tensor name, kind) for the first difference, or None; `stored` maps every tensor name to its header entry.

    Kinds: "missing" (a tensor the scheme needs is absent), "mismatch" (present with another dtype or shape), "extra"
    (the module stores another of `WEIGHT_SUFFIXES` that the scheme does not have). Readers word the error."""
    for spec in specs:
        found = stored.get(spec.name)
        if found is None:
            return spec.name, "missing"
        if (found.dtype, tuple(found.shape)) != (spec.dtype, spec.shape):
            return spec.name, "mismatch"
    wanted = {spec.name for spec in specs}
    extra = sorted(name for suffix in WEIGHT_SUFFIXES
                   if (name := f"{module}.{suffix}") in stored and name not in wanted)
    return (extra[0], "extra") if extra else None


def quantized_nbytes(scheme: Scheme, out_features: int, in_features: int) -> int:
    """Bytes a quantized module's tensors take (the formula docs/FORMAT.md gives), bias excluded."""
    return sum(t.nbytes for t in module_tensors("m", scheme, out_features, in_features))


def shape_problem(scheme: Scheme, out_features: int, in_features: int) -> str | None:
    """Why a module of this shape cannot take `scheme`, or None if it can.

    Format v1 rules (docs/FORMAT.md, "Shape rules"): every quantized module needs in and out features that are
    multiples of 16 (the CPU int8 weight-only kernel with bf16 activations needs K % 16 == 0, CUDA `_scaled_mm` needs
    both dimensions % 16, `_int_mm` % 8); a 2:4 module also needs multiples of 32 (cuSPARSELt's int8/fp8 tile).
    """
    multiple = 32 if scheme.sparsity is not None else 16
    bad = [f"{label}={size}" for label, size in (("out_features", out_features), ("in_features", in_features))
           if size % multiple != 0 or size == 0]  # fmt: skip
    if bad:
        what = "2:4 kernels need" if scheme.sparsity is not None else "int8/fp8 kernels need"
        return f"{', '.join(bad)}: {what} multiples of {multiple}"
    return None
