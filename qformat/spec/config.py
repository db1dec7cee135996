"""The `quantization_config` block of a qformat checkpoint's config.json, as a frozen dataclass.

`CheckpointConfig.from_dict` is the one place that decides whether a reader understands a checkpoint: it refuses an
unknown major `format_version`, checks every key it needs, and ignores keys it does not know (so later minor additions
stay readable). docs/FORMAT.md is the normative description; this module implements it without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from qformat.errors import FormatError, OptionError, UnsupportedFormatVersionError
from qformat.spec._typed import int_at, list_at, number_at, object_at, short, str_at
from qformat.spec.fused import FusedGroups
from qformat.spec.patterns import RuleSet
from qformat.spec.schemes import Scheme

__all__ = [
    "FALLBACK_REASONS",
    "FORMAT_VERSION",
    "OUTLIER_FORMAT_VERSION",
    "QUANT_METHOD",
    "READABLE_VERSIONS",
    "FallbackEntry",
    "CheckpointConfig",
]

QUANT_METHOD = "qformat"
#: The newest format major version this code reads and writes. Additions that old readers may ignore keep the
#: number; anything an old reader would misread bumps it. A writer records the *lowest* version whose readers compute
#: the checkpoint as it was made (ZIP's "version needed to extract"), so a checkpoint that uses nothing new stays
#: readable by older readers (docs/FORMAT.md section 1).
FORMAT_VERSION = 2
#: Every version this code reads.
READABLE_VERSIONS = (1, 2)
#: The version that added `outlier_threshold` (LLM.int8() decomposition, docs/FORMAT.md section 8.4): a version-1
#: reader would ignore the key and compute plain W8A8, less precisely than the checkpoint was measured with.
OUTLIER_FORMAT_VERSION = 2

#: Why a Linear module is kept in full precision. `user`: --ignore or an override to "none"; `default`: kept by
#: qformat's defaults (the output embedding); `sensitivity`: a fallback search measured it; `shape`: no kernel of the
#: scheme takes its dimensions; `fused`: kept because a member of its fused group is.
FALLBACK_REASONS = ("user", "default", "sensitivity", "shape", "fused")


@dataclass(frozen=True, kw_only=True)
class FallbackEntry:
    """One module kept in full precision, with the reason and, for `sensitivity`, the measured figure."""

    module: str
    reason: str
    detail: str = ""
    measured: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.reason not in FALLBACK_REASONS:
            raise FormatError(
                f"fallback reason for {self.module!r} is {self.reason!r}; it must be one of {', '.join(FALLBACK_REASONS)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "reason": self.reason, "detail": self.detail, "measured": self.measured}

    @classmethod
    def from_dict(cls, data: Any, where: str = "fallback entry") -> FallbackEntry:
        """Parse `{"module", "reason", "detail", "measured"}`; `where` names the entry in errors."""
        if not isinstance(data, dict) or not isinstance(data.get("module"), str) or "reason" not in data:
            raise FormatError(f"{where} needs 'module' and 'reason', got {short(data)}")
        if not data["module"]:
            raise FormatError(f"{where}.module is empty; it must name a Linear module")
        return cls(
            module=data["module"],
            reason=str_at(data["reason"], f"{where}.reason"),
            detail=str_at(data.get("detail"), f"{where}.detail", nullable=True) or "",
            measured=object_at(data.get("measured"), f"{where}.measured", nullable=True),
        )


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Everything config.json's `quantization_config` says about a qformat checkpoint (the format's own block).

    Not to be confused with `qformat.QFormatConfig`, the user's quantization request (scheme, ignore, overrides),
    which transformers' `from_pretrained(..., quantization_config=...)` takes.

    Readers need `schemes`, `default_scheme`, `overrides` and `fallback` to know how every Linear module is stored;
    `outlier_threshold` (format version 2) makes every int8 module with dynamic per-token activations run LLM.int8()'s
    decomposition (docs/FORMAT.md section 8.4). `provenance` and `statistics` describe how the checkpoint was made;
    `evaluation` and `fallback_search` hold results of an evaluation or a fallback search (null until then).

    `format_version` defaults to the lowest version that holds what the config uses (`required_version`).
    """

    format_version: int = 0  # 0: the lowest version that holds this config (set in __post_init__)
    schemes: dict[str, Scheme]
    default_scheme: str
    overrides: tuple[tuple[str, str], ...] = ()
    fallback: tuple[FallbackEntry, ...] = ()
    fused_groups: FusedGroups = ()
    provenance: dict[str, Any] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)
    evaluation: list[dict[str, Any]] | None = None
    fallback_search: dict[str, Any] | None = None
    outlier_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.outlier_threshold is not None:
            threshold = self.outlier_threshold
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
                raise FormatError(f"outlier_threshold must be a positive finite number or null, got {short(threshold)}")
            object.__setattr__(self, "outlier_threshold", float(threshold))
        if self.format_version == 0:
            object.__setattr__(self, "format_version", self.required_version)
        elif self.format_version < self.required_version:
            raise FormatError(f"outlier_threshold needs format_version {OUTLIER_FORMAT_VERSION} (a version-1 reader "
                              f"would ignore it and compute plain W8A8), but the checkpoint says {self.format_version}")
        if self.default_scheme not in self.schemes:
            raise FormatError(f"default_scheme {self.default_scheme!r} is not defined in 'schemes'")
        self._override_rules  # noqa: B018 - validates every pattern (syntax, length, count) once
        for pattern, name in self.overrides:
            if name not in self.schemes:
                raise FormatError(f"override {pattern!r} names scheme {name!r}, which is not defined in 'schemes'")
        seen: set[str] = set()
        for entry in self.fallback:
            if entry.module in seen:
                raise FormatError(f"module {entry.module!r} is listed twice in 'fallback'")
            seen.add(entry.module)

    @property
    def required_version(self) -> int:
        """The lowest format version whose readers compute this checkpoint as its writer did."""
        return OUTLIER_FORMAT_VERSION if self.outlier_threshold is not None else 1

    # -- reading ------------------------------------------------------------------------------------------------
    @cached_property
    def _override_rules(self) -> RuleSet[str]:
        """The overrides compiled once (exact names in a dict, bounded `re:` matching)."""
        try:
            return RuleSet(self.overrides, what="quantization_config.overrides")
        except OptionError as exc:
            raise FormatError(f"overrides: {exc}") from None

    @cached_property
    def fallback_modules(self) -> dict[str, FallbackEntry]:
        return {entry.module: entry for entry in self.fallback}

    def scheme_for(self, module: str) -> tuple[str, Scheme] | None:
        """The (name, scheme) a Linear module is stored with, or None if it is kept in full precision.

        Precedence: the fallback list, then an exact-name override, then the first matching `re:` override, then the
        default scheme.
        """
        if module in self.fallback_modules:
            return None
        try:
            rule = self._override_rules.first(module)
        except OptionError as exc:  # a pattern that proved too slow: the checkpoint's config is at fault
            raise FormatError(f"overrides: {exc}") from None
        name = rule[1] if rule is not None else self.default_scheme
        return name, self.schemes[name]

    # -- (de)serialization --------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "schemes": {name: scheme.to_dict() for name, scheme in self.schemes.items()},
            "default_scheme": self.default_scheme,
            "overrides": [{"pattern": p, "scheme": s} for p, s in self.overrides],
            "fallback": [entry.to_dict() for entry in self.fallback],
            "fused_groups": [list(group) for group in self.fused_groups],
            "provenance": self.provenance,
            "statistics": self.statistics,
            "evaluation": self.evaluation,
            "fallback_search": self.fallback_search,
            **({"outlier_threshold": self.outlier_threshold} if self.outlier_threshold is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CheckpointConfig:
        """Parse a `quantization_config` dict; raise `FormatError` naming the first problem and its key path.

        Every key docs/FORMAT.md defines must have the type it gives (`"false"` is not a boolean, `true` not an
        integer); a key that is absent takes its empty default, keys this version does not know are ignored.
        """
        if not isinstance(data, dict):
            raise FormatError("quantization_config must be a JSON object")
        if data.get("quant_method") != QUANT_METHOD:
            raise FormatError(
                f"quantization_config.quant_method is {short(data.get('quant_method'))}, not {QUANT_METHOD!r}: "
                "this is not a qformat checkpoint"
            )
        version = data.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool):
            raise FormatError(f"quantization_config.format_version must be an integer, got {short(version)}")
        if version not in READABLE_VERSIONS:
            from qformat._version import DISTRIBUTION, __version__

            raise UnsupportedFormatVersionError(
                f"this checkpoint uses qformat format version {version}, but qformat {__version__} reads versions "
                f"{', '.join(map(str, READABLE_VERSIONS))} only; upgrade qformat (pip install -U {DISTRIBUTION})"
            )
        schemes = data.get("schemes")
        if not isinstance(schemes, dict) or not schemes:
            raise FormatError("quantization_config.schemes must be a non-empty object of scheme definitions")
        default = data.get("default_scheme")
        if not isinstance(default, str):
            raise FormatError("quantization_config.default_scheme must name one of 'schemes'")
        return cls(
            format_version=version,
            schemes={name: Scheme.from_dict(s, f"quantization_config.schemes.{name}") for name, s in schemes.items()},
            default_scheme=default,
            overrides=_overrides(data.get("overrides", [])),
            fallback=tuple(FallbackEntry.from_dict(f, f"quantization_config.fallback[{i}]")
                           for i, f in enumerate(list_at(data.get("fallback", []), "quantization_config.fallback"))),
            fused_groups=_fused_groups(data.get("fused_groups", [])),
            provenance=_provenance(data.get("provenance", {})),
            statistics=_statistics(data.get("statistics", {})),
            evaluation=_evaluation(data.get("evaluation")),
            fallback_search=object_at(data.get("fallback_search"), "quantization_config.fallback_search",
                                      nullable=True),
            outlier_threshold=_outlier_threshold(data.get("outlier_threshold"), version),
        )


