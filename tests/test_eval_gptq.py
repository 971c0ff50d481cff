"""quantize(w, importance=H) with a (K, K) second-moment matrix: GPTQ error feedback (quantlite.gptq).

The output error of a weight error dW on inputs with second moment H is tr(dW H dW^T), computed
here in float64. GPTQ must lower it against plain rounding with the same scales, reduce to plain
rounding when the inputs are uncorrelated, and keep outliers exact."""
import pytest
import torch

from quantlite import gptq
from quantlite.codebook import nf4_codebook
from quantlite.errors import QuantizationInputError
from quantlite.outliers import select_outliers
from quantlite.quantizer import PRE_SCALE_SHARE, quantize


def output_error(w: torch.Tensor, qw, h: torch.Tensor) -> float:
    dw = w.double() - qw.dequantize(torch.float64)
    return torch.einsum("nk,kl,nl->", dw, h.double(), dw).item()


def correlated_inputs(k: int, generator: torch.Generator) -> torch.Tensor:
    """E[x x^T] of inputs with correlated columns (a random mix plus 4 shared factors) and uneven
    column scales, as an LLM layer's inputs have."""
    mix = torch.randn(k, k, generator=generator) / k**0.5 + 0.3 * torch.eye(k)
    shared = torch.randn(k, 4, generator=generator)
    z = torch.randn(4 * k, k, generator=generator) @ mix + torch.randn(4 * k, 4, generator=generator) @ shared.T
    x = z * torch.rand(k, generator=generator).add(0.1)
    return x.T @ x / x.shape[0]


@pytest.mark.parametrize("n, k, block_size", [(16, 64, 64), (33, 200, 32), (8, 130, 64)])
def test_lowers_output_error(generator, n, k, block_size):
    w = torch.randn(n, k, generator=generator)
    h = correlated_inputs(k, generator)
    plain = quantize(w, block_size=block_size)
    gptq = quantize(w, block_size=block_size, importance=h)
    # Measured ratio 0.12-0.27 over 18 draws of these shapes; 0.5 leaves room for the random draw,
    # and a broken update (wrong sign or factor, stale columns) lands above 1.
    assert output_error(w, gptq, h) < 0.5 * output_error(w, plain, h)
    assert gptq.bits_per_weight == plain.bits_per_weight


def test_uncorrelated_inputs_give_plain_rounding(generator):
    """With H = c * I no error can be compensated: every code is plain rounding's under the stored
    scales, every outlier holds its weight unchanged, and those chosen in the pass are the weights
    with the largest rounding error."""
    n, k = 24, 192
    w = torch.randn(n, k, generator=generator)
    h = torch.eye(k) * (0.5 + torch.rand(1, generator=generator).item())
    qw = quantize(w, outlier_frac=0.01, importance=h)
    scales = qw.block_scales().float().repeat_interleave(64, dim=1)
    codebook = qw.codebook.double()
    ratio = (w.double() / scales.double()).unsqueeze(2)
    rounded = codebook[(ratio - codebook).abs().argmin(dim=2)] * scales.double()
    rows = torch.repeat_interleave(torch.arange(n), torch.diff(qw.outlier_row_ptr.long()))
    cols = qw.outlier_cols.long()
    is_outlier = torch.zeros(n, k, dtype=torch.bool)
    is_outlier[rows, cols] = True
    dense = qw.dequantize(torch.float64)
    # a different code would be off by a level gap (>= 0.07 x scale in NF4); float rounding by ~1e-7
    assert bool(((dense - rounded).abs()[~is_outlier] <= 1e-4 * scales.double()[~is_outlier]).all())
    assert torch.equal(qw.outlier_vals, w[rows, cols].half())
    before = select_outliers(w, round(PRE_SCALE_SHARE * qw.n_outliers), 64, h.diagonal())
    in_pass = is_outlier.clone()
    in_pass[before] = False
    rounding = (w.double() - rounded).abs()
    assert int(in_pass.sum()) == qw.n_outliers - before[0].numel() > 0
    assert rounding[in_pass].min() >= rounding[~is_outlier].max()


def test_outliers_hold_the_compensated_weight(generator):
    n, k = 32, 128
    w = torch.randn(n, k, generator=generator)
    qw = quantize(w, outlier_frac=0.02, importance=correlated_inputs(k, generator))
    assert qw.n_outliers == round(0.02 * n * k)
    rows = torch.repeat_interleave(torch.arange(n), torch.diff(qw.outlier_row_ptr.long()))
    cols = qw.outlier_cols.long()
    dense = qw.dequantize(torch.float64)
    assert torch.equal(dense[rows, cols], qw.outlier_vals.double())      # exact at an outlier
    zero = int((qw.codebook == 0).nonzero()[0, 0])
    assert bool((qw.unpacked_codes()[rows, cols] == zero).all())
    # compensated values stay near the originals (the error fed into them is a fraction of a step)
    assert (qw.outlier_vals.float() - w[rows, cols]).abs().max() < 0.5 * w.abs().max()


