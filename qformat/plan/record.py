"""The `quantization_config` block a quantization writes: the plan's rules plus provenance and statistics.

The streaming converter and the in-memory paths (`from_pretrained` with a `QFormatConfig`, `qformat.quantize_`)
record their work through these functions, so a checkpoint written either way carries the same keys with the same
meaning (docs/FORMAT.md section 10).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from qformat._version import __version__
from qformat.plan.recipe import QuantRecipe
from qformat.plan.rules import ConversionPlan

__all__ = ["ModuleError", "WeightError", "checkpoint_block", "environment", "module_statistics", "significant"]


class ModuleError(Protocol):
    """What a quantized module's statistics are made of (`QuantizedWeight` has these)."""

    @property
    def rel_error(self) -> float: ...

    @property
    def rel_quant_error(self) -> float: ...


@dataclass(frozen=True)
class WeightError:
    """A quantized module's relative errors, kept without the tensors they were measured on."""

    rel_error: float
    rel_quant_error: float

    @classmethod
    def of(cls, measured: ModuleError) -> WeightError:
        return cls(measured.rel_error, measured.rel_quant_error)


def significant(x: float) -> float:
    """`x` rounded to the 6 significant digits every figure in `quantization_config` is recorded with."""
    return float(f"{x:.6g}")


def environment() -> dict[str, str]:
    """The versions of the libraries that computed and wrote the tensors."""
    import safetensors
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "safetensors": safetensors.__version__}


def module_statistics(plan: ConversionPlan, errors: Mapping[str, ModuleError], checkpoint_bytes: int) -> dict[str, Any]:
    """`statistics`: module counts, checkpoint size and each quantized module's scheme, observer and relative
    weight error (`errors` by checkpoint module name)."""
    modules = {}
    for decision in plan.quantized:
        name = decision.module.name
        entry: dict[str, Any] = {"scheme": decision.scheme_name, "observer": decision.observer,
                                 "rel_error": significant(errors[name].rel_error)}
        if decision.scheme is not None and decision.scheme.sparsity is not None:
            entry["rel_quant_error"] = significant(errors[name].rel_quant_error)
        modules[name] = entry
    return {
        "linear_modules": len(plan.decisions),
        "quantized_modules": len(plan.quantized),
        "checkpoint_bytes": checkpoint_bytes,
        "modules": modules,
    }


def checkpoint_block(plan: ConversionPlan, recipe: QuantRecipe, *, source: dict[str, Any], command: str,
                     errors: Mapping[str, ModuleError], checkpoint_bytes: int,
                     tensor_hashes: Mapping[str, str] | None = None,
                     evaluation: list[dict[str, Any]] | None = None,
                     fallback_search: dict[str, Any] | None = None,
                     smoothing: dict[str, Any] | None = None,
                     distillation: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole `quantization_config` dict: rules from `plan`, the recipe's `outlier_threshold`, `provenance`
    (qformat version, environment, `source`, the recipe and an equivalent command, tensor hashes, and the
    `smoothquant` record when SmoothQuant ran: `smoothing`; the `distillation` record of `qformat distill`),
    `statistics`, and the `evaluation` and
    `fallback_search` records of an accuracy-driven search (`qformat.search`) when one ran."""
    provenance = {
        "qformat_version": __version__,
        "environment": environment(),
        "source": source,
        "options": recipe.to_record(),
        "command": command,
        "tensor_hashes": dict(sorted((tensor_hashes or {}).items())),
        **({"smoothquant": smoothing} if smoothing is not None else {}),
        **({"distillation": distillation} if distillation is not None else {}),
    }
    statistics = module_statistics(plan, errors, checkpoint_bytes)
    return plan.config(provenance=provenance, statistics=statistics, evaluation=evaluation or None,
                       fallback_search=fallback_search, outlier_threshold=recipe.outlier_threshold).to_dict()
