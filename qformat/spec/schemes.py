"""Quantization schemes: what a quantized module stores and how its activations are quantized at run time.

A scheme is plain data (no torch import) so that the spec can be read and validated anywhere. The field names follow
compressed-tensors' `QuantizationArgs` (`type`, `num_bits`, `strategy`, `symmetric`, `dynamic`) wherever the meaning
is the same, so that an export to compressed-tensors is a renaming, not a translation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qformat.errors import FormatError, OptionError
from qformat.spec._typed import bool_at, int_at, object_at, short, str_at

__all__ = [
    "BUILTIN_SCHEMES",
    "SPARSITY_2_4",
    "QuantArgs",
    "decomposes",
    "Scheme",
    "resolve_scheme_name",
    "scheme_name_for",
    "scheme_names",
]

SPARSITY_2_4 = "2:4"
_SPARSE_SUFFIX = "+" + SPARSITY_2_4


@dataclass(frozen=True, kw_only=True)
class QuantArgs:
    """How one tensor (weights or input activations) is quantized.

    `type` is "int" (8-bit symmetric integers) or "float" (8-bit float, always e4m3fn in format v1). `strategy` is
    "channel" (one scale per output row, weights only), "token" (one scale per row of the input, computed at run time)
    or "tensor" (one scale for the whole tensor; static activation scales only).
    """

    type: str
    num_bits: int = 8
    strategy: str
    symmetric: bool = True
    dynamic: bool = False

    def __post_init__(self) -> None:
        if self.type not in ("int", "float"):
            raise FormatError(f"quantization type must be 'int' or 'float', not {self.type!r}")
        if self.num_bits != 8:
            raise FormatError(f"format v1 stores 8-bit values only, not {self.num_bits}-bit")
        if self.strategy not in ("channel", "token", "tensor"):
            raise FormatError(f"strategy must be 'channel', 'token' or 'tensor', not {self.strategy!r}")
        if not self.symmetric:
            raise FormatError("format v1 is symmetric only (no zero points)")
        if self.strategy == "token" and not self.dynamic:
            raise FormatError("per-token activation quantization must be dynamic")
        if self.strategy == "tensor" and self.dynamic:
            raise FormatError("per-tensor activation quantization must be static (dynamic false): format v1 has "
                              "dynamic per-token or static per-tensor activation scales")

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "num_bits": self.num_bits,
            "strategy": self.strategy,
            "symmetric": self.symmetric,
            "dynamic": self.dynamic,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "quantization args") -> QuantArgs:
        """Parse compressed-tensors-style args; every field must have its JSON type (`"false"` is not a bool)."""
        object_at(data, where)
        type_ = str_at(data.get("type"), f"{where}.type")
        strategy = str_at(data.get("strategy"), f"{where}.strategy")
        num_bits = int_at(data.get("num_bits", 8), f"{where}.num_bits")
        flags = {key: bool_at(data.get(key, default), f"{where}.{key}")
                 for key, default in (("symmetric", True), ("dynamic", False))}
        try:
            return cls(type=type_, num_bits=num_bits, strategy=strategy, **flags)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class Scheme:
    """Weights + optional input activations + optional 2:4 sparsity, as stored for one module."""

    weights: QuantArgs
    input_activations: QuantArgs | None = None
    sparsity: str | None = None

    def __post_init__(self) -> None:
        if self.weights.strategy != "channel" or self.weights.dynamic:
            raise FormatError("format v1 weights are static and per output channel (strategy 'channel')")
        act = self.input_activations
        if act is not None and act.strategy == "channel":
            raise FormatError("input activations are quantized per 'token' (dynamic) or per 'tensor' (static)")
        if act is not None and act.type != self.weights.type:
            raise FormatError("format v1 quantizes weights and activations with the same type (int/int or float/float)")
        if self.sparsity not in (None, SPARSITY_2_4):
            raise FormatError(f"sparsity must be null or '2:4', not {self.sparsity!r}")

    @property
    def has_static_input_scale(self) -> bool:
        return self.input_activations is not None and not self.input_activations.dynamic

    def to_dict(self) -> dict[str, Any]:
        return {
            "weights": self.weights.to_dict(),
            "input_activations": None if self.input_activations is None else self.input_activations.to_dict(),
            "sparsity": self.sparsity,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "scheme") -> Scheme:
        """Parse `{"weights", "input_activations", "sparsity"}`; `where` names the scheme in errors."""
        if not isinstance(data, dict) or "weights" not in data:
            raise FormatError(f"{where} must be an object with 'weights', got {short(data)}")
        act = data.get("input_activations")
        sparsity = str_at(data.get("sparsity"), f"{where}.sparsity", nullable=True)
        weights = QuantArgs.from_dict(data["weights"], f"{where}.weights")
        acts = None if act is None else QuantArgs.from_dict(act, f"{where}.input_activations")
        try:
            return cls(weights=weights, input_activations=acts, sparsity=sparsity)
        except FormatError as exc:
            raise FormatError(f"{where}: {exc}") from None

    def with_sparsity(self, sparsity: str | None) -> Scheme:
        return Scheme(weights=self.weights, input_activations=self.input_activations, sparsity=sparsity)


_INT8_W = QuantArgs(type="int", strategy="channel")
_FP8_W = QuantArgs(type="float", strategy="channel")
_INT8_TOKEN = QuantArgs(type="int", strategy="token", dynamic=True)
_FP8_TOKEN = QuantArgs(type="float", strategy="token", dynamic=True)

#: The schemes `qformat convert --scheme` knows, by the names users know them by. Each also exists with a "+2:4"
#: suffix (e.g. "fp8-dynamic+2:4"), the same scheme with 2:4 structured sparsity.
BUILTIN_SCHEMES: dict[str, Scheme] = {
    "w8a16-int8": Scheme(weights=_INT8_W),
    "w8a8-int8": Scheme(weights=_INT8_W, input_activations=_INT8_TOKEN),
    "fp8-dynamic": Scheme(weights=_FP8_W, input_activations=_FP8_TOKEN),
    "fp8-weight-only": Scheme(weights=_FP8_W),
}


def decomposes(scheme: Scheme) -> bool:
    """Whether a checkpoint's `outlier_threshold` applies to modules of `scheme` (docs/FORMAT.md section 8.4): int8
    weights with dynamic per-token int8 activations, dense or 2:4. Weight-only schemes keep their activations in full
    precision anyway; fp8 and static int8 activations are outside LLM.int8()'s definition."""
    act = scheme.input_activations
    return scheme.weights.type == "int" and act is not None and act.dynamic and act.strategy == "token"


