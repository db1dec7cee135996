"""2:4 structured sparsity at run time.

The stored form (compressed values + bitmask, docs/FORMAT.md section 7) is decoded once, at load time:
- `dense`: CPU (no 2:4 kernel exists there) and any device where the semi-structured path is unavailable: the module
  holds the dense quantized weight (int8 or fp8: the same bytes a dense checkpoint would hold) and runs the dense
  kernels. The compressed tensors stay too, so the module saves itself exactly.
- `cuda_semi_structured`: CUDA compute capability >= 8.0, int8 weights with int8 activations (`w8a8-int8+2:4`):
  `torch.sparse.to_sparse_semi_structured` (cuSPARSELt / CUTLASS). The path is checked against the dense int8
  product on a probe input when it is prepared; any error or mismatch falls back to `dense`, logged once.
"""

from __future__ import annotations

import logging

import torch

from qformat.kernels._trace import record_path
from qformat.quantize.sparse24 import decompress_2_4

__all__ = ["dense_from_2_4", "semi_structured_int8"]

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def dense_from_2_4(compressed: torch.Tensor, bitmask: torch.Tensor, in_features: int) -> torch.Tensor:
    """The dense quantized weight [out, in] (int8 or fp8) a 2:4 module stands for."""
    return decompress_2_4(compressed, bitmask, in_features)


def semi_structured_int8(dense_int8: torch.Tensor):  # -> torch.sparse.SparseSemiStructuredTensor | None
    """A semi-structured sparse copy of an int8 2:4 weight for CUDA, or None where it cannot be made or is wrong."""
    device = dense_int8.device
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return None
    try:
        from torch.sparse import to_sparse_semi_structured

        sparse = to_sparse_semi_structured(dense_int8)
        probe = torch.randint(-127, 128, (dense_int8.shape[1], 32), dtype=torch.int8, device=device)
        got = torch.mm(sparse, probe).to(torch.int64)
        want = torch._int_mm(probe.t().contiguous(), dense_int8.t()).t().to(torch.int64)
        if not torch.equal(got, want):
            raise ValueError("semi-structured result differs from the dense int8 product")
        record_path("sparse24", "cuda_semi_structured")
        return sparse
    except Exception as exc:  # any failure means: use the dense path
        if "cuda" not in _warned:
            _warned.add("cuda")
            logger.warning("qformat: 2:4 semi-structured matmul unavailable on this GPU (%s); using dense int8", exc)
        return None
