"""The per-tensor codebook fit (lloyd_step, quantize(fit_codebook=True)), the least-squares scale
refinement (quantize(refine_scales=True)) and a given codebook: against float64 references and by
properties that fail when the rule is broken (error no worse than NF4's on the same blocks, a codebook
the format accepts), on fresh random inputs."""
import pytest
import torch

from quantlite.codebook import codebook_problem, lloyd_step, nearest_code, nf4_codebook, zero_code
from quantlite.errors import QuantizationInputError
from quantlite.quantizer import FIT_SAMPLE_BLOCKS, quantize
from quantlite.qweight import QWeight


def sources(generator, n, k) -> dict[str, torch.Tensor]:
    """Weights of the shapes a codebook fit meets: normal, heavy-tailed, uniform, and on a Q4_1 grid
    (16 uniform levels from each block of 32's min to its max, as llama.cpp's Q4_1 stores them)."""
    normal = torch.randn(n, k, generator=generator)
    student = normal / torch.randn(4, n, k, generator=generator).square().mean(0).sqrt()  # 4 d.o.f.
    uniform = torch.rand(n, k, generator=generator) * 2 - 1
    blocks = torch.randn(n, k // 32, 32, generator=generator)
    low, high = blocks.amin(2, keepdim=True), blocks.amax(2, keepdim=True)
    step = (high - low) / 15
    q4_1 = (low + step * ((blocks - low) / step).round()).reshape(n, k)
    return {"normal": normal, "student-t": student, "uniform": uniform, "q4_1": q4_1}


def reference_lloyd(blocks, scales, codebook, column_weight) -> torch.Tensor:
    """lloyd_step written out weight by weight in float64."""
    book = codebook.double().tolist()
    numerator, denominator = [0.0] * 16, [0.0] * 16
    m, nb, b = blocks.shape
    for row in range(m):
        for block in range(nb):
            s = float(scales[row, block])
            for i in range(b):
                w = float(blocks[row, block, i])
                u = w / s if s > 0 else 0.0
                # nearest level; a value on a midpoint goes to the lower level (nearest_code's rule)
                j = min(range(16), key=lambda level: (abs(u - book[level]), level))
                a = 1.0 if column_weight is None else float(column_weight[block * b + i])
                numerator[j] += a * w * s
                denominator[j] += a * s * s
    levels = torch.tensor([numerator[j] / denominator[j] if denominator[j] > 0 else book[j] for j in range(16)], dtype=torch.float64)
    levels[zero_code(codebook)] = 0.0
    return levels / levels.abs().max()


@pytest.mark.parametrize("weighted", [False, True])
def test_lloyd_step_matches_float64_reference(generator, weighted):
    blocks = torch.randn(6, 3, 16, generator=generator) * torch.rand(6, 3, 1, generator=generator)
    scales = blocks.abs().amax(2) * (0.7 + 0.3 * torch.rand(6, 3, generator=generator))
    column_weight = torch.rand(48, generator=generator) + 0.1 if weighted else None
    codes = nearest_code(blocks / scales.unsqueeze(2), nf4_codebook())
    got = lloyd_step(blocks, scales, codes, nf4_codebook(), column_weight)
    want = reference_lloyd(blocks, scales, nf4_codebook(), column_weight)
    # float32 result of float64 sums: a few float32 ulps of levels of magnitude <= 1
    assert (got.double() - want).abs().max().item() <= 4 * torch.finfo(torch.float32).eps
    assert codebook_problem(got) is None


def squared_error(qw: QWeight, w: torch.Tensor) -> float:
    return float((qw.dequantize(torch.float64) - w.double()).square().sum())


@pytest.mark.parametrize("source", ["normal", "student-t", "uniform", "q4_1"])
def test_fitted_codebook_never_loses_to_nf4_on_the_same_blocks(generator, source):
    # at most FIT_SAMPLE_BLOCKS blocks: the fit sees the whole tensor, so its error can only be lower
    n, k = 96, 320
    assert n * k // 64 <= FIT_SAMPLE_BLOCKS
    w = sources(generator, n, k)[source]
    options = {"double_quant": False, "outlier_frac": 0.005}
    fitted, plain = quantize(w, fit_codebook=True, **options), quantize(w, fit_codebook=False, **options)
    assert codebook_problem(fitted.codebook) is None and fitted.codebook.abs().max() == 1.0
    assert torch.equal(fitted.outlier_cols, plain.outlier_cols)  # the same outliers: the same blocks
    assert squared_error(fitted, w) <= squared_error(plain, w)
    QWeight.from_dict(fitted.to_dict("t."), "t.")  # the format's own validation accepts it


def test_fitted_codebook_finds_a_uniform_grid(generator):
    # weights on a uniform grid symmetric around 0 (with 0 on it): the fit should move NF4's levels
    # to the grid and reconstruct every weight nearly exactly, which NF4's levels cannot
    grid = torch.arange(-8, 8, dtype=torch.float32) / 8
    codes = torch.randint(0, 16, (64, 256), generator=generator)
    codes[:, ::64] = 0  # every block holds the level -1, so its absmax is its row's factor
    w = grid[codes] * (0.5 + torch.rand(64, 1, generator=generator))
    options = {"double_quant": False, "outlier_frac": 0.0, "scale_dtype": torch.float32}
    fitted, plain = quantize(w, fit_codebook=True, **options), quantize(w, fit_codebook=False, **options)
    assert squared_error(fitted, w) < 0.1 * squared_error(plain, w)


@pytest.mark.parametrize("source", ["normal", "student-t", "q4_1"])
def test_refined_scales_lower_every_blocks_error(generator, source):
    n, k = 64, 256
    w = sources(generator, n, k)[source]
    options = {"double_quant": False, "outlier_frac": 0.0, "fit_codebook": False}
    refined, searched = quantize(w, refine_scales=True, **options), quantize(w, refine_scales=False, **options)
    per_block = lambda qw: (qw.dequantize(torch.float64) - w.double()).square().view(n, k // 64, 64).sum(2)  # noqa: E731
    assert bool((per_block(refined) <= per_block(searched)).all())
    assert float(per_block(refined).sum()) < float(per_block(searched).sum())


def test_a_given_codebook_is_used_and_checked(generator):
    w = torch.randn(32, 128, generator=generator)
    book = quantize(w, fit_codebook=True, outlier_frac=0.0).codebook
    other = torch.randn(32, 128, generator=generator)
    assert torch.equal(quantize(other, codebook=book).codebook, book)
    for bad, message in [(torch.zeros(16), "ascending"), (torch.linspace(-1, 1, 16), "0.0 exactly once"),
                         (torch.linspace(-1, 1, 15), r"\(16,\)"), (book.double(), "float32")]:
        with pytest.raises(QuantizationInputError, match=message):
            quantize(w, codebook=bad)
