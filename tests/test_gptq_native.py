"""GPTQ's column loop in C (csrc/cpu/gptq.c, native.gptq_columns) against its Python reference
(quantlite.gptq._round_columns): codes, outlier positions and values, saliency, bit for bit.

The two agree exactly because they do the same float32 operations in the same order: the codes by
the same midpoints, one rounding per rank-1 update (C's fmaf; torch's addcmul_ is fused on CPUs with
FMA kernels, which the probe below checks), and the matmuls between sub-blocks are torch's in both."""
from __future__ import annotations

import pytest
import torch

import quantlite.gptq as gptq
from quantlite.codebook import nf4_codebook, zero_code
from quantlite.kernels import native
from quantlite.kernels.native import NativeKernelError
from test_native_helpers import library_built  # noqa: F401 (a fixture)


def torch_addcmul_is_fused() -> bool:
    """Whether torch's addcmul_ rounds once (an FMA kernel): w - x * x with x = 1 + 2^-12, w = 1 + 2^-11
    is exactly -2^-24, which a separately rounded product loses (x * x rounds to w)."""
    size = 67  # a vector body and a tail
    w = torch.full((size,), 1 + 2**-11)
    w.addcmul_(torch.full((size,), 1 + 2**-12), torch.full((size,), 1 + 2**-12), value=-1.0)
    return bool((w == -(2**-24)).all())


pytestmark = [
    pytest.mark.usefixtures("library_built"),
    pytest.mark.skipif(not torch_addcmul_is_fused(), reason="torch's addcmul_ rounds twice on this CPU (no FMA kernel): "
                       "the C loop's fused update differs from the Python loop at rounding level"),
]


def second_moment(generator, k: int, blocks=None) -> torch.Tensor | gptq.BlockDiagonal:
    """E[x x^T] (k, k) float32 of correlated inputs with uneven column scales, or its BlockDiagonal
    over the (start, end) `blocks`."""
    tokens = 3 * k
    shared = torch.randn(tokens, 6, generator=generator) @ torch.randn(6, k, generator=generator)
    x = (torch.randn(tokens, k, generator=generator) + shared) * (0.5 + torch.rand(k, generator=generator))
    h = (x.T.double() @ x.double() / tokens).float()
    return h if blocks is None else gptq.BlockDiagonal(tuple(h[start:end, start:end].clone() for start, end in blocks))


def pass_inputs(generator, n: int, k: int, blocks=None, outlier_fraction: float = 0.01, block_size: int = 64):
    """What gptq_codes hands its passes, for a random W (N, K) with heavy tails: work (K, N) and
    column_scale (K, N) in processing order, the codebook, the factor's segments, is_outlier (K, N)."""
    w = torch.randn(n, k, generator=generator) * torch.rand(n, k, generator=generator).pow(4).mul(4).add(0.5)
    padded = torch.nn.functional.pad(w, (0, -k % block_size))
    scales = padded.abs().view(n, -1, block_size).amax(dim=2)                          # (N, Kp / B)
    factored = gptq.factor(second_moment(generator, k, blocks))
    order = factored.order
    column_scale = scales.repeat_interleave(block_size, dim=1)[:, :k].T[order].contiguous()
    is_outlier = torch.rand(k, n, generator=generator) < outlier_fraction
    return w.T[order].contiguous(), column_scale, nf4_codebook(), factored.segments, is_outlier


def run_passes(monkeypatch, native_loop: bool, work, column_scale, codebook, segments, is_outlier, quota=None):
    """gptq._gptq_passes on copies, with the C loop or the Python one -> codes, saliency, the
    compensated weights, the outliers."""
    work, is_outlier = work.clone(), is_outlier.clone()
    with monkeypatch.context() as patch:
        if not native_loop:
            patch.setattr(gptq, "_native_round_columns", lambda: None)
        else:
            assert gptq._native_round_columns() is native.gptq_columns
        codes, saliency = gptq._gptq_passes(work, column_scale, codebook, segments, is_outlier, quota)
    return codes, saliency, work, is_outlier


CASES = {  # N, K, diagonal blocks of E[x x^T] (None: the full matrix)
    "one row": (1, 37, None),
    "odd sizes": (7, 131, None),
    "K below a sub-block": (29, 9, None),
    "K over lazy blocks": (65, 300, None),
    "block-diagonal": (33, 300, [(0, 128), (128, 272), (272, 300)]),
    "N of a k_proj": (192, 160, None),
}


