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
  * act-order: columns are rounded in decreasing order of H[j, j] (the columns whose error costs
    most go first, while the most columns are left to absorb it); with static groups each column
    still uses its own block's scale, so the stored format does not change;
  * outliers stay exact: at an outlier position the "quantized" value is the current,
    error-compensated weight, so it adds no error, and that compensated value is what is stored;
  * outliers chosen in the pass (SpQR, Dettmers et al. 2023): besides those chosen before the scales,
    `salient_outliers` more are the weights whose rounding costs the output most, by their saliency
    (w - q(w))^2 / [H_F^-1]_jj = ((w - q(w)) / U[j, j])^2 at the time column j is rounded (w the
    compensated weight, F the columns not yet rounded). A first pass measures every weight's
    saliency; the `salient_outliers` largest give each column its number of outliers, and the
    second pass keeps that many in the column, those with the largest rounding error at that time.
"""
from __future__ import annotations

import torch

from quantlite.codebook import code_midpoints
from quantlite.errors import QuantizationInputError

LAZY_BLOCK = 128              # columns per lazy update (GPTQ's default)
DAMPING = (0.01, 0.1, 1.0)    # fractions of mean(diag H) added to the diagonal, tried in turn
ACT_ORDER = True              # columns in decreasing H[j, j] (docs/accuracy.md: measured better on SmolLM2)


def gptq_codes(
    w: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    hessian: torch.Tensor,
    outlier_rows: torch.Tensor,
    outlier_cols: torch.Tensor,
    block_size: int,
    salient_outliers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float32, scales (N, Kp // B) float32 (as decoded), codebook (16,) float32,
    hessian (K, K) E[x x^T], the outliers chosen beforehand as (rows, cols) int64, and how many more
    to choose in the pass by saliency ->
    codes (N, Kp) uint8 (zero level at outliers and in padding), and every outlier: rows, cols
    (nnz,) int64 sorted by row then column, values (nnz,) float32 (the compensated weights)."""
    n, k = w.shape
    order = column_order(hessian)                                                  # (K,) int64
    upper = _inverse_cholesky(hessian[order][:, order], k)                         # (K, K) float32
    # Everything is kept transposed, (K, N), and in processing order: column order[j] of W is row j
    # here, so each step of the loop reads and writes contiguous memory.
    column_scale = scales.repeat_interleave(block_size, dim=1)[:, :k].T[order].contiguous()  # (K, N) float32
    is_outlier = torch.zeros(k, n, dtype=torch.bool)
    is_outlier[outlier_cols, outlier_rows] = True
    is_outlier = is_outlier[order]
    work = w.T.to(torch.float32)[order].contiguous()          # (K, N) updated in place as errors flow down
    quota = None
    if salient_outliers > 0:
        saliency = _gptq_pass(work.clone(), column_scale, codebook, upper, is_outlier.clone())[1]  # (K, N)
        chosen = torch.topk(saliency.reshape(-1), min(salient_outliers, saliency.numel()), sorted=False).indices
        quota = torch.bincount(chosen // n, minlength=k).tolist()
    codes, _ = _gptq_pass(work, column_scale, codebook, upper, is_outlier, quota)
    restore = torch.argsort(order)
    codes, work, is_outlier = codes[restore], work[restore], is_outlier[restore]
    zero = int((codebook == 0).nonzero()[0, 0])
    stored = torch.full((n, scales.shape[1] * block_size), zero, dtype=torch.uint8)  # padding keeps the zero level
    stored[:, :k] = codes.T
    rows, cols = is_outlier.T.nonzero(as_tuple=True)          # row-major: sorted by row then column
    return stored, rows, cols, work[cols, rows]


def column_order(hessian: torch.Tensor) -> torch.Tensor:
    """The order GPTQ rounds the columns in: (K,) int64, decreasing H[j, j] with ACT_ORDER, else 0..K-1."""
    if ACT_ORDER:
        return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    return torch.arange(hessian.shape[0])


def _gptq_pass(work, column_scale, codebook, upper, is_outlier, quota=None):
    """One pass of error feedback over work (K, N) float32 (changed in place), with column_scale
    (K, N) and upper (K, K) in processing order; at is_outlier (K, N) bool the weight stays exact.
    quota: per column, how many more weights to keep exact there (marked in is_outlier), those with
    the largest rounding error; None: none. -> codes (K, N) uint8, saliency (K, N) float32 (each
    weight's squared rounding error over U[j, j]^2; 0 at outliers)."""
    k, n = work.shape
    inverse_scale = torch.where(column_scale > 0, 1.0 / column_scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    has_outlier = is_outlier.any(dim=1).tolist()
    codes = torch.empty(k, n, dtype=torch.uint8)
    saliency = torch.empty(k, n)
    zero = int((codebook == 0).nonzero()[0, 0])
    midpoints = code_midpoints(codebook)
    # The loop runs once per column: a few small torch calls each, so their count is its cost
    # (the midpoints once per pass; bucketize's int64 codes index the codebook directly).
    for start in range(0, k, LAZY_BLOCK):
        end = min(start + LAZY_BLOCK, k)
        errors = saliency[start:end]                           # (block, N) scaled errors e_j / U[j, j], squared below
        for j in range(end - start):
            column = start + j
            x = work[column]
            code = torch.bucketize(x * inverse_scale[column], midpoints)   # (N,) int64: nearest_code's rule
            quantized = codebook[code] * column_scale[column]
            if quota is not None and quota[column] > 0:
                rounding = (x - quantized).abs_().masked_fill_(is_outlier[column], -1.0)
                is_outlier[column, torch.topk(rounding, quota[column], sorted=False).indices] = True
                has_outlier[column] = True
            if has_outlier[column]:
                keep = is_outlier[column]
                quantized = torch.where(keep, x, quantized)
                code[keep] = zero
            codes[column] = code
            torch.div(x - quantized, upper[column, column], out=errors[j])
            work[column:end] -= upper[column, column:end].unsqueeze(1) * errors[j]  # rounded product, then
            # the subtraction: a fused rank-1 update (addr_) rounds once and changes the stored outliers' last bits
        work[end:] -= upper[start:end, end:].T @ errors
        errors.square_()
    return codes, saliency


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
