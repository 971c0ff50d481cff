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