@pytest.mark.parametrize("with_quota", [False, True], ids=["no quota", "quota"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_c_pass_is_the_python_pass_bit_for_bit(generator, monkeypatch, case, with_quota):
    n, k, blocks = case
    inputs = pass_inputs(generator, n, k, blocks)
    quota = None
    if with_quota:
        quota = torch.randint(0, min(n, 4) + 1, (k,), generator=generator)
        quota[0] = n  # a whole column: every weight kept, the existing outliers (-1) last
    ours = run_passes(monkeypatch, True, *inputs, quota)
    reference = run_passes(monkeypatch, False, *inputs, quota)
    for name, a, b in zip(("codes", "saliency", "compensated weights", "outliers"), ours, reference):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{name}: {int((a != b).sum())} of {a.numel()} differ"
    assert bool(ours[3][inputs[4]].all())  # the outliers chosen beforehand stay
    if with_quota:
        added = ours[3].sum(dim=1) - inputs[4].sum(dim=1)
        assert torch.equal(added, torch.minimum(quota, n - inputs[4].sum(dim=1)))
        assert int(ours[0][0].ne(zero_code(inputs[2])).sum()) == 0  # the whole column is outliers: zero codes
    assert not bool(ours[1][ours[3]].any())  # no saliency at outliers


@pytest.mark.parametrize("blocks", [None, [(0, 96), (96, 200)]], ids=["full", "block-diagonal"])
def test_gptq_codes_is_the_same_with_either_loop(generator, monkeypatch, blocks):
    """The whole of gptq_codes (saliency pass, its quota, coding pass): codes, outlier rows, columns
    and stored values equal."""
    n, k, block_size = 45, 200, 64
    w = torch.randn(n, k, generator=generator) * torch.rand(n, k, generator=generator).pow(4).mul(4).add(0.5)
    scales = torch.nn.functional.pad(w, (0, -k % block_size)).abs().view(n, -1, block_size).amax(dim=2)
    before = torch.randperm(n * k, generator=generator)[:40]
    args = (w, scales, nf4_codebook(), second_moment(generator, k, blocks), before // k, before % k, block_size, 60)
    ours = gptq.gptq_codes(*args)
    with monkeypatch.context() as patch:
        patch.setattr(gptq, "_native_round_columns", lambda: None)
        reference = gptq.gptq_codes(*args)
    assert ours[1].numel() == 100
    for name, a, b in zip(("codes", "outlier rows", "outlier columns", "outlier values"), ours, reference):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("native_loop", [True, False], ids=["C", "Python"])
def test_equal_rounding_errors_go_to_the_lower_rows(monkeypatch, native_loop):
    """Identical rows tie every rounding error (H = I: no error feedback to tell them apart later): the
    quota takes the lowest rows that are not outliers yet."""
    n, k = 10, 20
    work = torch.linspace(-1, 1, k).repeat(n, 1).T.contiguous()       # (K, N): every row of W the same
    column_scale = torch.full((k, n), 0.7)
    is_outlier = torch.zeros(k, n, dtype=torch.bool)
    is_outlier[:, 1] = True
    quota = torch.full((k,), 3)
    segments = gptq.factor(torch.eye(k)).segments
    _, _, _, outliers = run_passes(monkeypatch, native_loop, work, column_scale, nf4_codebook(), segments, is_outlier, quota)
    assert outliers.nonzero()[:, 1].view(k, 4).tolist() == [[0, 1, 2, 3]] * k


# --------------------------------------------------------------------------- errors
def test_the_binding_names_bad_tensors():
    work, scale = torch.zeros(4, 8), torch.ones(4, 8)
    good = dict(work=work, column_scale=scale, upper=torch.eye(4), codebook=nf4_codebook(),
                is_outlier=torch.zeros(4, 8, dtype=torch.bool), quota=None,
                codes=torch.empty(4, 8, dtype=torch.uint8), errors=torch.empty(4, 8))
    bad = [("column_scale", torch.ones(4, 9), "column_scale must be"), ("is_outlier", torch.zeros(4, 8), "is_outlier must be"),
           ("codes", torch.empty(4, 8, dtype=torch.int64), "codes must be"), ("upper", torch.eye(5), "upper must be"),
           ("quota", torch.zeros(4, dtype=torch.int32), "quota must be"), ("errors", torch.empty(8, 4).T, "errors must be")]
    for name, tensor, message in bad:
        with pytest.raises(NativeKernelError, match=f"gptq_columns: {message}.*S = 4 columns of N = 8|gptq_columns: {message}"):
            native.gptq_columns(**{**good, name: tensor})
    with pytest.raises(NativeKernelError, match=r"gptq_columns \(S=4, N=8\): a size"):
        native.gptq_columns(**{**good, "quota": torch.tensor([0, 9, 0, 0])})  # more than N = 8 in a column


def test_the_c_entry_point_returns_a_status_for_bad_arguments():
    library = native._cpu_library()
    s, n = 3, 5
    tensors = [torch.zeros(s, n), torch.ones(s, n), torch.eye(s), nf4_codebook(), torch.zeros(s, n, dtype=torch.uint8),
               torch.zeros(s, dtype=torch.int64), torch.empty(s, n, dtype=torch.uint8), torch.empty(s, n)]
    work, scale, upper, codebook, outliers, quota, codes, errors = (t.data_ptr() for t in tensors)

    def call(**change):
        args = dict(work=work, scale=scale, upper=upper, row_stride=s, column_stride=1, codebook=codebook,
                    outliers=outliers, quota=quota, columns=s, n=n, codes=codes, errors=errors)
        args.update(change)
        return library.ql_cpu_gptq_columns(*args.values())

    assert call() == 0 and call(quota=None) == 0
    assert call(work=None) == call(codes=None) == call(upper=None) == 1                 # QL_ERR_NULL_POINTER
    assert call(columns=0) == call(n=-1) == 2                                           # QL_ERR_BAD_SIZE
    tensors[5][1] = n + 1
    assert call() == 2                                                                  # a quota over N
    tensors[5][1] = -1
    assert call() == 2
    assert call(row_stride=0) == call(column_stride=-1) == 4                            # QL_ERR_BAD_STRIDE
    assert b"size" in library.ql_error_string(2)
