"""The compute layout every kernel takes, derived once per (QWeight, device) and cached.

On the CPU the layout is the stored tensors themselves (docs/FORMAT.md; the native kernels read
every storage kind, csrc/include/quantlite.h), so it costs no memory beyond the QWeight:
    codes     (N, Kp // 2) uint8    low nibble = even column
    scales    (N, Kp // B) float32 or float16, or uint8 codes with scale_group_min / _step (float32,
              one pair per 256 scales) when double-quantized
    codebook  (16,)        float32
    row_ptr   (N + 1,)     int32    CSR over rows
    cols      (nnz,)       uint16 (K <= 65536) or int32
    vals      (nnz,)       float16
Elsewhere (CUDA, and the Triton kernel on any device: `widened=True`) the kernels take the widened
layout: scales float32 (decoded), cols int32, vals float32 (exact widenings).

`compute_ready` is the loader's way to build it without a second copy of the big tensors: on the
CPU the QWeight as it is; elsewhere a QWeight whose scales are already decoded to float32 (a valid
QWeight: FORMAT.md allows float32 scales), so the widened layout shares codes and scales with it.
`layout_extra_nbytes` says what a layout adds to its QWeight's own bytes (the streaming budget).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, replace

import torch

from quantlite.qweight import QWeight

# ql_scale_kind, ql_col_kind, ql_val_kind of quantlite.h, by the tensor's dtype
SCALE_KINDS = {torch.float32: 0, torch.float16: 1}
DOUBLE_QUANT_SCALES = 2
COL_KINDS = {torch.int32: 0, torch.uint16: 1}
VAL_KINDS = {torch.float32: 0, torch.float16: 1}


@dataclass(frozen=True)
class PreparedWeight:
    n: int
    k: int
    block_size: int
    codes: torch.Tensor                     # (N, Kp // 2) uint8
    scales: torch.Tensor                    # (N, Kp // B) float32 / float16, or uint8 codes (double-quantized)
    codebook: torch.Tensor                  # (16,) float32
    row_ptr: torch.Tensor                   # (N + 1,) int32
    cols: torch.Tensor                      # (nnz,) int32 or uint16
    vals: torch.Tensor                      # (nnz,) float32 or float16
    scale_group_min: torch.Tensor | None = None   # double-quantized: (ceil(N * Kp/B / 256),) float32
    scale_group_step: torch.Tensor | None = None

    @property
    def n_outliers(self) -> int:
        return int(self.vals.numel())

    @property
    def scale_kind(self) -> int:
        return DOUBLE_QUANT_SCALES if self.scale_group_min is not None else SCALE_KINDS[self.scales.dtype]


_cache: "weakref.WeakKeyDictionary[QWeight, dict[tuple[str, bool], PreparedWeight]]" = weakref.WeakKeyDictionary()


def prepare(qw: QWeight, device: torch.device | str, widened: bool | None = None) -> PreparedWeight:
    """The compute layout of `qw` on `device`, built on first use and kept while `qw` lives.
    widened: None = the stored tensors on the CPU, the widened layout elsewhere; True = widened
    (the Triton kernel's layout on any device)."""
    device = torch.device(device)
    widened = device.type != "cpu" if widened is None else widened
    per_device = _cache.setdefault(qw, {})
    key = (str(device), widened)
    if key not in per_device:
        per_device[key] = _widened(qw, device) if widened else _stored(qw, device)
    return per_device[key]


def _stored(qw: QWeight, device: torch.device) -> PreparedWeight:
    """qw's own tensors on `device` (no copy when qw lives there)."""
    def on(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else tensor.to(device).contiguous()

    return PreparedWeight(
        n=qw.shape[0], k=qw.shape[1], block_size=qw.block_size, codes=on(qw.codes),
        scales=on(qw.scales if qw.scales is not None else qw.scale_codes), codebook=on(qw.codebook),
        row_ptr=on(qw.outlier_row_ptr), cols=on(qw.outlier_cols), vals=on(qw.outlier_vals),
        scale_group_min=on(qw.scale_group_min), scale_group_step=on(qw.scale_group_step),
    )


def _widened(qw: QWeight, device: torch.device) -> PreparedWeight:
    return PreparedWeight(
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


def layout_extra_nbytes(qw: QWeight, device: torch.device | str) -> int:
    """Bytes that qw's compute layout on `device` (prepare's default) holds beyond qw's own tensors,
    for a qw already on `device`: 0 on the CPU (the kernels read the stored tensors); elsewhere the
    widened scales unless qw's are float32 (as compute_ready makes them), the int32 columns unless
    stored so, and the float32 outlier values."""
    if torch.device(device).type == "cpu":
        return 0
    scales = 0 if qw.scales is not None and qw.scales.dtype == torch.float32 else 4 * qw.shape[0] * qw.n_blocks
    cols = 0 if qw.outlier_cols.dtype == torch.int32 else 4 * qw.n_outliers
    return scales + cols + 4 * qw.n_outliers


def compute_ready(qw: QWeight, device: torch.device | str) -> QWeight:
    """qw on `device` with its layout prepared there: on the CPU qw's own tensors; elsewhere its
    scales decoded to float32 first (the same values, so the same results), which the widened
    layout then shares."""
    device = torch.device(device)
    moved = qw.to(device)
    if device.type == "cpu":
        prepare(moved, device)
        return moved
    ready = replace(moved, scales=moved.block_scales().contiguous(), scale_codes=None, scale_group_min=None,
                    scale_group_step=None)
    prepare(ready, device)
    return ready
