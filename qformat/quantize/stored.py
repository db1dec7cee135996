"""A quantized weight as the tensors a checkpoint stores, by suffix: the one place that spells them out.

`qformat.spec.layout.module_tensors` declares their names, dtypes and shapes (no torch); this builds them from a
`QuantizedWeight`, on the weight's device. The converter writes them, the in-memory paths load them into a
`QuantLinear`, and the compressed-tensors importer builds the same names.
"""

from __future__ import annotations

import torch

from qformat.quantize.weights import QuantizedWeight

__all__ = ["sparse_shape", "stored_tensors"]


def sparse_shape(out_features: int, in_features: int, device: torch.device | str | None = None) -> torch.Tensor:
    """A 2:4 module's `shape` tensor: int64 [[out], [in]] (compressed-tensors' sparse-24-bitmask layout)."""
    return torch.tensor([[out_features], [in_features]], dtype=torch.int64, device=device)


def stored_tensors(q: QuantizedWeight, out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    """Suffix -> tensor for a module quantized to `q`: `weight` + `weight_scale` (dense), or `compressed` +
    `bitmask` + `shape` + `weight_scale` (2:4), in the order the converter writes them."""
    if q.bitmask is None:
        return {"weight": q.values, "weight_scale": q.scales}
    return {"compressed": q.values, "bitmask": q.bitmask,
            "shape": sparse_shape(out_features, in_features, q.values.device), "weight_scale": q.scales}
