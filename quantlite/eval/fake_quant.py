"""Fake quantization: replace each Linear weight of a float model by quantize(w).dequantize().

The model then computes exactly what a packed model computes (the same dequantized weights), but in
transformers' float32 forward, so a quantization setting can be scored without converting or
loading a packed directory. Used by benchmarks/accuracy.py and by the accuracy tests.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from quantlite.qweight import QWeight

# (weight (N, K) float32, name, importance (K,) or None) -> QWeight
Quantizer = Callable[[torch.Tensor, str, "torch.Tensor | None"], QWeight]


@dataclass(frozen=True)
class FakeQuantStats:
    tensors: int          # Linear weights replaced
    weights: int          # their element count
    stored_bytes: int     # every byte of their QWeights (QWeight.nbytes)
    n_outliers: int

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per quantized weight, over every replaced tensor together."""
        return 8.0 * self.stored_bytes / self.weights


def linear_weights(model: torch.nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, torch.nn.Linear]:
    """{"<module name>.weight": Linear} of every nn.Linear whose name contains no entry of `skip`."""
    return {
        f"{name}.weight": module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    }


@contextmanager
def fake_quantized(
    model: torch.nn.Module,
    quantizer: Quantizer,
    *,
    importance: dict[str, torch.Tensor] | None = None,
    skip: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> Iterator[FakeQuantStats]:
    """Within the block, every Linear weight of `model` (but those named in `skip`) is its
    quantize-dequantize round trip; the original weights come back on exit, even after an error.
    `importance` maps weight names to (K,) per-column statistics (quantlite.calibration)."""
    from tqdm.auto import tqdm

    originals: dict[str, torch.Tensor] = {}
    weights = stored = outliers = 0
    try:
        for name, linear in tqdm(linear_weights(model, skip).items(), desc="fake quantization", disable=not progress):
            w = linear.weight.data
            qw = quantizer(w.float().cpu(), name, None if importance is None else importance[name])
            originals[name] = w
            linear.weight.data = qw.dequantize(torch.float32).to(w.device, w.dtype)
            weights += w.numel()
            stored += qw.nbytes
            outliers += qw.n_outliers
        yield FakeQuantStats(len(originals), weights, stored, outliers)
    finally:
        modules = linear_weights(model, skip)
        for name, w in originals.items():
            modules[name].weight.data = w
