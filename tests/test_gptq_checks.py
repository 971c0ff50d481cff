"""gptq.check_second_moment: its fast paths (a finite sum, an exactly symmetric matrix) decide as the
element-wise rule does: finite, a non-negative diagonal, symmetric to rtol 1e-4 and atol 1e-6 x max(diag)."""

import pytest
import torch

from quantlite import gptq
from quantlite.errors import QuantizationInputError


def reference_accepts(matrix: torch.Tensor) -> bool:
    """The rule, element by element."""
    diagonal = matrix.diagonal()
    return bool(torch.isfinite(matrix).all()) and not bool((diagonal < 0).any()) and torch.allclose(
        matrix, matrix.T, rtol=1e-4, atol=1e-6 * float(diagonal.max()))


def accepts(matrix: torch.Tensor) -> bool:
    try:
        gptq.check_second_moment(matrix)
    except QuantizationInputError:
        return False
    return True


def second_moment(k: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * k, k, generator=generator)
    return x.T @ x / x.shape[0]  # (k, k)


@pytest.mark.parametrize("k", [1, 17, 160])
def test_the_fast_paths_decide_as_the_rule(k, generator):
    exact = second_moment(k, generator)
    assert torch.equal(exact, exact.T) and accepts(exact) and reference_accepts(exact)
    cases = [exact]
    if k > 1:
        for relative in (1e-6, 1e-2):  # rounding-level asymmetry (accepted), then a real one (refused)
            skewed = exact.clone()
            skewed[0, 1] += relative * float(exact.diagonal().max()) + relative * float(exact[0, 1].abs())
            cases.append(skewed)
    for bad in (float("inf"), float("-inf"), float("nan")):
        broken = exact.clone()
        broken[k - 1, 0] = bad
        cases.append(broken)
    negative = exact.clone()
    negative[0, 0] = -1.0
    cases.append(negative)
    decisions = [(accepts(case), reference_accepts(case)) for case in cases]
    assert all(ours == reference for ours, reference in decisions), decisions
    if k > 1:
        assert decisions[1] == (True, True) and decisions[2] == (False, False)


def test_a_sum_that_overflows_is_checked_element_by_element():
    """Finite entries whose sum overflows float32 are still accepted (the element-wise check decides)."""
    matrix = torch.full((8, 8), 3e38)  # every entry finite, symmetric, the sum inf
    assert not torch.isfinite(matrix.sum())
    assert accepts(matrix) and reference_accepts(matrix)
    matrix[3, 4] = float("inf")
    assert not accepts(matrix)
