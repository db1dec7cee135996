"""Carrying out one module's decision: its weight quantized to the tensors the checkpoint stores, and the error.

The streaming converter, quantizing while loading and `quantize_` all call `quantize_module`, so a planned module
becomes the same tensors on every path.
"""

from __future__ import annotations

import torch

from qformat.plan.record import WeightError
from qformat.plan.rules import ModuleDecision
from qformat.quantize.stored import stored_tensors
from qformat.quantize.weights import quantize_weight

__all__ = ["quantize_module"]


def quantize_module(weight: torch.Tensor, decision: ModuleDecision) -> tuple[dict[str, torch.Tensor], WeightError]:
    """The stored tensors (suffix -> tensor, on `weight`'s device) of a module `decision` quantizes, and its
    relative errors. `weight` is the module's [out, in] weight in any float dtype."""
    module = decision.module
    if decision.scheme is None or decision.observer is None:
        raise ValueError(f"{module.name} is kept in full precision; there is nothing to quantize")
    q = quantize_weight(weight, decision.scheme, observer=decision.observer,
                        name=module.weight_key or f"{module.name}.weight")
    return stored_tensors(q, module.out_features, module.in_features), WeightError.of(q)
