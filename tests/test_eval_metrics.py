"""quantlite.eval.metrics: SQNR and relative errors against float64 formulas written out here."""
import math

import pytest
import torch

from quantlite.eval.metrics import MetricError, relative_error, sqnr_db, tensor_error
from quantlite.quantizer import quantize


def test_known_noise_level(generator):
    """approx = W * (1 + eps) has relative error eps and SQNR -20 log10(eps) exactly (up to float64 rounding)."""
    w = torch.randn(37, 91, generator=generator, dtype=torch.float64)
    eps = 10 ** (-torch.rand(1, generator=generator).item() * 4)  # 1e-4 .. 1
    approx = w * (1 + eps)
    assert relative_error(w, approx) == pytest.approx(eps, rel=1e-9)
    assert sqnr_db(w, approx) == pytest.approx(-20 * math.log10(eps), rel=1e-9)


def test_against_float64_formula_for_float32_inputs(generator):
    w = torch.randn(64, 48, generator=generator)
    approx = w + 0.05 * torch.randn(64, 48, generator=generator)
    importance = torch.rand(48, generator=generator) * 3
    d = (w.double() - approx.double())
    expected_rel = (d.square().sum() / w.double().square().sum()).sqrt().item()
    weighted = ((d.square() * importance.double()).sum() / (w.double().square() * importance.double()).sum()).sqrt()
    assert relative_error(w, approx) == pytest.approx(expected_rel, rel=1e-12)
    assert relative_error(w, approx, importance) == pytest.approx(weighted.item(), rel=1e-12)
    assert sqnr_db(w, approx) == pytest.approx(-20 * math.log10(expected_rel), rel=1e-12)


def test_tensor_error_of_a_qweight(generator):
    w = torch.randn(48, 200, generator=generator)
    qw = quantize(w, method="nf4")
    report = tensor_error(w, qw, importance=torch.rand(200, generator=generator))
    dense = qw.dequantize(torch.float64)
    assert report.relative_error == pytest.approx(relative_error(w, dense), rel=1e-12)
    assert report.max_abs_error == pytest.approx((w.double() - dense).abs().max().item(), rel=1e-12)
    assert report.bits_per_weight == qw.bits_per_weight
    # NF4 on Gaussian weights: ~20 dB (the 4-bit Lloyd-Max bound for a Gaussian is 20.2 dB); a broken
    # dequantization lands far below.
    assert 15 < report.sqnr_db < 25
    assert report.output_relative_error is not None


def test_exact_copy_and_zero_reference():
    w = torch.randn(4, 8)
    assert sqnr_db(w, w.clone()) == math.inf and relative_error(w, w.clone()) == 0.0
    zero = torch.zeros(4, 8)
    assert relative_error(zero, w) == math.inf and sqnr_db(zero, w) == -math.inf


@pytest.mark.parametrize(
    "reference, approx",
    [
        (torch.zeros(3, 4), torch.zeros(4, 3)),
        (torch.zeros(3, 4, dtype=torch.int32), torch.zeros(3, 4, dtype=torch.int32)),
        (torch.zeros(0, 4), torch.zeros(0, 4)),
    ],
)
def test_rejects_incomparable_tensors(reference, approx):
    with pytest.raises(MetricError):
        sqnr_db(reference, approx)


def test_rejects_bad_importance():
    with pytest.raises(MetricError, match="importance"):
        relative_error(torch.ones(2, 3), torch.zeros(2, 3), torch.ones(4))
