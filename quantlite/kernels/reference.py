"""The torch reference back-end: dequantize, then a dense matmul. Ground truth for every kernel test,
and the fallback when no fused kernel can run."""
from __future__ import annotations

import torch

from quantlite.q8weight import Q8Weight
from quantlite.qweight import QWeight


def qmatmul_reference(x: torch.Tensor, qw: QWeight | Q8Weight) -> torch.Tensor:
    """x (..., K) fp16/bf16/fp32 -> (..., N) in x's dtype, computed in float32 (float64 for float64 x)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = qw.dequantize(compute).to(x.device)
    return torch.nn.functional.linear(x.to(compute), weight).to(x.dtype)
