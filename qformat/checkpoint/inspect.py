"""`qformat inspect`: a summary of a checkpoint, as text for people and as a dict for `--json`."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qformat.checkpoint.reader import open_checkpoint
from qformat.spec.schemes import Scheme

__all__ = ["CheckpointSummary", "describe_scheme", "human_bytes", "inspect"]


def describe_scheme(scheme: Scheme) -> str:
    """One line a person can read: "int8 weights per channel, dynamic per-token int8 activations, 2:4 sparse"."""
    dtype = {"int": "int8", "float": "fp8 (e4m3)"}
    parts = [f"{dtype[scheme.weights.type]} weights per output channel"]
    act = scheme.input_activations
    if act is None:
        parts.append("activations unquantized (weight-only)")
    elif act.dynamic:
        parts.append(f"dynamic per-token {dtype[act.type]} activations")
    else:
        parts.append(f"static per-tensor {dtype[act.type]} activations")
    if scheme.sparsity:
        parts.append(f"{scheme.sparsity} structured sparsity")
    return ", ".join(parts)


def human_bytes(n: int | None) -> str:
    """Bytes in decimal units, as the Hub shows file sizes: 90.9 MB."""
    if n is None:
        return "unknown"
    if n < 1000:
        return f"{n} B"
    value, unit = float(n), "B"
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000:
            break
    return f"{value:.1f} {unit}"


@dataclass(frozen=True)
class CheckpointSummary:
    """The facts `qformat inspect` prints."""

    path: str
    format_version: int
    architecture: str | None
    model_type: str | None
    base_model: str | None
    default_scheme: str
    schemes: dict[str, str]
    overrides: list[str]
    linear_modules: int
    quantized_modules: int
    modules_per_scheme: dict[str, int]
    fallback: list[dict[str, Any]]
    fallback_by_reason: dict[str, int]
    source_bytes: int | None
    checkpoint_bytes: int
    ratio: float | None
    mean_rel_error: float | None
    max_rel_error: float | None
    outlier_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        lines = [f"qformat checkpoint {self.path}"]
        add = lines.append
        add(f"  format            qformat v{self.format_version}")
        add(f"  architecture      {self.architecture or '?'} ({self.model_type or '?'})")
        add(f"  base model        {self.base_model or 'unknown'}")
        add(f"  scheme            {self.default_scheme}: {self.schemes[self.default_scheme]}")
        for override in self.overrides:
            add(f"  override          {override}")
        if self.outlier_threshold is not None:
            add(f"  outliers          LLM.int8() decomposition at |x| >= {self.outlier_threshold:g} (int8 W8A8 modules)")
        per_scheme = ", ".join(f"{n} {name}" for name, n in self.modules_per_scheme.items())
        add(f"  Linear modules    {self.quantized_modules}/{self.linear_modules} Linear quantized ({per_scheme or 'none'})")
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.fallback_by_reason.items())
        add(f"  full precision    {len(self.fallback)} module(s) kept{f' ({reasons})' if reasons else ''}")
        for entry in self.fallback[:10]:
            add(f"                    {entry['module']}: {entry['reason']}, {entry['detail']}")
        if len(self.fallback) > 10:
            add(f"                    ... and {len(self.fallback) - 10} more (--json lists all)")
        ratio = f" ({self.ratio:.2f}x smaller)" if self.ratio else ""
        add(f"  size              {human_bytes(self.source_bytes)} -> {human_bytes(self.checkpoint_bytes)}{ratio}")
        if self.mean_rel_error is not None:
            add(f"  weight error      mean {self.mean_rel_error:.4g}, max {self.max_rel_error:.4g} "
                "(relative Frobenius, per module)")
        return "\n".join(lines)


def inspect(folder: str | Path) -> CheckpointSummary:
    """Summarize the checkpoint in `folder` (structure is read from headers; no tensor data is loaded)."""
    ckpt = open_checkpoint(folder)
    q = ckpt.qconfig
    quantized = ckpt.quantized_modules
    per_scheme = Counter(resolved[0] for m in quantized if (resolved := q.scheme_for(m)) is not None)
    stats = q.statistics
    total = stats.get("linear_modules") if isinstance(stats.get("linear_modules"), int) else len(quantized) + len(q.fallback)
    errors = [m.get("rel_error") for m in (stats.get("modules") or {}).values() if isinstance(m, dict)]
    errors = [e for e in errors if isinstance(e, (int, float)) and math.isfinite(e)]
    source = q.provenance.get("source") or {}
    source_bytes = source.get("bytes") if isinstance(source.get("bytes"), int) else None
    archs = ckpt.config.get("architectures") or [None]
    return CheckpointSummary(
        path=str(folder),
        format_version=q.format_version,
        architecture=archs[0],
        model_type=ckpt.config.get("model_type"),
        base_model=source.get("base_model"),
        default_scheme=q.default_scheme,
        schemes={name: describe_scheme(s) for name, s in q.schemes.items()},
        overrides=[f"{p}={s}" for p, s in q.overrides],
        linear_modules=total,
        quantized_modules=len(quantized),
        modules_per_scheme=dict(per_scheme.most_common()),
        fallback=[e.to_dict() for e in q.fallback],
        fallback_by_reason=dict(Counter(e.reason for e in q.fallback).most_common()),
        source_bytes=source_bytes,
        checkpoint_bytes=ckpt.nbytes,
        ratio=source_bytes / ckpt.nbytes if source_bytes and ckpt.nbytes else None,
        mean_rel_error=sum(errors) / len(errors) if errors else None,
        max_rel_error=max(errors) if errors else None,
        outlier_threshold=q.outlier_threshold,
    )
