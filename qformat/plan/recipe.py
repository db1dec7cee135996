"""`QuantRecipe`: what to quantize and how, validated once; the one set of options every quantization path takes.

`qformat convert` (through `ConvertOptions`, which adds its I/O options), `from_pretrained(...,
quantization_config=QFormatConfig(...))` and `qformat.quantize_` all build one of these, so a name, a default or a
check is written once: the scheme and its override targets resolve to format schemes here, patterns are checked here
(syntax, length, count), and `to_record`/`command_args` are how every path records the recipe in provenance.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any

from qformat.errors import OptionError
from qformat.quantize.observers import OBSERVERS
from qformat.search.criterion import FallbackBudget
from qformat.smooth.options import SmoothQuant
from qformat.spec.patterns import PatternSet, RuleSet
from qformat.spec.schemes import SPARSITY_2_4, Scheme, decomposes, resolve_scheme_name

__all__ = ["AUTO_DTYPE", "DTYPES", "FULL_PRECISION", "QuantRecipe", "parse_override"]

#: The override target that keeps matching modules in full precision (fallback reason "user").
FULL_PRECISION = "none"
#: `dtype` value meaning: the source config's `dtype`/`torch_dtype`, else each tensor's stored dtype.
AUTO_DTYPE = "auto"
#: Dtypes the tensors kept in full precision may be written in (safetensors dtype codes).
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def parse_override(text: str) -> tuple[str, str]:
    """"PATTERN=SCHEME" -> (pattern, scheme). The last "=" splits, so regexes may contain "="."""
    pattern, sep, scheme = text.rpartition("=")
    if not sep or not pattern or not scheme:
        raise OptionError(f"override {text!r} must look like PATTERN=SCHEME, e.g. 're:.*down_proj=fp8-dynamic'")
    return pattern, scheme


def _overrides(value: Any) -> tuple[tuple[str, str], ...]:
    """Overrides as given by a user: a {pattern: scheme} dict, "PATTERN=SCHEME" strings or (pattern, scheme) pairs."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (str, bytes)):
        raise OptionError("overrides must be a {pattern: scheme} dict or a list of 'PATTERN=SCHEME' strings")
    else:
        items = [parse_override(o) if isinstance(o, str) else tuple(o) for o in value]
    for item in items:
        if len(item) != 2 or not all(isinstance(part, str) for part in item):
            raise OptionError(f"override {item!r} must be a (pattern, scheme) pair of strings")
    return tuple((p, s) for p, s in items)


def _options(value: Any, kind: type, what: str, where: str) -> Any:
    """An options dataclass given as None/False (off), True (its defaults), a dict of its fields or an instance."""
    if value is None or value is False:
        return None
    if value is True:
        return kind()
    if isinstance(value, dict):
        try:
            return kind(**value)
        except TypeError as exc:
            raise OptionError(f"{what}: {exc}; see {where} for its fields") from None
    if not isinstance(value, kind):
        raise OptionError(f"{what} must be True, a dict or a {kind.__name__}, not {type(value).__name__}")
    return value


def _threshold(value: Any) -> float | None:
    """LLM.int8()'s outlier threshold: None, or a positive finite number (bitsandbytes users try 5, 6 and 8)."""
    if value is None:
        return None
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        raise OptionError(f"--outlier-threshold must be a number such as 6.0, got {value!r}") from None
    if isinstance(value, bool) or not 0 < threshold < float("inf"):
        raise OptionError(f"--outlier-threshold must be a positive finite number such as 6.0, got {value!r}")
    return threshold


def _dtype_name(value: Any) -> str:
    """"auto", or the name of a float dtype ("bfloat16"); accepts torch dtypes and "bf16"-style short names."""
    text = str(value).removeprefix("torch.") if value is not None else AUTO_DTYPE
    text = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}.get(
        text, text)
    if text != AUTO_DTYPE and text not in DTYPES:
        raise OptionError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {value!r}")
    return text


