"""Which weights go to the sparse fp16 side table.

An outlier costs 32 bits (fp16 value + 16-bit column) instead of ~4, so only a small fraction can be
kept. They are chosen before the block scales: a weight far larger than its neighbours would
otherwise stretch its block's scale and blur the other 63 weights of the block.
"""
from __future__ import annotations

import torch


def select_outliers(
    w: torch.Tensor, count: int, block_size: int, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float32 -> (rows, cols) int64 of `count` outliers, sorted by row then column.

    Score: |w| * sqrt(importance[col]) when per-column importance (mean x**2) is given, else |w|.
    """
    n, k = w.shape
    count = min(count, n * k)
    if count == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty
    score = w.abs()
    if importance is not None:
        score = score * importance.to(torch.float32).sqrt()
    flat_index = torch.topk(score.reshape(-1), count, sorted=False).indices.sort().values
    return flat_index // k, flat_index % k
