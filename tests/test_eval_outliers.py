"""quantlite.outliers.select_outliers: exactly the `count` largest scores (checked against a full
sort written out here), ascending, for sizes on both sides of the sampling shortcut."""
import pytest
import torch

from quantlite.outliers import MIN_SAMPLED, SAMPLE_STRIDE, select_outliers


def reference(score: torch.Tensor, count: int) -> set[tuple[int, int]]:
    order = torch.argsort(score.reshape(-1).double(), descending=True, stable=True)[:count]
    k = score.shape[1]
    return {(int(i) // k, int(i) % k) for i in order}


@pytest.mark.parametrize("shape, frac", [((7, 300), 0.02), ((300, 1000), 0.005), ((64, 64), 0.25), ((513, 777), 0.001)])
def test_largest_scores_ascending(generator, shape, frac):
    w = torch.randn(shape, generator=generator) * torch.rand(shape[1], generator=generator)  # uneven columns
    count = round(frac * w.numel())
    rows, cols = select_outliers(w, count, 64)
    assert rows.numel() == count and rows.dtype == torch.int64
    flat = rows * shape[1] + cols
    assert bool((flat[1:] > flat[:-1]).all())  # sorted by row then column, no duplicates
    assert {(int(r), int(c)) for r, c in zip(rows, cols)} == reference(w.abs(), count)


def test_importance_weights_the_score(generator):
    w = torch.randn(200, 300, generator=generator)
    importance = torch.rand(300, generator=generator) ** 4
    rows, cols = select_outliers(w, 600, 64, importance)
    assert {(int(r), int(c)) for r, c in zip(rows, cols)} == reference(w.abs() * importance.sqrt(), 600)


def test_ties_fill_in_index_order(generator):
    """Integer-valued weights: many equal scores at the threshold; the count is still exact."""
    w = torch.randint(-3, 4, (128, 512), generator=generator).float()
    assert w.numel() // SAMPLE_STRIDE >= MIN_SAMPLED // 4  # large enough to be interesting
    count = int((w.abs() == 3).sum()) + 17  # every 3, then 17 of the many 2s
    rows, cols = select_outliers(w, count, 64)
    picked = w[rows, cols].abs()
    assert rows.numel() == count and int((picked == 3).sum()) == count - 17 and bool((picked >= 2).all())


def test_shortcut_and_fallback_paths_agree(generator):
    """Large enough to take the sampled threshold; a score layout that fools the sample falls back."""
    w = torch.randn(256, 1024, generator=generator)
    count = 2000
    rows, cols = select_outliers(w, count, 64)
    assert {(int(r), int(c)) for r, c in zip(rows, cols)} == reference(w.abs(), count)
    fooled = torch.zeros(256, 1024)
    fooled.view(-1)[::SAMPLE_STRIDE] = 10.0            # every sampled score is large ...
    fooled.view(-1)[1::SAMPLE_STRIDE] = 5.0            # ... the next ones are the rest of the answer
    count = fooled.numel() // SAMPLE_STRIDE + 500
    rows, cols = select_outliers(fooled, count, 64)
    assert rows.numel() == count and {(int(r), int(c)) for r, c in zip(rows, cols)} == reference(fooled, count)


def test_edge_counts(generator):
    w = torch.randn(5, 6, generator=generator)
    rows, cols = select_outliers(w, 0, 64)
    assert rows.numel() == 0 and cols.numel() == 0
    rows, cols = select_outliers(w, 1000, 64)  # more than there are: all of them
    assert rows.numel() == 30