@dataclass(frozen=True, kw_only=True)
class QuantRecipe:
    """What to quantize and how. `observer=None` means the scheme's default: "mse" for fp8 schemes, "absmax" else.

    `overrides` are (pattern, scheme-or-"none") pairs (a {pattern: scheme} dict or "PATTERN=SCHEME" strings are
    accepted and normalized); `ignore` patterns keep modules in full precision. Patterns are exact module names or
    "re:<regex>" (compressed-tensors/vLLM semantics), matched against checkpoint names. `sparsity="2:4"` adds 2:4 to
    every scheme. `dtype` is the dtype of the tensors kept in full precision ("auto": the source's).
    `auto_fallback` (a `FallbackBudget`, or True for the default 1 % budget) keeps the most sensitive modules in full
    precision until the measured loss fits the budget (`qformat.search`).
    `outlier_threshold` makes the int8 W8A8 modules run LLM.int8()'s decomposition: input columns where a token
    reaches the threshold are multiplied in float (docs/FORMAT.md section 8.4); it is recorded in the checkpoint.
    `smoothquant` (a `SmoothQuant`, or True for alpha 0.5 on the built-in calibration text) folds SmoothQuant's
    per-channel factors into the model before quantizing (`qformat.smooth`).
    """

    scheme: str = "w8a8-int8"
    ignore: tuple[str, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()
    observer: str | None = None
    sparsity: str | None = None
    dtype: str = AUTO_DTYPE
    auto_fallback: FallbackBudget | None = None
    outlier_threshold: float | None = None
    smoothquant: SmoothQuant | None = None
    schemes: dict[str, Scheme] = field(init=False, repr=False, compare=False)
    default_scheme: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.scheme, str):
            raise OptionError(f"scheme must be a scheme name such as 'w8a8-int8', got {self.scheme!r}")
        if isinstance(self.ignore, str):
            object.__setattr__(self, "ignore", (self.ignore,))
        object.__setattr__(self, "ignore", tuple(self.ignore))
        object.__setattr__(self, "overrides", _overrides(self.overrides))
        object.__setattr__(self, "dtype", _dtype_name(self.dtype))
        object.__setattr__(self, "auto_fallback", _options(self.auto_fallback, FallbackBudget, "auto_fallback",
                                                           "qformat.search.FallbackBudget"))
        object.__setattr__(self, "outlier_threshold", _threshold(self.outlier_threshold))
        object.__setattr__(self, "smoothquant", _options(self.smoothquant, SmoothQuant, "smoothquant",
                                                         "qformat.smooth.SmoothQuant"))
        if self.sparsity not in (None, SPARSITY_2_4):
            raise OptionError(f"sparsity must be '2:4', not {self.sparsity!r}")
        if self.observer is not None and self.observer not in OBSERVERS:
            raise OptionError(f"unknown observer {self.observer!r}; choose one of: {', '.join(OBSERVERS)}")
        PatternSet(self.ignore, what="--ignore")  # each pattern valid, within the length and count limits
        RuleSet(self.overrides, what="--override")
        schemes: dict[str, Scheme] = {}
        default, scheme = resolve_scheme_name(self.scheme, sparsity=self.sparsity)
        schemes[default] = scheme
        for _, target in self.overrides:
            if target.strip().lower() != FULL_PRECISION:
                name, sch = resolve_scheme_name(target, sparsity=self.sparsity)
                schemes[name] = sch
        object.__setattr__(self, "schemes", schemes)
        object.__setattr__(self, "default_scheme", default)
        if self.outlier_threshold is not None and not any(decomposes(s) for s in schemes.values()):
            raise OptionError(f"--outlier-threshold applies to int8 W8A8 modules (w8a8-int8), and no scheme of this "
                              f"recipe is one ({', '.join(schemes)}); use --scheme w8a8-int8 or drop the threshold")
        if self.smoothquant is not None and not any(s.input_activations is not None for s in schemes.values()):
            raise OptionError(f"--smoothquant helps schemes that quantize activations (w8a8-int8, fp8-dynamic), and "
                              f"no scheme of this recipe does ({', '.join(schemes)}); drop --smoothquant")

    @property
    def calibrates(self) -> bool:
        """Whether quantizing needs the full-precision model run on text first (SmoothQuant's activation maxima, the
        fallback search): `from_pretrained` then loads in float32 and quantizes after loading."""
        return self.auto_fallback is not None or self.smoothquant is not None

    def canonical_override(self, target: str) -> str:
        """The scheme name an override's target resolves to, or "none"."""
        if target.strip().lower() == FULL_PRECISION:
            return FULL_PRECISION
        return resolve_scheme_name(target, sparsity=self.sparsity)[0]

    def observer_for(self, scheme: Scheme) -> str:
        if self.observer is not None:
            return self.observer
        return "mse" if scheme.weights.type == "float" else "absmax"

    def recipe(self) -> QuantRecipe:
        """The recipe alone (a subclass's extra options dropped): what two quantizations must share to agree."""
        return QuantRecipe(scheme=self.scheme, ignore=self.ignore, overrides=self.overrides, observer=self.observer,
                           sparsity=self.sparsity, dtype=self.dtype, auto_fallback=self.auto_fallback,
                           outlier_threshold=self.outlier_threshold, smoothquant=self.smoothquant)

    def to_record(self) -> dict[str, Any]:
        """The recipe as recorded in the checkpoint's provenance (`options`)."""
        return {
            "scheme": self.scheme,
            "ignore": list(self.ignore),
            "overrides": [f"{p}={s}" for p, s in self.overrides],
            "observer": self.observer,
            "sparsity": self.sparsity,
            "dtype": self.dtype,
            **({"auto_fallback": self.auto_fallback.to_record()} if self.auto_fallback is not None else {}),
            **({"outlier_threshold": self.outlier_threshold} if self.outlier_threshold is not None else {}),
            **({"smoothquant": self.smoothquant.to_record()} if self.smoothquant is not None else {}),
        }

    def command_args(self) -> list[str]:
        """The recipe as `qformat convert` arguments."""
        parts = ["--scheme", self.scheme]
        for pattern in self.ignore:
            parts += ["--ignore", pattern]
        for pattern, target in self.overrides:
            parts += ["--override", f"{pattern}={target}"]
        if self.observer:
            parts += ["--observer", self.observer]
        if self.sparsity:
            parts += ["--sparsity", self.sparsity]
        if self.dtype != AUTO_DTYPE:
            parts += ["--dtype", self.dtype]
        if self.outlier_threshold is not None:
            parts += ["--outlier-threshold", f"{self.outlier_threshold:g}"]
        if self.smoothquant is not None:
            parts += self.smoothquant.command_args()
        if self.auto_fallback is not None:
            parts += self.auto_fallback.command_args()
        return parts

    def command(self, source_label: str) -> str:
        """An equivalent `qformat convert` command line, with SOURCE shown as `source_label` and OUTPUT as "OUTPUT"."""
        return " ".join(shlex.quote(p) for p in ["qformat", "convert", source_label, "OUTPUT", *self.command_args()])
