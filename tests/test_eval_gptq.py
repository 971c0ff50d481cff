"""quantize(w, importance=H) with a (K, K) second-moment matrix: GPTQ error feedback (quantlite.gptq).

The output error of a weight error dW on inputs with second moment H is tr(dW H dW^T), computed
here in float64. GPTQ must lower it against plain rounding with the same scales, reduce to plain
rounding when the inputs are uncorrelated, and keep outliers exact."""
import pytest
import torch

from quantlite.errors import QuantizationInputError
from quantlite.quantizer import quantize


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
    """With H = c * I no error can be compensated: the codes must be plain rounding's, bit for bit."""
    w = torch.randn(24, 192, generator=generator)
    h = torch.eye(192) * (0.5 + torch.rand(1, generator=generator).item())
    plain = quantize(w, outlier_frac=0.01)
    gptq = quantize(w, outlier_frac=0.01, importance=h)
    assert torch.equal(gptq.codes, plain.codes)
    assert torch.equal(gptq.outlier_vals, plain.outlier_vals)


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


def test_rejects_indefinite_second_moment():
    h = -torch.eye(64)
    h[0, 0] = 1.0  # diagonal must be non-negative: caught before the factorisation
    with pytest.raises(QuantizationInputError):
        quantize(torch.randn(4, 64), importance=h)
