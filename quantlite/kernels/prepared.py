"""The compute layout every kernel takes, derived once per (QWeight, device) and cached.

Storage format != compute layout (docs/FORMAT.md keeps storage small; kernels want simple types):
    codes     (N, Kp // 2) uint8    as stored: low nibble = even column
    scales    (N, Kp // B) float32  decoded from fp16 / fp32 / double-quantized storage
    codebook  (16,)        float32
    row_ptr   (N + 1,)     int32    CSR over rows
    cols      (nnz,)       int32    widened from uint16 storage
    vals      (nnz,)       float32  widened from fp16 storage (exact)

`compute_ready` is the loader's way to build it without a second copy of the big tensors: the QWeight
it returns holds its scales already decoded to float32 (a valid QWeight: FORMAT.md allows float32
scales), so the layout shares codes and scales with it and the stored fp16 (or double-quantized)
scales can be freed. A 405B-shape layer of 1.58 GiB on disk is 1.67 GiB in memory so, not 1.76.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

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


def compute_ready(qw: QWeight, device: torch.device | str) -> QWeight:
    """qw on `device` with its scales decoded to float32 (the same values, so the same results), its
    layout prepared there and sharing its codes and scales."""
    moved = qw.to(device)
    ready = replace(moved, scales=moved.block_scales().contiguous(), scale_codes=None, scale_group_min=None,
                    scale_group_step=None)
    prepare(ready, device)
    return ready
