"""Folding factors into tensors: one function (`apply_edit`) computes every changed tensor, so the streaming
converter (which reads the source's stored tensors) and the in-memory paths (which change a live model's
parameters) produce the same values from the same inputs.

A fold with factors s divides the source's output channels by s (a norm's weight, and bias for LayerNorm; a Linear's
weight rows and bias) and multiplies the targets' weight columns by s. A tensor may take part in two folds (v_proj
is a target of the norm before it and the source of the fold into o_proj): its edit then divides rows *and*
multiplies columns. Arithmetic is float32; the result is rounded to whatever dtype the tensor is stored in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TensorEdit", "apply_edit", "apply_edits", "place_edits"]


@dataclass(frozen=True)
class TensorEdit:
    """How one tensor changes: divided by `rows` along dim 0 (a norm's weight or bias, a source Linear's weight rows
    or bias), then multiplied by `cols` along dim 1 (a target Linear's weight columns). Factors are float32 [n]."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None

    def merged(self, other: TensorEdit) -> TensorEdit:
        if (self.rows is not None and other.rows is not None) or (self.cols is not None and other.cols is not None):
            raise ValueError("a tensor cannot take two folds on the same side")
        return TensorEdit(self.rows if self.rows is not None else other.rows,
                          self.cols if self.cols is not None else other.cols)


def apply_edit(tensor: torch.Tensor, edit: TensorEdit) -> torch.Tensor:
    """The edited tensor in float32 (the caller rounds it to the dtype it stores): (t / rows) * cols."""
    out = tensor.detach().to(torch.float32)
    if edit.rows is not None:
        out = out / edit.rows.to(out.device).view(-1, *([1] * (out.dim() - 1)))
    if edit.cols is not None:
        out = out * edit.cols.to(out.device)
    return out


def _add(edits: dict[str, TensorEdit], name: str, edit: TensorEdit) -> None:
    edits[name] = edits[name].merged(edit) if name in edits else edit


def place_edits(edits: dict[str, TensorEdit], source: str, targets: tuple[str, ...],
                row_factors: torch.Tensor, col_factors: torch.Tensor, modules: Mapping[str, nn.Module]) -> None:
    """Add one fold's edits to `edits` (parameter path -> edit): the source's output divided by `row_factors`, each
    target's columns multiplied by `col_factors` (the same factors, or with grouped-query attention the v_proj
    factors spread over the query heads)."""
    divide = TensorEdit(rows=row_factors)
    _add(edits, f"{source}.weight", divide)
    if getattr(modules[source], "bias", None) is not None:
        _add(edits, f"{source}.bias", divide)
    for target in targets:
        _add(edits, f"{target}.weight", TensorEdit(cols=col_factors))


@torch.no_grad()
def apply_edits(model: nn.Module, edits: Mapping[str, TensorEdit]) -> None:
    """Change `model`'s parameters in place (copied into the existing storage, in each parameter's dtype)."""
    for name, edit in edits.items():
        param = model.get_parameter(name)
        param.copy_(apply_edit(param, edit).to(param.dtype))