def scheme_names() -> list[str]:
    """Every scheme name `resolve_scheme_name` accepts, dense names first."""
    return list(BUILTIN_SCHEMES) + [name + _SPARSE_SUFFIX for name in BUILTIN_SCHEMES]


def resolve_scheme_name(name: str, *, sparsity: str | None = None) -> tuple[str, Scheme]:
    """Map a user-facing scheme name (optionally with "+2:4") to its canonical name and definition.

    `sparsity="2:4"` adds 2:4 to a dense name, which is what `--sparsity 2:4` does to every scheme of a conversion.
    """
    base = name.strip().lower()
    sparse = sparsity
    if base.endswith(_SPARSE_SUFFIX):
        base, sparse = base[: -len(_SPARSE_SUFFIX)], SPARSITY_2_4
    if base not in BUILTIN_SCHEMES:
        raise OptionError(f"unknown scheme {name!r}; choose one of: {', '.join(scheme_names())}")
    if sparse not in (None, SPARSITY_2_4):
        raise OptionError(f"unknown sparsity {sparse!r}; the only structured sparsity qformat supports is '2:4'")
    canonical = base + (_SPARSE_SUFFIX if sparse else "")
    return canonical, BUILTIN_SCHEMES[base].with_sparsity(sparse)


def scheme_name_for(scheme: Scheme) -> str:
    """A name for `scheme`: its built-in name where it is one (e.g. "fp8-dynamic+2:4"), else a descriptive one
    in the same style ("w8a8-int8-static" for static per-tensor int8 activations, "fp8-static" for fp8)."""
    dense = scheme.with_sparsity(None)
    suffix = _SPARSE_SUFFIX if scheme.sparsity else ""
    for name, builtin in BUILTIN_SCHEMES.items():
        if builtin == dense:
            return name + suffix
    act = scheme.input_activations
    if act is None or act.dynamic:  # every valid scheme of this kind is built in
        raise FormatError(f"scheme {scheme.to_dict()} is not a format v1 scheme; fix the checkpoint's config")
    return ("w8a8-int8-static" if scheme.weights.type == "int" else "fp8-static") + suffix
