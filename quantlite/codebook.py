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


def uniform_codebooks() -> tuple[torch.Tensor, torch.Tensor]:
    """The two uniform 16-level grids with an exact 0 inside [-1, 1]: (i - 8) / 8, one more level
    below zero, and its mirror (i - 7) / 8. Starting points of the codebook fit (a weight on a
    uniform grid, such as a Q4_1 GGUF's, is coded by them far better than by NF4). (16,) float32 each."""
    steps = torch.arange(16, dtype=torch.float32)
    return (steps - 8) / 8, (steps - 7) / 8


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
    return torch.bucketize(normalized, code_midpoints(codebook)).to(torch.uint8)


def code_midpoints(codebook: torch.Tensor) -> torch.Tensor:
    """(15,) the decision thresholds of nearest_code: float32 midpoints of neighbouring levels."""
    return (codebook[1:] + codebook[:-1]) / 2


def lloyd_step(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    column_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Lloyd-Max step of a per-tensor codebook: with the codes (nearest levels) and the block
    scales fixed, each level moves to the value that minimises the (column-weighted) squared error
    of the weights it codes,

        level_j = sum a_k w s / sum a_k s^2   over the weights coded j (s: their block's scale),

    the zero level stays exactly 0, a level that codes nothing keeps its place, and the result is
    rescaled so its largest magnitude is 1 (the scales keep meaning "about the block's absmax").
    blocks (M, nb, B) float32, scales (M, nb) float32, codes (M, nb, B) uint8 (each weight's nearest
    level, nearest_code's rule), column_weight (nb * B,) or None -> (16,) float32. Returns `codebook`
    itself when the step would break the format's rule (16 finite, strictly ascending levels with
    one 0.0) — it cannot for non-degenerate inputs, as Lloyd's cells are intervals that keep their
    order."""
    codes = codes.long().reshape(-1)                                                  # (M*nb*B,)
    block_scale = scales.unsqueeze(2).expand_as(blocks)                                # (M, nb, B)
    weight = block_scale if column_weight is None else block_scale * column_weight.view(1, *blocks.shape[1:])
    numerator = torch.zeros(16, dtype=torch.float64).index_add_(0, codes, (weight * blocks).reshape(-1).double())
    denominator = torch.zeros(16, dtype=torch.float64).index_add_(0, codes, (weight * block_scale).reshape(-1).double())
    levels = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), codebook.double())
    levels[zero_code(codebook)] = 0.0
    levels = (levels / levels.abs().max()).float()
    return codebook if codebook_problem(levels) else levels


def codebook_problem(codebook: torch.Tensor) -> str | None:
    """Why `codebook` is not one the format stores (docs/FORMAT.md: (16,) float32, finite, strictly
    ascending, the level 0.0 exactly once), or None."""
    if not isinstance(codebook, torch.Tensor) or codebook.shape != (16,) or codebook.dtype != torch.float32:
        return "a codebook must be a (16,) float32 tensor"
    if not bool(torch.isfinite(codebook).all()) or not bool((codebook[1:] > codebook[:-1]).all()):
        return "a codebook must hold 16 finite, strictly ascending levels"
    if int((codebook == 0).sum()) != 1:
        return "a codebook must contain the level 0.0 exactly once"
    return None
