"""Which weights go to the sparse fp16 side table.

An outlier costs 32 bits (fp16 value + 16-bit column) instead of ~4, so only a small fraction can be
kept. They are chosen before the block scales: a weight far larger than its neighbours would
otherwise stretch its block's scale and blur the other 63 weights of the block. The score is the
weight's magnitude, times sqrt(E[x_j^2]) of its input column when calibration statistics are given
(its contribution to the layer output).

Selection is exact (the `count` largest scores) without a full top-k over all N*K scores: a strided
sample of the scores gives a threshold a little below the count-th largest, one comparison pass
keeps the few candidates above it, and top-k runs on those only; a boolean mask over the candidates
keeps the indices ascending without sorting them (a full top-k over N*K scores and the sort of its
indices were the cost of the old rule).
"""
from __future__ import annotations

import torch

SAMPLE_STRIDE = 61    # every 61st score (prime: no alignment with rows or blocks)
MIN_SAMPLED = 4096    # below this many scores the plain top-k is already cheap
THRESHOLD_SLACK = 2   # aim the sampled threshold at 2x `count`, so it is rarely too high


def select_outliers(
    w: torch.Tensor, count: int, block_size: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float32 -> (rows, cols) int64 of the `count` largest scores, sorted by row then column.

    Score: |w| * sqrt(importance[col]) when per-column importance (mean x**2) is given, else |w|.
    Ties at the threshold are broken by top-k's order. `block_size` is unused by this rule (kept so
    a block-aware rule can replace it without changing callers).
    """
    n, k = w.shape
    count = min(count, n * k)
    if count == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    score = w.abs()
    if importance is not None:
        score = score * importance.to(torch.float32).sqrt()
    flat_index = _largest(score.reshape(-1), count)
    return flat_index // k, flat_index % k


def _largest(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Ascending indices of the `count` largest entries of `flat` (n,); among equal scores at the
    threshold, the lowest indices win."""
    sample = flat[::SAMPLE_STRIDE]
    wanted = count * THRESHOLD_SLACK // SAMPLE_STRIDE + 1  # expected number of sampled scores above the threshold
    candidates = None
    if sample.numel() >= MIN_SAMPLED and wanted < sample.numel():
        threshold = torch.topk(sample, wanted, sorted=False).values.min()
        candidates = (flat >= threshold).nonzero().squeeze(1)  # ascending
    if candidates is None or candidates.numel() < count:  # small input, or the sample aimed too high
        candidates = torch.arange(flat.numel())
    values = flat[candidates]
    kth = torch.topk(values, count, sorted=False).values.min()
    # a boolean mask instead of top-k's indices keeps them ascending (sorting 1e5 indices cost more
    # than everything else here); ties at kth fill the remaining places in index order
    above = values > kth
    ties = (values == kth).nonzero().squeeze(1)[: count - int(above.sum())]
    above[ties] = True
    return candidates[above]
