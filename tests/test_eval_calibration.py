"""quantlite.calibration: the statistics of each Linear input against a float64 computation written
out here, on a small module whose Linear inputs are known in closed form."""
import pytest
import torch

from quantlite.calibration import CalibrationError, collect_input_stats


class TwoBranch(torch.nn.Module):
    """ids -> embedding x; a(x) and b(x) read the same tensor (like q/k/v), c reads a(x) * b(x)."""

    def __init__(self, vocab: int, dim: int, hidden: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.a = torch.nn.Linear(dim, hidden, bias=False)
        self.b = torch.nn.Linear(dim, hidden, bias=False)
        self.c = torch.nn.Linear(hidden, dim, bias=False)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)
        self.unused = torch.nn.Linear(3, 3)

    def forward(self, ids):
        x = self.embed(ids)
        return self.lm_head(self.c(self.a(x) * self.b(x)))


def test_second_moments_match_float64(generator):
    model = TwoBranch(vocab=50, dim=24, hidden=40)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    del model.unused
    ids = torch.randint(0, 50, (5 * 16 + 7,), generator=generator)  # 5 windows of 16, a tail that is dropped
    full = collect_input_stats(model, ids, ctx=16, max_windows=None, full=True, progress=False)
    diag = collect_input_stats(model, ids, ctx=16, max_windows=None, progress=False)

    x = model.embed.weight.double()[ids[: 5 * 16]]                     # (80, 24) input of a and b
    h = (x @ model.a.weight.double().T) * (x @ model.b.weight.double().T)  # (80, 40) input of c
    expected = {"a.weight": x.T @ x / 80, "b.weight": x.T @ x / 80, "c.weight": h.T @ h / 80}
    assert set(full) == set(expected)  # lm_head is skipped by default
    for name, moment in expected.items():
        # float32 products of O(10) values over 16 rows, summed in float64: ~1e-6 relative
        scale = moment.abs().max().item()
        assert (full[name].double() - moment).abs().max().item() <= 1e-5 * scale, name
        assert (diag[name].double() - moment.diagonal()).abs().max().item() <= 1e-5 * scale, name
    assert full["a.weight"] is full["b.weight"]  # one statistic for Linears that read the same tensor


def test_max_windows_limits_the_text(generator):
    model = TwoBranch(vocab=20, dim=8, hidden=8)
    del model.unused
    ids = torch.randint(0, 20, (64,), generator=generator)
    first = collect_input_stats(model, ids, ctx=16, max_windows=1, progress=False)
    only = collect_input_stats(model, ids[:16], ctx=16, max_windows=None, progress=False)
    assert torch.equal(first["c.weight"], only["c.weight"])


def test_errors():
    model = TwoBranch(vocab=20, dim=8, hidden=8)
    with pytest.raises(CalibrationError, match="never ran"):
        collect_input_stats(model, torch.zeros(32, dtype=torch.int64), ctx=16, progress=False)
    with pytest.raises(CalibrationError, match="1-D int64"):
        collect_input_stats(model, torch.zeros(2, 16, dtype=torch.int64), ctx=16, progress=False)
    with pytest.raises(CalibrationError, match="no nn.Linear"):
        collect_input_stats(torch.nn.Embedding(4, 4), torch.zeros(32, dtype=torch.int64), ctx=16, progress=False)