# -- typed parsing of the keys docs/FORMAT.md section 3 and 11 define ----------------------------------------------


def _overrides(value: Any) -> tuple[tuple[str, str], ...]:
    rules = []
    for i, item in enumerate(list_at(value, "quantization_config.overrides")):
        where = f"quantization_config.overrides[{i}]"
        object_at(item, where)
        rules.append((str_at(item.get("pattern"), f"{where}.pattern"), str_at(item.get("scheme"), f"{where}.scheme")))
    return tuple(rules)


def _fused_groups(value: Any) -> FusedGroups:
    groups = []
    for i, group in enumerate(list_at(value, "quantization_config.fused_groups")):
        members = list_at(group, f"quantization_config.fused_groups[{i}]")
        groups.append(tuple(str_at(m, f"quantization_config.fused_groups[{i}][{j}]") for j, m in enumerate(members)))
    return tuple(groups)


def _string_map(value: Any, where: str) -> dict[str, str]:
    mapping = object_at(value, where)
    for key, item in mapping.items():
        str_at(item, f"{where}[{key!r}]")
    return dict(mapping)


#: provenance.source keys and their types: (kind, nullable).
_SOURCE_KEYS = {"repo_id": "str", "revision": "str", "base_model": "str", "format": "str", "parameters": "int",
                "bytes": "int"}
