"""GPTQ error feedback (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization"): choose
the codes of W one column at a time and spread each column's rounding error over the columns not
yet quantized, so that the error of the layer's *output* y = W x is minimised, not the weight error.

With H = E[x x^T] (K, K), the second moment of the layer input over a calibration text, the output
error of a weight error dW is tr(dW H dW^T). After column j is rounded (error e_j), the optimal
update of the remaining columns is  W[:, j+1:] -= e_j / U[j, j] * U[j, j+1:], where U is the upper
Cholesky factor of H^-1 (the OBQ update, in GPTQ's Cholesky form). Columns are processed in lazy
blocks of 128: the update inside a block is rank-1 per column, the rest of the matrix gets one
matmul per block.

What is particular to quantlite:
  * the block scales are fixed before the loop (GPTQ's "static groups"): computed from W and, when
    asked, double-quantized, so the stored format is unchanged and the codes use exactly the scales
    a reader decodes;
  * outliers stay exact: at an outlier position the "quantized" value is the current,
    error-compensated weight, so it adds no error, and that compensated value is what is stored.
"""
from __future__ import annotations

import torch

from quantlite.codebook import nearest_code
from quantlite.errors import QuantizationInputError

LAZY_BLOCK = 128              # columns per lazy update (GPTQ's default)
DAMPING = (0.01, 0.1, 1.0)    # fractions of mean(diag H) added to the diagonal, tried in turn


def gptq_codes(
    w: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    hessian: torch.Tensor,
    outlier_rows: torch.Tensor,
    outlier_cols: torch.Tensor,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float32, scales (N, Kp // B) float32 (as decoded), codebook (16,) float32,
    hessian (K, K) E[x x^T], outliers as (rows, cols) int64 ->
    codes (N, Kp) uint8 (zero level at outliers and in padding), outlier values (nnz,) float32."""
    n, k = w.shape
    padded_k = scales.shape[1] * block_size
    upper = _inverse_cholesky(hessian, k)                                          # (K, K) float32
    # Everything is kept transposed, (K, N): column j of W is row j here, so each step of the loop
    # reads and writes contiguous memory.
    column_scale = scales.repeat_interleave(block_size, dim=1)[:, :k].T.contiguous()  # (K, N) float32
    inverse_scale = torch.where(column_scale > 0, 1.0 / column_scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    is_outlier = torch.zeros(k, n, dtype=torch.bool)
    is_outlier[outlier_cols, outlier_rows] = True
    has_outlier = is_outlier.any(dim=1).tolist()

    work = w.T.to(torch.float32).contiguous()                 # (K, N) updated in place as errors flow down
    codes = torch.empty(k, n, dtype=torch.uint8)
    zero = int((codebook == 0).nonzero()[0, 0])
    for start in range(0, k, LAZY_BLOCK):
        end = min(start + LAZY_BLOCK, k)
        errors = torch.empty(end - start, n)                   # (block, N) scaled errors e_j / U[j, j]
        for j in range(end - start):
            column = start + j
            x = work[column]
            code = nearest_code(x * inverse_scale[column], codebook)
            quantized = codebook[code.long()] * column_scale[column]
            if has_outlier[column]:
                keep = is_outlier[column]
                quantized = torch.where(keep, x, quantized)
                code[keep] = zero
            codes[column] = code
            torch.div(x - quantized, upper[column, column], out=errors[j])
            work[column:end] -= upper[column, column:end].unsqueeze(1) * errors[j]
        work[end:] -= upper[start:end, end:].T @ errors
    stored = torch.full((n, padded_k), zero, dtype=torch.uint8)  # padding columns keep the zero level
    stored[:, :k] = codes.T
    return stored, work[outlier_cols, outlier_rows]


def _inverse_cholesky(hessian: torch.Tensor, k: int) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, float32. A column the calibration never excited
    (H[j, j] == 0) gets H[j, j] = 1: it is quantized without feeding or receiving error."""
    h = hessian.to(torch.float64, copy=True)
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    mean_diag = float(diag.mean())
    for damping in DAMPING:
        factor, info = torch.linalg.cholesky_ex(h + damping * mean_diag * torch.eye(k, dtype=torch.float64))
        if int(info) == 0:
            inverse = torch.cholesky_inverse(factor)
            return torch.linalg.cholesky(inverse, upper=True).to(torch.float32)
    raise QuantizationInputError(
        f"the input second-moment matrix ({k}x{k}) is not positive definite even with damping "
        f"{DAMPING[-1]} x mean(diag): it is not E[x x^T] of real activations"
    )
