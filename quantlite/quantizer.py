"""quantize(w) -> QWeight: blockwise 4-bit codes, block scales, and a sparse fp16 outlier table.

The steps, in order (each is a small function below):
  1. check the input (2-D float, finite, sizes) and pad K up to a multiple of the block size;
  2. pick the outliers and take them out of the dense matrix, *before* the scales, so one huge
     weight no longer stretches its block's scale (quantlite.outliers); under GPTQ only part of
     them, the rest is chosen in step 5 by saliency;
  3. the codebook: the method's (NF4 or int4), or with fit_codebook one fitted to this tensor by
     Lloyd steps alternated with the scale search (quantlite.codebook.lloyd_step), or one given;
     block scales: absmax, optionally a search over shrunken candidates that minimises the block's
     (importance-weighted) squared error, optionally refined by least squares on the chosen codes;
  4. optionally double-quantize the scales to 8 bits (QLoRA), and use the decoded scales from then on;
  5. codes: the nearest codebook level of w / scale, or GPTQ's (which also picks the rest of the
     outliers); the zero level at outliers and in padding.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from quantlite.codebook import codebook_problem, int4_codebook, lloyd_step, nearest_code, nf4_codebook, uniform_codebooks
from quantlite.errors import QuantizationInputError
from quantlite.gptq import BlockDiagonal, Factored, check_second_moment, gptq_codes
from quantlite.outliers import select_outliers
from quantlite.qweight import (
    SCALE_GROUP_SIZE,
    QWeight,
    block_size_problem,
    decode_double_quant,
    stored_nbytes,
)

MAX_OUTLIER_FRAC = 0.25


def outlier_frac_problem(outlier_frac: float) -> str | None:
    """Why `outlier_frac` is not a fraction quantize() takes, or None: the one statement of the rule."""
    return None if 0.0 <= outlier_frac <= MAX_OUTLIER_FRAC else f"outlier_frac {outlier_frac!r} must be in [0, {MAX_OUTLIER_FRAC}]"
FLOAT16_MAX = 65504.0


@dataclass(frozen=True)
class MethodDefaults:
    codebook: str          # "nf4" or "int4"
    outlier_frac: float    # fraction of all weights kept exactly in the fp16 side table
    scale_search: bool     # search shrunken scales for the least squared error
    double_quant: bool     # 8-bit scales with an fp32 (min, step) per 256 scales
    scale_dtype: torch.dtype
    # The default outlier fraction shrinks (to 0 if need be) so the tensor's all-in size stays within
    # this many bits per weight; None: no cap. An explicit outlier_frac is not capped unless
    # max_bits_per_weight is given too.
    max_bits_per_weight: float | None = None
    fit_codebook: bool = False   # a per-tensor codebook fitted to the weights, starting from `codebook`
    refine_scales: bool = False  # least-squares refinement of the scales after the search
    # The block size the converter gives the attention projections (q/k/v/o_proj) in a conversion
    # without calibration, unless told otherwise; None: the same as the other projections.
    # quantize() itself takes one block_size.
    attention_block_size: int | None = None


METHODS: dict[str, MethodDefaults] = {
    # NF4, up to 1 % outliers chosen before the scales (as many as fit 4.5 bits/weight all-in), MSE
    # scale search, double-quantized scales; with importance=E[x x^T] the codes come from GPTQ error
    # feedback (act-order), which also chooses half of the outliers. docs/accuracy.md has what this keeps of plain NF4's perplexity increase, and why.
    # Without calibration the converter quantizes the attention projections in blocks of 32 (within
    # the same 4.5 bits, so with fewer outliers): less of NF4's damage on both study models
    # (docs/accuracy.md); calibrated (GPTQ) conversions keep one block size, block 32 being
    # measured worse there.
    "quantlite": MethodDefaults("nf4", 0.01, True, True, torch.float16, max_bits_per_weight=4.5, attention_block_size=32),
    # bitsandbytes-equivalent NF4: absmax scales kept in float32 exactly as bitsandbytes stores them.
    "nf4": MethodDefaults("nf4", 0.0, False, False, torch.float32),
    # symmetric round-to-nearest int4, absmax scales.
    "rtn": MethodDefaults("int4", 0.0, False, False, torch.float16),
}

# Shrink factors tried by the scale search (1.0 = absmax). Clipping the block's largest weights a
# little lowers the error of all the others; llama.cpp and HQQ search the same way.
SCALE_CANDIDATES = (1.0, 0.95, 0.9, 0.85, 0.8)
# The codebook fit: from each start, Lloyd steps, each followed by the scale search, on at most this many blocks of
# whole rows taken at a stride (16 numbers need no more; the fit's cost stays that of a small tensor).
LLOYD_STEPS = 10
FIT_SAMPLE_BLOCKS = 1024
# Least-squares refinements of each block's scale, s = <a w, l> / <a l, l> for its current levels l,
# each kept only where it lowers the block's error (llama.cpp's make_qx_quants does the same).
REFINE_STEPS = 2
# Under GPTQ (importance (K, K)) this share of the outlier budget is chosen before the scales by
# magnitude x sqrt(E[x_j^2]), so the largest weights do not stretch their blocks' scales; the rest is
# chosen inside the GPTQ pass by saliency (quantlite.gptq). Half and half measured best on SmolLM2
# (docs/accuracy.md, "Outliers chosen in the GPTQ pass").
PRE_SCALE_SHARE = 0.5


def quantize(
    w: torch.Tensor,
    *,
    block_size: int = 64,
    method: str = "quantlite",
    outlier_frac: float | None = None,
    scale_search: bool | None = None,
    double_quant: bool | None = None,
    scale_dtype: torch.dtype | None = None,
    importance: torch.Tensor | BlockDiagonal | Factored | None = None,
    max_bits_per_weight: float | None = None,
    fit_codebook: bool | None = None,
    refine_scales: bool | None = None,
    codebook: torch.Tensor | None = None,
    name: str | None = None,
) -> QWeight:
    """Quantize a 2-D weight W (N, K) = (out_features, in_features).

    method: "quantlite" (default), "nf4" (plain, bitsandbytes-equivalent) or "rtn" (int4 absmax).
    Options left as None take the method's default (METHODS). `importance` describes the layer's
    input over a calibration text (quantlite.calibration), so the error of the layer's output is
    minimised rather than the error of W:
      (K,)   mean x**2 per input column: weights outlier selection and the scale search;
      (K, K) E[x x^T]: the codes are chosen by GPTQ error feedback (quantlite.gptq); PRE_SCALE_SHARE
             of the outliers are selected before the scales with its diagonal, the rest in the GPTQ
             pass by saliency — the setting behind docs/accuracy.md's default row; its BlockDiagonal
             or gptq.factor(E[x x^T]) alike (the latter factored once for the Linears that share it).
    max_bits_per_weight caps the outlier table so the whole stored tensor (QWeight.nbytes) stays
    within that many bits per weight, when the rest of it leaves room; with outlier_frac left as
    None it defaults to the method's cap (quantlite: 4.5), an explicit outlier_frac is kept as given.
    fit_codebook: fit a per-tensor codebook to the weights (Lloyd steps from the method's codebook,
    alternated with the scale search, weighted like it); refine_scales: least-squares refinement of
    the scales after the search. `codebook` (16,) float32 uses the given levels instead of the
    method's or a fitted one (no converter flag sets either: both are opt-in for callers of quantize;
    a fitted codebook per row chunk would also keep concat_rows from joining q/k/v and gate/up).
    `name` only labels error messages.
    """
    if method not in METHODS:
        raise QuantizationInputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    defaults = METHODS[method]
    if outlier_frac is None:
        outlier_frac = defaults.outlier_frac
        max_bits_per_weight = defaults.max_bits_per_weight if max_bits_per_weight is None else max_bits_per_weight
    scale_search = defaults.scale_search if scale_search is None else scale_search
    double_quant = defaults.double_quant if double_quant is None else double_quant
    scale_dtype = defaults.scale_dtype if scale_dtype is None else scale_dtype
    fit_codebook = defaults.fit_codebook if fit_codebook is None else fit_codebook
    refine_scales = defaults.refine_scales if refine_scales is None else refine_scales
    if codebook is not None and (problem := codebook_problem(codebook)):
        raise QuantizationInputError(problem)
    label = f"tensor {name!r}" if name else "the tensor"

    factored = importance if isinstance(importance, Factored) else None  # E[x x^T] with GPTQ's factors, made once
    if factored is not None:
        importance = factored.hessian
    _check_inputs(w, block_size, outlier_frac, scale_dtype, importance, max_bits_per_weight, label,
                  statistic_checked=factored is not None)
    n, k = w.shape
    method_codebook = nf4_codebook() if defaults.codebook == "nf4" else int4_codebook()
    n_blocks = -(-k // block_size)
    padded_k = n_blocks * block_size

    dense = torch.empty(n, padded_k, dtype=torch.float32)  # (N, Kp): the weight, then zero padding
    dense[:, :k] = w.detach()
    dense[:, k:] = 0.0
    hessian = None
    if importance is not None and (isinstance(importance, BlockDiagonal) or importance.dim() == 2):
        # The scale search stays unweighted under GPTQ (docs/accuracy.md, "Open": the weighted
        # search under GPTQ is the next thing to measure).
        hessian, importance = factored or importance, importance.diagonal()
    column_weight = None
    if importance is not None and hessian is None:
        column_weight = torch.nn.functional.pad(importance.to(torch.float32), (0, padded_k - k))

    # 2. outliers leave the dense matrix before any scale is computed
    n_outliers = round(outlier_frac * n * k)
    if max_bits_per_weight is not None:
        n_outliers = min(n_outliers, _outliers_within(max_bits_per_weight, (n, k), block_size, method, double_quant, scale_dtype))
    salient = 0 if hessian is None else n_outliers - round(PRE_SCALE_SHARE * n_outliers)
    rows, cols = select_outliers(dense[:, :k], n_outliers - salient, block_size, importance)
    outlier_vals = dense[rows, cols].to(torch.float16)
    dense[rows, cols] = 0.0

    # 3. scales
    blocks = dense.view(n, n_blocks, block_size)
    low, high = torch.aminmax(blocks, dim=2)  # one pass, no |w| temporary
    absmax = torch.maximum(high, -low)
    if codebook is None:
        codebook = method_codebook
        if fit_codebook:
            codebook = _fitted_codebook(blocks, absmax, codebook, column_weight, scale_dtype, scale_search)
    scales = absmax
    if scale_search:
        scales = _search_scales(blocks, absmax, codebook, column_weight, scale_dtype)
    if refine_scales:
        scales = _refine_scales(blocks, scales.to(scale_dtype).float(), codebook, column_weight, scale_dtype)
    scales = scales.to(scale_dtype)

    # 4. double quantization of the scales
    scale_fields: dict[str, torch.Tensor] = {"scales": scales}
    if double_quant:
        scale_fields = double_quantize(scales.float())
        scales = decode_double_quant(**scale_fields)  # codes must use exactly what a reader decodes

    # 5. codes
    # Outliers were zeroed and padding is 0, so both get the zero level's code here: 0 * (1/scale)
    # lies strictly between the two midpoints around the level 0 (tests/test_quantize.py checks it).
    if hessian is None:
        codes = _encode(blocks, scales.float(), codebook)
    else:
        codes, rows, cols, compensated = gptq_codes(w.detach().float(), scales.float(), codebook, hessian, rows, cols, block_size, salient)
        codes = pack_nibbles(codes)
        outlier_vals = compensated.to(torch.float16)

    row_ptr = torch.zeros(n + 1, dtype=torch.int32)
    row_ptr[1:] = torch.cumsum(torch.bincount(rows, minlength=n), 0).to(torch.int32)
    col_dtype = torch.uint16 if k <= 65536 else torch.int32
    return QWeight(
        shape=(n, k), block_size=block_size, method=method, codebook=codebook,
        codes=codes, outlier_row_ptr=row_ptr,
        outlier_cols=cols.to(torch.int32).to(col_dtype), outlier_vals=outlier_vals, **scale_fields,
    )


def _outliers_within(max_bits_per_weight, shape, block_size, method, double_quant, scale_dtype) -> int:
    """The most outliers a tensor can store and stay within max_bits_per_weight all-in (0 when the
    codes and scales alone leave no room for the row pointers and one outlier)."""
    budget = math.floor(max_bits_per_weight * shape[0] * shape[1] / 8)
    size = functools.partial(stored_nbytes, shape, block_size, method, double_quant=double_quant, scale_dtype=scale_dtype)
    if size(n_outliers=1) > budget:
        return 0
    bytes_per_outlier = size(n_outliers=2) - size(n_outliers=1)
    return 1 + (budget - size(n_outliers=1)) // bytes_per_outlier


def _check_inputs(w, block_size, outlier_frac, scale_dtype, importance, max_bits_per_weight, label,
                  statistic_checked: bool = False) -> None:
    """statistic_checked: importance's values were checked already (gptq.factor does, once for every
    Linear sharing the statistic); its shape still is."""
    if not isinstance(w, torch.Tensor):
        raise QuantizationInputError(f"{label} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2 or w.shape[0] == 0 or w.shape[1] == 0:
        raise QuantizationInputError(f"{label} must be a non-empty 2-D (out, in) matrix, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise QuantizationInputError(f"{label} must be floating point (fp32, fp16, bf16), got {w.dtype}")
    if w.device.type != "cpu":
        raise QuantizationInputError(f"{label} must be on the CPU (quantization is offline), got {w.device}")
    lowest, highest = torch.aminmax(w)  # one pass, no |w| temporary; a NaN propagates to both
    largest = max(-float(lowest), float(highest))
    if not math.isfinite(largest):
        row, col = (~torch.isfinite(w)).nonzero()[0].tolist()
        raise QuantizationInputError(f"{label} holds {w[row, col].item()} at position ({row}, {col})")
    if largest > FLOAT16_MAX:
        row, col = divmod(int(w.abs().argmax()), w.shape[1])
        raise QuantizationInputError(
            f"{label} holds {w[row, col].item()} at position ({row}, {col}), beyond float16's range "
            f"(+-{FLOAT16_MAX:g}) in which scales and outliers are stored"
        )
    if problem := block_size_problem(block_size) or outlier_frac_problem(outlier_frac):
        raise QuantizationInputError(problem)
    if scale_dtype not in (torch.float16, torch.float32):
        raise QuantizationInputError(f"scale_dtype must be torch.float16 or torch.float32, got {scale_dtype}")
    if max_bits_per_weight is not None and not (
        isinstance(max_bits_per_weight, (int, float)) and math.isfinite(max_bits_per_weight) and max_bits_per_weight > 0
    ):
        raise QuantizationInputError(f"max_bits_per_weight {max_bits_per_weight!r} must be a positive number of bits")
    if isinstance(importance, BlockDiagonal):  # each diagonal block is the E[x x^T] of its own columns
        if importance.shape != (w.shape[1], w.shape[1]):
            raise QuantizationInputError(f"importance's diagonal blocks cover {importance.shape[0]} input columns, "
                                         f"the tensor has {w.shape[1]}")
        for block in importance.blocks:
            _check_importance(block, block.shape[0], statistic_checked)
    elif importance is not None:
        _check_importance(importance, w.shape[1], statistic_checked)


def _check_importance(importance: torch.Tensor, k: int, values_checked: bool = False) -> None:
    """importance over k input columns: (k,) E[x^2] or (k, k) E[x x^T], finite, diagonal >= 0, and a
    matrix symmetric (gptq.check_second_moment); values_checked: the shape alone."""
    if importance.shape not in ((k,), (k, k)):
        raise QuantizationInputError(
            f"importance must have shape ({k},) (mean x**2 per input column) or ({k}, {k}) (E[x x^T]), "
            f"got {tuple(importance.shape)}"
        )
    if values_checked:
        return
    if importance.dim() == 2:
        check_second_moment(importance)
    elif not bool(torch.isfinite(importance).all()) or bool((importance < 0).any()):
        raise QuantizationInputError("importance must be finite, with a non-negative (diagonal) per column")


def _safe_reciprocal(scales: torch.Tensor) -> torch.Tensor:
    """1 / scale, and 0 for an all-zero block (its weights are all 0, so they get the zero code)."""
    return torch.where(scales > 0, 1.0 / scales.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


def _encode(blocks, scales, codebook, column_weight=None, want_errors=False):
    """blocks (N, nb, B) float32, scales (N, nb) float32 -> packed codes (N, nb*B/2) uint8, and with
    want_errors also (N, nb) float32: per block, sum of column_weight * (w - level * scale)**2.

    A weight's code is the nearest level of w * (1/scale), normalised as bitsandbytes does so plain
    NF4 matches it bit for bit. The native CPU library computes the same codes bit for bit about 25x
    faster than torch (docs/native.md); torch is the fallback when it is not built."""
    if _native_encoder_status() is None:
        from quantlite.kernels.native import encode_codes

        return encode_codes(blocks, scales, codebook, blocks.shape[2], column_weight, want_errors)
    codes = nearest_code(blocks * _safe_reciprocal(scales).unsqueeze(2), codebook)
    packed = pack_nibbles(codes.reshape(blocks.shape[0], -1))
    if not want_errors:
        return packed
    squared = (blocks - codebook[codes.long()] * scales.unsqueeze(2)).square_()
    if column_weight is not None:
        squared *= column_weight.view(1, blocks.shape[1], blocks.shape[2])
    return packed, squared.sum(dim=2)


@functools.cache
def _native_encoder_status() -> str | None:
    """None when the native CPU library is built and loads, else why not."""
    from quantlite.kernels.native import cpu_status

    return cpu_status()


def _search_scales(blocks, absmax, codebook, column_weight, scale_dtype) -> torch.Tensor:
    """Per block, the candidate scale (absmax * c, rounded to the storage dtype) with the least
    squared reconstruction error, weighted per column when importance is given."""
    best_scale = absmax.clone()
    best_error = torch.full_like(absmax, float("inf"))
    for factor in SCALE_CANDIDATES:
        candidate = (absmax * factor).to(scale_dtype).float()
        _, error = _encode(blocks, candidate, codebook, column_weight, want_errors=True)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = torch.where(better, candidate, best_scale)
    return best_scale


def _fitted_codebook(blocks, absmax, codebook, column_weight, scale_dtype, scale_search) -> torch.Tensor:
    """A codebook fitted to the blocks (N, nb, B): from each start (the method's `codebook` and the
    uniform grids of uniform_codebooks(), as Lloyd's iteration only finds the local optimum near its
    start), LLOYD_STEPS Lloyd steps, each after choosing the scales (the search, or absmax) for the
    current levels, on a strided sample of whole rows of about FIT_SAMPLE_BLOCKS blocks. Returns the
    start or fitted codebook with the least sample error ((16,) float32, a valid stored codebook), so
    on a tensor of at most FIT_SAMPLE_BLOCKS blocks the fit never does worse than `codebook`."""
    stride = max(1, blocks.shape[0] * blocks.shape[1] // FIT_SAMPLE_BLOCKS)
    sample, sample_absmax = blocks[::stride].contiguous(), absmax[::stride].contiguous()

    def scales_and_error(levels):
        scales = _search_scales(sample, sample_absmax, levels, column_weight, scale_dtype) if scale_search else sample_absmax
        return scales, float(_encode(sample, scales, levels, column_weight, want_errors=True)[1].double().sum())

    best, (_, best_error) = codebook, scales_and_error(codebook)
    for levels in (codebook, *uniform_codebooks()):
        scales, _ = scales_and_error(levels)
        for _ in range(LLOYD_STEPS):
            levels = lloyd_step(sample, scales, _unpacked_codes(sample, scales, levels), levels, column_weight)
            scales, error = scales_and_error(levels)
        if error < best_error:
            best, best_error = levels, error
    return best


def _refine_scales(blocks, scales, codebook, column_weight, scale_dtype) -> torch.Tensor:
    """REFINE_STEPS least-squares refinements of the block scales (N, nb) float32: for the levels l
    the block's weights now take, s = <a w, l> / <a l, l> (a: column weights, 1 without), rounded to
    the storage dtype and kept per block only where it lowers the block's squared error."""
    _, error = _encode(blocks, scales, codebook, column_weight, want_errors=True)
    weight = 1.0 if column_weight is None else column_weight.view(1, *blocks.shape[1:])
    for _ in range(REFINE_STEPS):
        levels = codebook[_unpacked_codes(blocks, scales, codebook).long()]  # (N, nb, B)
        weighted = weight * levels
        numerator, denominator = (weighted * blocks).sum(dim=2), (weighted * levels).sum(dim=2)
        candidate = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), scales)
        candidate = candidate.clamp(min=0.0).to(scale_dtype).float()
        _, candidate_error = _encode(blocks, candidate, codebook, column_weight, want_errors=True)
        better = candidate_error < error
        error = torch.where(better, candidate_error, error)
        scales = torch.where(better, candidate, scales)
    return scales