_READERS = {"str": str_at, "int": int_at, "number": number_at, "object": object_at, "list": list_at}


def _typed_keys(mapping: dict[str, Any], types: dict[str, str], where: str) -> None:
    """Check the type of each key of `types` present in `mapping` (null allowed)."""
    for key, kind in types.items():
        if key in mapping:
            _READERS[kind](mapping[key], f"{where}.{key}", nullable=True)


def _provenance(value: Any) -> dict[str, Any]:
    where = "quantization_config.provenance"
    provenance = object_at(value, where)
    _typed_keys(provenance, {"qformat_version": "str", "command": "str", "options": "object"}, where)
    if provenance.get("environment") is not None:
        _string_map(provenance["environment"], f"{where}.environment")
    source = object_at(provenance.get("source"), f"{where}.source", nullable=True)
    if source is not None:
        _typed_keys(source, _SOURCE_KEYS, f"{where}.source")
        skipped = list_at(source.get("skipped_weight_files"), f"{where}.source.skipped_weight_files", nullable=True)
        for i, name in enumerate(skipped or []):
            str_at(name, f"{where}.source.skipped_weight_files[{i}]")
    if "tensor_hashes" in provenance:
        _string_map(provenance["tensor_hashes"], f"{where}.tensor_hashes")
    smoothing = object_at(provenance.get("smoothquant"), f"{where}.smoothquant", nullable=True)
    if smoothing is not None:
        _typed_keys(smoothing, {"alpha": "number", "calibration": "object", "smoothed": "list", "skipped": "list"},
                    f"{where}.smoothquant")
    imported = object_at(provenance.get("imported_from"), f"{where}.imported_from", nullable=True)
    if imported is not None:
        _typed_keys(imported, {"format": "str", "compressed_tensors_version": "str", "formats": "list",
                               "sparse_2_4": "list", "sparse_2_4_kept_dense": "object"}, f"{where}.imported_from")
    return dict(provenance)


def _statistics(value: Any) -> dict[str, Any]:
    where = "quantization_config.statistics"
    statistics = object_at(value, where)
    _typed_keys(statistics, {"linear_modules": "int", "quantized_modules": "int", "checkpoint_bytes": "int"}, where)
    modules = object_at(statistics.get("modules"), f"{where}.modules", nullable=True)
    for name, entry in (modules or {}).items():
        entry_where = f"{where}.modules[{name!r}]"
        object_at(entry, entry_where)
        _typed_keys(entry, {"scheme": "str", "observer": "str", "rel_error": "number", "rel_quant_error": "number"},
                    entry_where)
    return dict(statistics)


def _outlier_threshold(value: Any, version: int) -> float | None:
    """`outlier_threshold`: a version-2 key. In a version-1 checkpoint it is refused rather than ignored: its writer
    meant it to change the numerics, and a version-1 reader would silently drop it."""
    where = "quantization_config.outlier_threshold"
    threshold = number_at(value, where, nullable=True)
    if threshold is not None and version < OUTLIER_FORMAT_VERSION:
        raise FormatError(f"{where} needs format_version {OUTLIER_FORMAT_VERSION}, but the checkpoint says {version}; "
                          "fix the checkpoint's config (set format_version to 2, or drop the threshold)")
    return threshold


def _evaluation(value: Any) -> list[dict[str, Any]] | None:
    results = list_at(value, "quantization_config.evaluation", nullable=True)
    for i, result in enumerate(results or []):
        object_at(result, f"quantization_config.evaluation[{i}]")
    return results
