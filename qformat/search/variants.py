"""One model, many quantization variants: every planned module quantized once, then swapped in or out per trial.

A trial of the fallback search is "this set of units kept in full precision, the rest quantized". Rebuilding or
reloading the model per trial would cost a conversion each; instead each planned `nn.Linear` gets its `QuantLinear`
once (the converter's exact tensors, `qformat.plan.execute.quantize_module`, on the kernels a loaded checkpoint
uses), and a trial only swaps modules. The measured model is therefore the checkpoint the search will write.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qformat.nn.linear import QuantLinear
from qformat.nn.swap import replace_module
from qformat.plan.execute import quantize_module
from qformat.plan.rules import ConversionPlan
from qformat.search.units import Unit

__all__ = ["QuantizedVariants"]


class QuantizedVariants:
    """The full-precision and quantized module of every unit of `plan` in `model` (a live full-precision model)."""

    def __init__(self, model: nn.Module, plan: ConversionPlan, units: list[Unit], *,
                 outlier_threshold: float | None = None) -> None:
        self.model = model
        self.units = units
        self.full: dict[str, nn.Module] = {}
        self.quantized: dict[str, QuantLinear] = {}
        with torch.no_grad():
            for decision in plan.quantized:
                path = decision.module.module_path
                linear = model.get_submodule(path)
                assert decision.scheme is not None
                stored, _error = quantize_module(linear.weight.detach(), decision)
                self.full[path] = linear
                self.quantized[path] = QuantLinear.from_stored(
                    stored, decision.scheme, bias=linear.bias, scheme_name=decision.scheme_name or "",
                    outlier_threshold=outlier_threshold).prepare()

    def apply(self, kept: Iterable[str]) -> None:
        """Quantize every unit except those named in `kept` (unit names), which get their full-precision module."""
        keep = set(kept)
        for unit in self.units:
            for member in unit.members:
                path = member.module_path
                replace_module(self.model, path, self.full[path] if unit.name in keep else self.quantized[path])

    def restore(self) -> None:
        """Put every full-precision module back: the model is as it was given."""
        for path, module in self.full.items():
            replace_module(self.model, path, module)