def test_dead_columns_are_quantized_plainly(generator):
    """A column the calibration never excited (zero row and column of H) still gets a code."""
    w = torch.randn(8, 64, generator=generator)
    h = correlated_inputs(64, generator)
    h[5, :] = 0
    h[:, 5] = 0
    qw = quantize(w, importance=h)
    assert (qw.dequantize()[:, 5] - w[:, 5]).abs().max() <= 0.25 * w.abs().max()


@pytest.mark.parametrize(
    "importance, message",
    [
        (torch.ones(64, 63), "shape"),
        (torch.randn(64, 64), "symmetric|non-negative"),
        (torch.full((64, 64), float("nan")), "finite"),
    ],
)
def test_rejects_bad_second_moments(importance, message):
    with pytest.raises(QuantizationInputError, match=message):
        quantize(torch.randn(4, 64), importance=importance)


@pytest.mark.parametrize(
    "statistic, message",
    [
        (torch.randn(64, 64), "symmetric|non-negative"),
        (torch.full((64, 64), float("nan")), "finite"),
        (-torch.eye(64), "non-negative"),
    ],
)
def test_factor_checks_the_statistic_once_for_every_sharer(statistic, message):
    """gptq.factor checks E[x x^T] (quantize then checks a Factored's shape only): a bad one is
    refused there, whole or as a block of a BlockDiagonal."""
    with pytest.raises(QuantizationInputError, match=message):
        gptq.factor(statistic)
    with pytest.raises(QuantizationInputError, match=message):
        gptq.factor(gptq.BlockDiagonal((torch.eye(32), statistic)))


def test_rejects_indefinite_second_moment():
    h = -torch.eye(64)
    h[0, 0] = 1.0  # diagonal must be non-negative: caught before the factorisation
    with pytest.raises(QuantizationInputError):
        quantize(torch.randn(4, 64), importance=h)


# --------------------------------------------------------------------------- outliers chosen in the pass, act-order
def reference_gptq(w, column_scale, codebook, h, order, exact, quota):
    """GPTQ written out in float64 in OBQ's form (the inverse Hessian of the columns not yet rounded,
    updated after each column), in the column order `order`: w (N, K), column_scale (N, K) the scale
    of each weight, `exact` (N, K) bool the outliers chosen beforehand, `quota` per column (in
    processing order) how many more to keep exact there, by their rounding error, or None.
    Returns the reconstructed weight (N, K) float64 and the outlier mask, and the saliency (N, K) of
    every weight in the pass: its squared rounding error over the inverse Hessian's diagonal."""
    work = w.double()[:, order].clone()
    scale = column_scale.double()[:, order]
    exact = exact[:, order].clone()
    hp = h.double()[order][:, order]
    hinv = torch.linalg.inv(hp + gptq.DAMPING[0] * hp.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64))
    levels = codebook.double()
    result = torch.empty_like(work)
    saliency = torch.zeros_like(work)
    for j in range(work.shape[1]):
        x = work[:, j]
        ratio = torch.where(scale[:, j] > 0, x / scale[:, j], 0.0)
        q = levels[(ratio.unsqueeze(1) - levels).abs().argmin(dim=1)] * scale[:, j]
        if quota is not None and quota[j] > 0:
            error = (x - q).abs().masked_fill(exact[:, j], -1.0)
            exact[torch.topk(error, quota[j]).indices, j] = True
        q = torch.where(exact[:, j], x, q)
        result[:, j] = q
        saliency[:, j] = (x - q).square() / hinv[j, j]
        work[:, j + 1:] -= ((x - q) / hinv[j, j]).unsqueeze(1) * hinv[j, j + 1:]
        hinv = hinv - torch.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    inverse = torch.argsort(order)
    return result[:, inverse], exact[:, inverse], saliency[:, inverse]


