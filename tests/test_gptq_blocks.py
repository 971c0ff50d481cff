"""GPTQ with a block-diagonal E[x x^T] (quantlite.gptq.BlockDiagonal, HESSIAN_BLOCK): above the
threshold the statistic is collected and used on its diagonal blocks only, so memory is O(K x block)."""
import pytest
import torch

import quantlite.gptq as gptq
from quantlite.calibration import collect_input_stats, with_identity_prior
from quantlite.errors import QuantizationInputError
from quantlite.quantizer import quantize


def second_moment(generator, k: int, tokens: int = 4000) -> torch.Tensor:
    """(k, k) float32 E[x x^T] of correlated inputs with uneven column scales, like a Linear's input."""
    shared = torch.randn(tokens, 8, generator=generator) @ torch.randn(8, k, generator=generator)  # correlated part
    x = (torch.randn(tokens, k, generator=generator) + shared) * (0.5 + torch.rand(k, generator=generator))
    return (x.T.double() @ x.double() / tokens).float()


def output_error(w: torch.Tensor, q, h: torch.Tensor) -> float:
    """tr(dW H dW^T) in float64: the layer output's squared error that GPTQ minimises."""
    d = q.dequantize(torch.float64) - w.double()
    return float(torch.einsum("nk,kl,nl->", d, h.double(), d))


def blocks_of(h: torch.Tensor, bounds) -> gptq.BlockDiagonal:
    return gptq.BlockDiagonal(tuple(h[start:end, start:end].clone() for start, end in bounds))


def test_one_block_is_the_full_matrix_bit_for_bit(generator):
    w = 0.02 * torch.randn(80, 192, generator=generator)
    h = second_moment(generator, 192)
    full, single = quantize(w, importance=h), quantize(w, importance=gptq.BlockDiagonal((h,)))
    for field in ("codes", "outlier_row_ptr", "outlier_cols", "outlier_vals"):
        assert torch.equal(getattr(full, field), getattr(single, field)), field
    assert torch.equal(full.dequantize(), single.dequantize())


def test_per_block_gptq_is_full_gptq_on_the_block_diagonal_matrix(generator, monkeypatch):
    """With H block-diagonal the inverse's Cholesky factor is too, so full GPTQ (global act-order,
    errors through the whole factor) and one pass per block (act-order inside it) are the same
    algorithm: equal codes up to float rounding (ties), equal output error; the outliers' budget is
    the same, chosen by saliency across the blocks."""
    w = 0.02 * torch.randn(96, 320, generator=generator)
    w.view(-1)[torch.randint(w.numel(), (40,), generator=generator)] = 0.3  # a few large weights
    blocks = blocks_of(second_moment(generator, 320), [(0, 128), (128, 256), (256, 320)])
    dense = blocks.to_dense()
    full, per_block = quantize(w, importance=dense), quantize(w, importance=blocks)
    assert per_block.n_outliers == full.n_outliers > 0
    assert (per_block.codes == full.codes).float().mean() > 0.995
    assert output_error(w, per_block, dense) == pytest.approx(output_error(w, full, dense), rel=1e-3)
    # and GPTQ did use the blocks: round to nearest is much worse on them
    assert output_error(w, quantize(w, importance=dense.diagonal()), dense) > 1.5 * output_error(w, per_block, dense)


def test_block_diagonal_statistics_are_the_full_statistics_blocks(generator, monkeypatch):
    monkeypatch.setattr(gptq, "HESSIAN_BLOCK", 48)
    assert gptq.hessian_blocks(100) == [(0, 48), (48, 96), (96, 100)] and gptq.hessian_blocks(48) == [(0, 48)]
    model = torch.nn.Sequential(torch.nn.Embedding(50, 100), torch.nn.Linear(100, 30), torch.nn.ReLU(), torch.nn.Linear(30, 7))
    ids = torch.randint(50, (3 * 16,), generator=generator)
    stats = collect_input_stats(model, ids, ctx=16, max_windows=3, full=True, progress=False)
    blocked, small = stats["1.weight"], stats["3.weight"]
    assert isinstance(blocked, gptq.BlockDiagonal) and blocked.shape == (100, 100) and small.shape == (30, 30)
    with torch.no_grad():
        x = model[0](ids).double()                                              # (48, 100) float64 reference
    reference = x.T @ x / x.shape[0]
    for (start, end), block in zip(gptq.hessian_blocks(100), blocked.blocks):
        torch.testing.assert_close(block.double(), reference[start:end, start:end], rtol=1e-5, atol=1e-6 * float(reference.abs().max()))
    # the identity prior is the whole matrix's: its mean diagonal over all K columns, on every block
    mean_diagonal = float(reference.diagonal().mean())
    for block, with_prior in zip(blocked.blocks, with_identity_prior(blocked, 0.5).blocks):
        torch.testing.assert_close(with_prior, block + 0.5 * mean_diagonal * torch.eye(block.shape[0]), rtol=1e-5, atol=0)


def test_a_block_diagonal_statistic_of_the_wrong_size_is_refused(generator):
    w = 0.02 * torch.randn(8, 64, generator=generator)
    h = second_moment(generator, 48)
    with pytest.raises(QuantizationInputError, match="cover 48 input columns, the tensor has 64"):
        quantize(w, importance=blocks_of(h, [(0, 32), (32, 48)]))
    bad = blocks_of(second_moment(generator, 64), [(0, 32), (32, 64)])
    bad.blocks[1][0, 1] = float("nan")
    with pytest.raises(QuantizationInputError, match="finite"):
        quantize(w, importance=bad)


@pytest.mark.parametrize("bounds", [None, [(0, 64), (64, 160)]])
def test_a_statistic_factored_once_quantizes_every_weight_that_shares_it_as_the_statistic_does(generator, bounds):
    """convert factors each shared statistic (q/k/v, gate/up) once with gptq.factor and hands the
    Factored to quantize for each weight: the same codes, outliers and values as the statistic itself
    (factored inside gptq_codes), for a full matrix and a block-diagonal one; and GPTQ's column loop,
    which runs on one torch thread, leaves the caller's thread count as it found it."""
    h = second_moment(generator, 160)
    statistic = h if bounds is None else blocks_of(h, bounds)
    shared = gptq.factor(statistic)
    assert shared.hessian is statistic and shared.order.shape == (160,)
    threads = torch.get_num_threads()
    for rows in (48, 16, 16):  # q, k, v of a small attention
        w = 0.02 * torch.randn(rows, 160, generator=generator)
        w.view(-1)[torch.randint(w.numel(), (8,), generator=generator)] = 0.4  # outliers, chosen both ways
        direct, factored = (quantize(w, importance=given, outlier_frac=0.01) for given in (statistic, shared))
        assert direct.n_outliers > 0
        for field in ("codes", "outlier_row_ptr", "outlier_cols", "outlier_vals"):
            assert torch.equal(getattr(direct, field), getattr(factored, field)), field
        assert torch.equal(direct.dequantize(), factored.dequantize())
        assert torch.get_num_threads() == threads
