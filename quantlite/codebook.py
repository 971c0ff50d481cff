"""The 16-level codebooks a 4-bit code indexes into.

Every method stores `codebook[16]` with the tensor, and dequantization is always
`codebook[code] * block_scale` (+ the sparse outlier value), so kernels never need to know which
method produced a weight.
"""
from __future__ import annotations

import numpy as np
import torch

# QLoRA's offset: the normal quantile range is cut at 0.9677 so the extreme levels are not infinite
# (bitsandbytes.functional.create_normal_map uses the same number).
NF4_OFFSET = 0.9677083


def nf4_codebook() -> torch.Tensor:
    """NormalFloat4 (QLoRA): 8 positive and 7 negative normal quantiles plus an exact zero, scaled to
    [-1, 1]. Asymmetric on purpose: one more positive level keeps 0 exactly representable.
    Returns (16,) float32, ascending."""
    # The quantile positions are float32 (torch.linspace) and the ppf values are rounded to float32
    # before the division, as in QLoRA's reference code, so the table equals bitsandbytes' NF4 table
    # bit for bit (tests/test_codebook.py). scipy is imported here, not at the top: the runtime never
    # builds a codebook (each tensor stores its own), and scipy costs it 70 MB of RSS.
    from scipy.stats import norm

    positive = norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 9)[:-1].numpy().astype(np.float64))  # 8, largest first
    negative = -norm.ppf(torch.linspace(NF4_OFFSET, 0.5, 8)[:-1].numpy().astype(np.float64))  # 7
    levels = torch.tensor(np.concatenate([positive, [0.0], negative]), dtype=torch.float32).sort().values
    return levels / levels.max()


def int4_codebook() -> torch.Tensor:
    """Symmetric round-to-nearest int4 with an absmax scale: level i is (i - 8) / 7, so the block's
    absmax maps to +-1 and the code for -8/7 is never chosen. Returns (16,) float32, ascending."""
    return torch.arange(-8, 8, dtype=torch.float32) / 7.0


def zero_code(codebook: torch.Tensor) -> int:
    """Index of the level 0.0: the code stored at outliers and in padding (both NF4 and int4 have one)."""
    hits = (codebook == 0).nonzero()
    if hits.numel() != 1:
        raise ValueError("a codebook must contain the level 0.0 exactly once")
    return int(hits[0, 0])


def nearest_code(normalized: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Code of the nearest level for values already divided by their block scale.
    Decision thresholds are the float32 midpoints between neighbouring levels and a value exactly on a
    midpoint goes to the lower level, as in bitsandbytes' quantize_4bit, so plain NF4 reproduces its
    codes bit for bit. Returns uint8 of the same shape."""
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(normalized, midpoints).to(torch.uint8)
