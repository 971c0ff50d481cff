"""GPTQ error feedback (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization"): choose
the codes of W one column at a time and spread each column's rounding error over the columns not
yet quantized, so that the error of the layer's *output* y = W x is minimised, not the weight error.

With H = E[x x^T] (K, K), the second moment of the layer input over a calibration text, the output
error of a weight error dW is tr(dW H dW^T). After column j is rounded (error e_j), the optimal
update of the remaining columns is  W[:, j+1:] -= e_j / U[j, j] * U[j, j+1:], where U is the upper
Cholesky factor of H^-1 (the OBQ update, in GPTQ's Cholesky form). Columns are processed in lazy
blocks of 128, each in sub-blocks of 16: the update inside a sub-block is rank-1 per column, the
rest of the lazy block gets one matmul per sub-block, the rest of the matrix one per lazy block.

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
    second pass keeps that many in the column, those with the largest rounding error at that time;
  * bounded memory: above HESSIAN_BLOCK input columns the statistic is kept on its diagonal blocks
    only (BlockDiagonal, collected so by quantlite.calibration), O(K x HESSIAN_BLOCK) instead of
    O(K^2). With a block-diagonal H the inverse's Cholesky factor is block-diagonal too, so GPTQ is
    exactly one pass per block (act-order within the block); the in-pass outliers are still the
    `salient_outliers` most salient weights of the whole matrix, whichever block they are in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from quantlite.codebook import code_midpoints, zero_code
from quantlite.errors import QuantizationInputError
from quantlite.kernels import native
from quantlite.torch_threads import torch_threads

LAZY_BLOCK = 128              # columns per lazy update (GPTQ's default)
SUB_BLOCK = 16                # columns per rank-1-updated sub-block of a lazy block (less memory traffic per column)
DAMPING = (0.01, 0.1, 1.0)    # fractions of mean(diag H) added to the diagonal, tried in turn
ACT_ORDER = True              # columns in decreasing H[j, j] (docs/accuracy.md: measured better on SmolLM2)
# Above this many input columns E[x x^T] is kept and used on diagonal blocks of this size: its float64
# running sum then takes K x 4096 x 8 bytes (1.7 GB at Llama-3-405B's down_proj, K = 53 248, instead of
# 22.7 GB), the Cholesky factorisations K x 4096^2 flops instead of K^3, and every Linear of a model of
# hidden size up to 4096 (Llama 7B/8B's q/k/v/o/gate/up) keeps the full matrix. What the blocks cost
# in perplexity: docs/accuracy.md, "A block-diagonal Hessian".
HESSIAN_BLOCK = 4096


@dataclass(frozen=True)
class BlockDiagonal:
    """E[x x^T] (K, K) kept on its diagonal blocks only: blocks[i] (b_i, b_i) float covers the input
    columns sum(b_0..b_i-1) up to that plus b_i (hessian_blocks(K) gives them); the rest is taken as 0."""
    blocks: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        k = sum(block.shape[0] for block in self.blocks)
        return (k, k)

    def diagonal(self) -> torch.Tensor:
        """(K,) the diagonal, E[x_j^2]."""
        return torch.cat([block.diagonal() for block in self.blocks])

    def to_dense(self) -> torch.Tensor:
        """(K, K): the matrix the blocks stand for (for tests and small K only)."""
        return torch.block_diag(*self.blocks)


def hessian_blocks(k: int) -> list[tuple[int, int]]:
    """(start, end) of the diagonal blocks E[x x^T] over K input columns is kept on: one block up to
    HESSIAN_BLOCK columns, else blocks of HESSIAN_BLOCK and a last, shorter one."""
    return [(start, min(start + HESSIAN_BLOCK, k)) for start in range(0, k, HESSIAN_BLOCK)] if k > HESSIAN_BLOCK else [(0, k)]


def gptq_codes(
    w: torch.Tensor,
    scales: torch.Tensor,
    codebook: torch.Tensor,
    hessian: torch.Tensor | BlockDiagonal | Factored,
    outlier_rows: torch.Tensor,
    outlier_cols: torch.Tensor,
    block_size: int,
    salient_outliers: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) float32, scales (N, Kp // B) float32 (as decoded), codebook (16,) float32,
    hessian (K, K) E[x x^T], its BlockDiagonal, or either's Factored (factored here if not), the outliers chosen beforehand as (rows, cols) int64, and how many more
    to choose in the pass by saliency ->
    codes (N, Kp) uint8 (zero level at outliers and in padding), and every outlier: rows, cols
    (nnz,) int64 sorted by row then column, values (nnz,) float32 (the compensated weights)."""
    n, k = w.shape
    factored = hessian if isinstance(hessian, Factored) else factor(hessian)
    order, segments = factored.order, factored.segments
    # Everything is kept transposed, (K, N), and in processing order: column order[j] of W is row j
    # here, so each step of the loop reads and writes contiguous memory.
    column_scale = scales.T[torch.div(order, block_size, rounding_mode="floor")].contiguous()  # (K, N) each weight's scale
    restore = torch.argsort(order)                            # (K,) the processing position of each column
    is_outlier = torch.zeros(k, n, dtype=torch.bool)
    is_outlier[restore[outlier_cols], outlier_rows] = True
    work = w.T.to(torch.float32)[order].contiguous()          # (K, N) updated in place as errors flow down
    quota = None
    if salient_outliers > 0:
        saliency = _gptq_passes(work.clone(), column_scale, codebook, segments, is_outlier.clone())[1]  # (K, N)
        chosen = torch.topk(saliency.reshape(-1), min(salient_outliers, saliency.numel()), sorted=False).indices
        quota = torch.bincount(chosen // n, minlength=k)                  # (K,) int64
    codes, _ = _gptq_passes(work, column_scale, codebook, segments, is_outlier, quota)
    codes, work, is_outlier = codes[restore], work[restore], is_outlier[restore]
    zero = int((codebook == 0).nonzero()[0, 0])
    stored = torch.full((n, scales.shape[1] * block_size), zero, dtype=torch.uint8)  # padding keeps the zero level
    stored[:, :k] = codes.T
    rows, cols = is_outlier.T.nonzero(as_tuple=True)          # row-major: sorted by row then column
    return stored, rows, cols, work[cols, rows]


@dataclass(frozen=True)
class Factored:
    """A statistic E[x x^T] with what GPTQ derives from it (factor(hessian) makes it): order (K,)
    int64, act-order inside each diagonal block (the whole matrix when it is one), and per block
    (start, end, upper (b, b) float32), the upper Cholesky factor of its damped inverse in that
    order; the blocks follow each other in the order, so errors never leave a block. Linears that
    share a statistic (q/k/v, gate/up) share one Factored, so it is factored once for all of them."""
    hessian: torch.Tensor | BlockDiagonal
    order: torch.Tensor
    segments: tuple[tuple[int, int, torch.Tensor], ...]


def factor(hessian: torch.Tensor | BlockDiagonal) -> Factored:
    """The Factored of E[x x^T] (K, K) or its BlockDiagonal, checked (check_second_moment on each
    block, so quantize need not check it again for each Linear sharing it): column order and
    inverse Cholesky factors."""
    blocks = hessian.blocks if isinstance(hessian, BlockDiagonal) else (hessian,)
    for block in blocks:
        check_second_moment(block)
    mean_diagonal = None  # the damping's unit: over the whole matrix, dead columns as 1, as _inverse_cholesky has it
    if len(blocks) > 1:
        diagonal = torch.cat([block.diagonal() for block in blocks]).double()     # (K,) float64
        mean_diagonal = float(torch.where(diagonal > 0, diagonal, 1.0).mean())
    order, segments, start = [], [], 0
    for block in blocks:
        end = start + block.shape[0]
        local = column_order(block)                                                # (b,) int64
        order.append(start + local)
        segments.append((start, end, _inverse_cholesky(block[local.unsqueeze(1), local], mean_diagonal)))  # (b, b) float32
        start = end
    return Factored(hessian, torch.cat(order), tuple(segments))


def check_second_moment(matrix: torch.Tensor) -> None:
    """Raises QuantizationInputError unless matrix (k, k) can be E[x x^T]: finite, a non-negative
    diagonal, symmetric (to float rounding)."""
    k = matrix.shape[0]
    diagonal = matrix.diagonal()
    # a finite sum has finite terms (one inf or NaN makes it so): one reduction, no (k, k) mask; a sum
    # that overflows gets the element-wise check
    finite = bool(torch.isfinite(matrix.sum())) or bool(torch.isfinite(matrix).all())
    if not finite or bool((diagonal < 0).any()):
        raise QuantizationInputError("importance must be finite, with a non-negative (diagonal) per column")
    # X^T X from a BLAS is exactly symmetric in practice: torch.equal is 5x cheaper than allclose
    if not torch.equal(matrix, matrix.T) and not torch.allclose(matrix, matrix.T, rtol=1e-4, atol=1e-6 * float(diagonal.max())):
        raise QuantizationInputError(f"importance ({k}, {k}) must be symmetric: it is E[x x^T]")


def column_order(hessian: torch.Tensor) -> torch.Tensor:
    """The order GPTQ rounds the columns in: (K,) int64, decreasing H[j, j] with ACT_ORDER, else 0..K-1."""
    if ACT_ORDER:
        return torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    return torch.arange(hessian.shape[0])


def _gptq_passes(work, column_scale, codebook, segments, is_outlier, quota=None):
    """_gptq_pass over each diagonal block (start, end, upper) of the processing order in turn, on views
    of the block's rows (changed in place) -> codes (K, N) uint8, saliency (K, N) float32."""
    with torch_threads(1):  # a chain of small ops (quantlite.torch_threads says why)
        passes = [_gptq_pass(work[start:end], column_scale[start:end], codebook, upper, is_outlier[start:end],
                             None if quota is None else quota[start:end]) for start, end, upper in segments]
    if len(passes) == 1:
        return passes[0]
    return torch.cat([codes for codes, _ in passes]), torch.cat([saliency for _, saliency in passes])


def _gptq_pass(work, column_scale, codebook, upper, is_outlier, quota=None):
    """One pass of error feedback over work (K, N) float32 (changed in place), with column_scale
    (K, N) and upper (K, K) in processing order; at is_outlier (K, N) bool the weight stays exact.
    quota: (K,) int64, per column how many more weights to keep exact there (marked in is_outlier),
    those with the largest rounding error; None: none. -> codes (K, N) uint8, saliency (K, N) float32
    (each weight's squared rounding error over U[j, j]^2; 0 at outliers).

    Errors flow down in three levels: inside a sub-block of SUB_BLOCK columns a rank-1 update per
    column (_round_columns, or the same in C: native.gptq_columns, bit-identical, when the CPU
    library is built; docs/accuracy.md, "Eighth round"), one matmul per sub-block for the rest of its
    lazy block, one per lazy block for the rest of W."""
    k, n = work.shape
    codes = torch.empty(k, n, dtype=torch.uint8)
    saliency = torch.empty(k, n)
    round_columns = _native_round_columns() or _round_columns
    for start in range(0, k, LAZY_BLOCK):
        end = min(start + LAZY_BLOCK, k)
        errors = saliency[start:end]                           # (block, N) scaled errors e_j / U[j, j], squared below
        for sub in range(start, end, SUB_BLOCK):
            sub_end = min(sub + SUB_BLOCK, end)
            round_columns(work[sub:sub_end], column_scale[sub:sub_end], upper[sub:sub_end, sub:sub_end], codebook,
                          is_outlier[sub:sub_end], None if quota is None else quota[sub:sub_end],
                          codes[sub:sub_end], saliency[sub:sub_end])
            work[sub_end:end] -= upper[sub:sub_end, sub_end:end].T @ errors[sub - start:sub_end - start]
        work[end:] -= upper[start:end, end:].T @ errors
        errors.square_()
    return codes, saliency


def _round_columns(work, column_scale, upper, codebook, is_outlier, quota, codes, errors):
    """The S columns of one sub-block rounded one after the other (the reference of the C loop,
    csrc/cpu/gptq.c, which agrees bit for bit): work (S, N) float32 (changed in place), column_scale
    (S, N), upper (S, S) the sub-block's diagonal block of U, is_outlier (S, N) bool (the quota's
    choices marked in it), quota (S,) int64 or None -> codes (S, N) uint8, errors (S, N) float32
    (written). Column j: its nearest codes (nearest_code's rule), the quota[j] weights of the
    largest rounding error made outliers (existing ones count -1; equal errors: the lower row
    first), outliers kept exact with the zero code, the scaled error e = (w - q) / U[j, j], and the
    rank-1 update w' -= U[j, j'] e of the later columns (addcmul_: one rounding on an FMA CPU, as C's fmaf)."""
    inverse_scale = torch.where(column_scale > 0, 1.0 / column_scale.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    midpoints = code_midpoints(codebook)
    zero = zero_code(codebook)
    pivots = upper.diagonal().tolist()
    quotas = [0] * len(work) if quota is None else quota.tolist()
    for column, x in enumerate(work.unbind(0)):
        code = torch.bucketize(x * inverse_scale[column], midpoints)        # (N,) int64: nearest_code's rule
        quantized = codebook[code] * column_scale[column]
        keep = is_outlier[column]
        if quotas[column] > 0:
            rounding = (x - quantized).abs_().masked_fill_(keep, -1.0)
            keep[torch.sort(rounding, descending=True, stable=True).indices[:quotas[column]]] = True
        quantized = torch.where(keep, x, quantized)
        codes[column] = code.masked_fill_(keep, zero)
        torch.div(x - quantized, pivots[column], out=errors[column])
        work[column + 1:].addcmul_(upper[column, column + 1:].unsqueeze(1), errors[column], value=-1.0)


def _native_round_columns():
    """native.gptq_columns when the CPU library is built and loads, else None."""
    return native.gptq_columns if native.cpu_status() is None else None


def _inverse_cholesky(hessian: torch.Tensor, mean_diag: float | None = None) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping x mean_diag x I)^-1, float32, of H (k, k): the whole
    matrix, or one diagonal block with mean_diag the whole matrix's (None: H's own mean diagonal). A
    column the calibration never excited (H[j, j] == 0) gets H[j, j] = 1 (in the mean too): it is
    quantized without feeding or receiving error."""
    k = hessian.shape[0]
    h = hessian.to(torch.float64, copy=True)
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    diag[dead] = 1.0
    mean_diag = float(diag.mean()) if mean_diag is None else mean_diag
    for damping in DAMPING:
        # With J the order reversal and J (H + damping) J = L L^T: (H + damping)^-1 = U^T U for the upper
        # triangular U = J L^-1 J: one factorisation and one triangular solve, no inverse formed.
        damped = h.flip(0, 1)  # J H J, a copy
        damped.diagonal().add_(damping * mean_diag)
        factor, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            identity = torch.eye(k, dtype=torch.float64)
            return torch.linalg.solve_triangular(factor, identity, upper=False).flip(0, 1).to(torch.float32)
    raise QuantizationInputError(
        f"the input second-moment matrix ({k}x{k}) is not positive definite even with damping "
        f"{DAMPING[-1]} x mean(diag): it is not E[x x^T] of real activations"
    )