def double_quantize(scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """scales (N, nb) float32 -> 8-bit codes with a float32 (min, step) per group of 256 scales."""
    flat = scales.reshape(-1)
    n_groups = -(-flat.numel() // SCALE_GROUP_SIZE)
    padded = torch.nn.functional.pad(flat, (0, n_groups * SCALE_GROUP_SIZE - flat.numel()), value=float("nan"))
    groups = padded.view(n_groups, SCALE_GROUP_SIZE)
    group_min = torch.nan_to_num(groups, nan=float("inf")).amin(dim=1)
    group_max = torch.nan_to_num(groups, nan=float("-inf")).amax(dim=1)
    step = (group_max - group_min) / 255.0
    inverse = torch.where(step > 0, 1.0 / step.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = ((groups - group_min[:, None]) * inverse[:, None]).round_().clamp_(0, 255)
    codes = codes.reshape(-1)[: flat.numel()].to(torch.uint8).view(scales.shape)
    return {"scale_codes": codes, "scale_group_min": group_min, "scale_group_step": step}


def _unpacked_codes(blocks, scales, codebook) -> torch.Tensor:
    """blocks (N, nb, B) float32, scales (N, nb) float32 -> (N, nb, B) uint8: _encode's codes, unpacked."""
    packed = _encode(blocks, scales, codebook)  # (N, nb*B/2), low nibble = even column
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).view(blocks.shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, Kp) uint8 codes -> (N, Kp/2) uint8, low nibble = even column."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)
