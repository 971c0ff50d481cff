"""gptq.factor's pieces against their plain float64 formulations, bit for bit, on fresh random
statistics: the damped inverse Cholesky factor (the damping added on the diagonal in place) and the
act-order gather of the statistic."""

import pytest
import torch

from quantlite import gptq


def reference_inverse_cholesky(hessian: torch.Tensor, mean_diag: float | None = None) -> torch.Tensor:
    """Upper U with U^T U = (H + damping mean_diag I)^-1 as J L^-1 J (J H J = L L^T), the damping added
    as a matrix, dead columns as gptq's docstring says."""
    k = hessian.shape[0]
    h = hessian.double().clone()
    dead = h.diagonal() <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h.diagonal()[dead] = 1.0
    mean_diag = float(h.diagonal().mean()) if mean_diag is None else mean_diag
    identity = torch.eye(k, dtype=torch.float64)
    for damping in gptq.DAMPING:
        factor, info = torch.linalg.cholesky_ex((h + damping * mean_diag * identity).flip(0, 1))
        if int(info) == 0:
            return torch.linalg.solve_triangular(factor, identity, upper=False).flip(0, 1).float()
    raise AssertionError("not positive definite")


def statistic(k: int, generator: torch.Generator, rank: int | None = None) -> torch.Tensor:
    x = torch.randn(rank or 4 * k, k, generator=generator) * torch.rand(k, generator=generator)
    return x.T @ x / x.shape[0]  # (k, k)


@pytest.mark.parametrize("k", [1, 7, 64, 200])
def test_inverse_cholesky_is_the_plain_formulation(k, generator):
    h = statistic(k, generator)
    assert torch.equal(gptq._inverse_cholesky(h), reference_inverse_cholesky(h))
    assert torch.equal(gptq._inverse_cholesky(h, 2.5), reference_inverse_cholesky(h, 2.5))
    if k > 2:
        h[1, :] = 0.0
        h[:, 1] = 0.0  # a dead column
        assert torch.equal(gptq._inverse_cholesky(h), reference_inverse_cholesky(h))


def test_inverse_cholesky_retries_with_more_damping_as_the_reference(generator):
    """An indefinite matrix the first damping does not mend: the later tries start from H again."""
    h = statistic(32, generator)
    h -= 0.05 * float(h.diagonal().mean()) * torch.eye(32)  # indefinite at 1 % damping, definite at 10 %
    assert not bool(torch.linalg.cholesky_ex(h.double() + 0.01 * float(h.diagonal().double().mean()) * torch.eye(32, dtype=torch.float64))[1] == 0)
    assert torch.equal(gptq._inverse_cholesky(h), reference_inverse_cholesky(h))


def test_factor_orders_the_statistic_as_two_gathers(generator):
    h = statistic(48, generator)
    factored = gptq.factor(h)
    order = factored.order
    assert torch.equal(factored.segments[0][2], reference_inverse_cholesky(h[order][:, order]))


def reference_gptq_codes(w, scales, codebook, factored, outlier_rows, outlier_cols, block_size, salient_outliers):
    """gptq_codes' set-up and unpacking written plainly (every column's scale by repeat_interleave, the
    outlier mask scattered then gathered into processing order, the passes' results concatenated)
    around the same passes."""
    n, k = w.shape
    order = factored.order
    column_scale = scales.repeat_interleave(block_size, dim=1)[:, :k].T[order].contiguous()
    is_outlier = torch.zeros(k, n, dtype=torch.bool)
    is_outlier[outlier_cols, outlier_rows] = True
    is_outlier = is_outlier[order]
    work = w.T.to(torch.float32)[order].contiguous()

    def passes(work, is_outlier, quota=None):
        results = [gptq._gptq_pass(work[start:end], column_scale[start:end], codebook, upper, is_outlier[start:end],
                                   None if quota is None else quota[start:end]) for start, end, upper in factored.segments]
        return torch.cat([c for c, _ in results]), torch.cat([s for _, s in results])

    quota = None
    if salient_outliers > 0:
        saliency = passes(work.clone(), is_outlier.clone())[1]
        chosen = torch.topk(saliency.reshape(-1), min(salient_outliers, saliency.numel()), sorted=False).indices
        quota = torch.bincount(chosen // n, minlength=k)
    codes, _ = passes(work, is_outlier, quota)
    restore = torch.argsort(order)
    codes, work, is_outlier = codes[restore], work[restore], is_outlier[restore]
    zero = int((codebook == 0).nonzero()[0, 0])
    stored = torch.full((n, scales.shape[1] * block_size), zero, dtype=torch.uint8)
    stored[:, :k] = codes.T
    rows, cols = is_outlier.T.nonzero(as_tuple=True)
    return stored, rows, cols, work[cols, rows]


@pytest.mark.parametrize("n, k, block_size, hessian_block", [(24, 100, 32, None), (40, 96, 16, 40), (3, 20, 64, None)])
def test_gptq_codes_is_its_plain_formulation(n, k, block_size, hessian_block, generator, monkeypatch):
    from quantlite.codebook import nf4_codebook

    if hessian_block is not None:
        monkeypatch.setattr(gptq, "HESSIAN_BLOCK", hessian_block)
    w = torch.randn(n, k, generator=generator)
    h = statistic(k, generator)
    hessian = gptq.BlockDiagonal(tuple(h[s:e, s:e].clone() for s, e in gptq.hessian_blocks(k))) if hessian_block else h
    factored = gptq.factor(hessian)
    blocks = -(-k // block_size)
    scales = torch.rand(n, blocks, generator=generator) * 0.5 + 0.1
    picked = torch.randperm(n * k, generator=generator)[: n * k // 50]
    outlier_rows, outlier_cols = picked // k, picked % k
    for salient in (0, n * k // 40):
        ours = gptq.gptq_codes(w, scales, nf4_codebook(), factored, outlier_rows, outlier_cols, block_size, salient)
        expected = reference_gptq_codes(w, scales, nf4_codebook(), factored, outlier_rows, outlier_cols, block_size, salient)
        for a, b in zip(ours, expected):
            assert torch.equal(a, b)