def absmax_scales(w, block_size):
    """(N, K // B) absmax scales of w, and the same as (N, K) per weight."""
    n, k = w.shape
    scales = w.abs().view(n, k // block_size, block_size).amax(dim=2)
    return scales, scales.repeat_interleave(block_size, dim=1)


def reconstructed(codes, scales, codebook, rows, cols, values, block_size):
    k = codes.shape[1]
    dense = codebook.double()[codes.long()] * scales.double().repeat_interleave(block_size, dim=1)[:, :k]
    dense[rows, cols] = values.double()
    return dense


@pytest.mark.parametrize("act_order", [False, True])
def test_matches_the_float64_reference(generator, monkeypatch, act_order):
    """Codes, outliers and their values of gptq_codes (float32, lazy blocks, Cholesky form) against
    the float64 reference, with outliers both chosen beforehand and in the pass, in either column order."""
    monkeypatch.setattr(gptq, "ACT_ORDER", act_order)
    n, k, block_size = 24, 192, 64
    w = torch.randn(n, k, generator=generator)
    h = correlated_inputs(k, generator)
    scales, column_scale = absmax_scales(w, block_size)
    codebook = nf4_codebook()
    before = torch.randperm(n * k, generator=generator)[:20]
    rows, cols = before // k, before % k
    codes, out_rows, out_cols, values = gptq.gptq_codes(w, scales, codebook, h, rows, cols, block_size, 30)
    ours = reconstructed(codes, scales, codebook, out_rows, out_cols, values, block_size)

    order = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else torch.arange(k)
    exact = torch.zeros(n, k, dtype=torch.bool)
    exact[rows, cols] = True
    _, _, saliency = reference_gptq(w, column_scale, codebook, h, order, exact, None)
    chosen = torch.topk(saliency.masked_fill(exact, -1.0)[:, order].T.reshape(-1), 30).indices
    quota = torch.bincount(chosen // n, minlength=k).tolist()
    reference, reference_exact, _ = reference_gptq(w, column_scale, codebook, h, order, exact, quota)

    assert out_rows.numel() == 50 and bool(exact[rows, cols].all())
    flat = out_rows * k + out_cols
    assert bool((flat[1:] > flat[:-1]).all())  # sorted by row then column
    # float32 against float64: a rounding tie can flip a code and what follows in its row; measured
    # 0-1 differing weights out of 4608 over 60 draws (both orders), so 1 % catches any wrong update or order
    differing = (ours - reference).abs() > 1e-3 * w.abs().max()
    assert int(differing.sum()) <= 0.01 * n * k
    assert int((reference_exact[out_rows, out_cols]).sum()) >= 50 - 3


def test_salient_outliers_beat_magnitude_outliers(generator):
    """At the same count and the same scales, outliers chosen in the pass by saliency leave a lower
    output error tr(dW H dW^T) than the largest-magnitude ones chosen beforehand."""
    n, k, block_size = 64, 256, 64
    w = torch.randn(n, k, generator=generator) * torch.rand(n, k, generator=generator).pow(4).mul(4).add(0.5)  # heavy tails
    h = correlated_inputs(k, generator)
    scales, _ = absmax_scales(w, block_size)
    codebook = nf4_codebook()
    count = round(0.01 * n * k)
    rows, cols = select_outliers(w, count, block_size, h.diagonal())
    by_magnitude = gptq.gptq_codes(w, scales, codebook, h, rows, cols, block_size)
    none = torch.empty(0, dtype=torch.int64)
    by_saliency = gptq.gptq_codes(w, scales, codebook, h, none, none, block_size, count)
    assert by_saliency[1].numel() == count
    errors = [output_error(w, Reconstruction(reconstructed(*result[:1], scales, codebook, *result[1:], block_size)), h)
              for result in (by_magnitude, by_saliency)]
    # measured ratio 0.74-0.89 over 30 draws; an inverted or random choice lands above 1
    assert errors[1] < 0.95 * errors[0]


class Reconstruction:
    def __init__(self, dense):
        self.dense = dense

    def dequantize(self, dtype):
        return self.dense.to(dtype)


def test_budget_split_and_exact_outliers(generator):
    """quantize with E[x x^T]: the outlier count is the bit budget's, the PRE_SCALE_SHARE part chosen
    before the scales by magnitude x sqrt(E[x_j^2]), the rest in the pass, every one stored exactly
    (the compensated weight) with the zero code."""
    n, k = 48, 320
    w = torch.randn(n, k, generator=generator)
    h = correlated_inputs(k, generator)
    qw = quantize(w, importance=h)
    plain = quantize(w)
    assert qw.n_outliers == plain.n_outliers > 0
    assert qw.bits_per_weight == plain.bits_per_weight <= 4.5
    rows = torch.repeat_interleave(torch.arange(n), torch.diff(qw.outlier_row_ptr.long()))
    cols = qw.outlier_cols.long()
    assert torch.equal(qw.dequantize(torch.float64)[rows, cols], qw.outlier_vals.double())
    zero = int((qw.codebook == 0).nonzero()[0, 0])
    assert bool((qw.unpacked_codes()[rows, cols] == zero).all())
    stored = set(zip(rows.tolist(), cols.tolist()))
    assert len(stored) == qw.n_outliers
    before = select_outliers(w, round(PRE_SCALE_SHARE * qw.n_outliers), 64, h.diagonal())
    assert set(zip(before[0].tolist(), before[1].tolist())) <= stored
