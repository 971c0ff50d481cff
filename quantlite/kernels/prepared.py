"""The compute layout every kernel takes, derived once per (QWeight, device) and cached.

Storage format != compute layout (docs/FORMAT.md keeps storage small; kernels want simple types):
    codes     (N, Kp // 2) uint8    as stored: low nibble = even column
    scales    (N, Kp // B) float32  decoded from fp16 / fp32 / double-quantized storage
    codebook  (16,)        float32
    row_ptr   (N + 1,)     int32    CSR over rows
    cols      (nnz,)       int32    widened from uint16 storage
    vals      (nnz,)       float32  widened from fp16 storage (exact)
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from quantlite.qweight import QWeight


@dataclass(frozen=True)
class PreparedWeight:
    n: int
    k: int
    block_size: int
    codes: torch.Tensor
    scales: torch.Tensor
    codebook: torch.Tensor
    row_ptr: torch.Tensor
    cols: torch.Tensor
    vals: torch.Tensor

    @property
    def n_outliers(self) -> int:
        return int(self.vals.numel())


_cache: "weakref.WeakKeyDictionary[QWeight, dict[str, PreparedWeight]]" = weakref.WeakKeyDictionary()


def prepare(qw: QWeight, device: torch.device | str) -> PreparedWeight:
    """The compute layout of `qw` on `device`, built on first use and kept while `qw` lives."""
    device = torch.device(device)
    per_device = _cache.setdefault(qw, {})
    key = str(device)
    if key not in per_device:
        per_device[key] = PreparedWeight(
            n=qw.shape[0],
            k=qw.shape[1],
            block_size=qw.block_size,
            codes=qw.codes.to(device).contiguous(),
            scales=qw.block_scales().to(device, torch.float32).contiguous(),
            codebook=qw.codebook.to(device, torch.float32).contiguous(),
            row_ptr=qw.outlier_row_ptr.to(device, torch.int32).contiguous(),
            cols=qw.outlier_cols.to(torch.int32).to(device).contiguous(),
            vals=qw.outlier_vals.to(device, torch.float32).contiguous(),
        )
    return per_device[key]
