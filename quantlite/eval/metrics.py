"""Per-tensor error of a quantized weight against the original, computed in float64.

  sqnr_db         10 log10(||W||^2 / ||W - Q||^2): signal-to-quantization-noise ratio, in dB
                  (about 6 dB per bit for a uniform quantizer; +inf when Q == W)
  relative_error  ||W - Q|| / ||W|| (Frobenius)
  output_relative_error
                  the same with column j weighted by importance[j] = E[x_j^2]: the relative error of
                  the layer output y = W x when the input columns are uncorrelated
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from quantlite.errors import QuantliteError
from quantlite.qweight import QWeight


class MetricError(QuantliteError, ValueError):
    """The two tensors cannot be compared (shapes differ, not floating point, empty)."""


@dataclass(frozen=True)
class TensorError:
    sqnr_db: float
    relative_error: float
    output_relative_error: float | None  # None without importance
    max_abs_error: float
    bits_per_weight: float | None        # None when the approximation is a plain tensor

    def as_dict(self) -> dict:
        return asdict(self)


def _pair(reference: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(reference, torch.Tensor) and isinstance(approx, torch.Tensor)):
        raise MetricError("both arguments must be tensors")
    if reference.shape != approx.shape:
        raise MetricError(f"shapes differ: reference {tuple(reference.shape)}, approximation {tuple(approx.shape)}")
    if reference.numel() == 0 or not (reference.is_floating_point() and approx.is_floating_point()):
        raise MetricError("both tensors must be non-empty and floating point")
    return reference.detach().cpu().double(), approx.detach().cpu().double()


def _ratio_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    ref, app = _pair(reference, approx)
    return _ratio_db(float(ref.square().sum()), float((ref - app).square().sum()))


def relative_error(reference: torch.Tensor, approx: torch.Tensor, importance: torch.Tensor | None = None) -> float:
    """||W - Q|| / ||W||, columns weighted by `importance` ((K,), non-negative) when given; 0/0 is 0."""
    ref, app = _pair(reference, approx)
    error, signal = (ref - app).square(), ref.square()
    if importance is not None:
        if importance.shape != (ref.shape[-1],) or bool((importance < 0).any()):
            raise MetricError(f"importance must be ({ref.shape[-1]},) and non-negative, got {tuple(importance.shape)}")
        column_weight = importance.detach().cpu().double()
        error, signal = error * column_weight, signal * column_weight
    noise, power = float(error.sum()), float(signal.sum())
    if noise == 0.0:
        return 0.0
    return math.sqrt(noise / power) if power > 0 else math.inf


def tensor_error(reference: torch.Tensor, approx: torch.Tensor | QWeight, importance: torch.Tensor | None = None) -> TensorError:
    """Every metric of `approx` (a tensor or a QWeight, dequantized in float64) against `reference`."""
    bits = approx.bits_per_weight if isinstance(approx, QWeight) else None
    dense = approx.dequantize(torch.float64) if isinstance(approx, QWeight) else approx
    ref, app = _pair(reference, dense)
    return TensorError(
        sqnr_db=sqnr_db(ref, app),
        relative_error=relative_error(ref, app),
        output_relative_error=None if importance is None else relative_error(ref, app, importance),
        max_abs_error=float((ref - app).abs().max()),
        bits_per_weight=bits,
    )
