"""The Triton kernel (both specialisations, split-K, CSR outliers) against a float64 reference.

On a CPU machine this runs under TRITON_INTERPRET=1 (`make test` sets it); on a GPU machine
(benchmarks/gpu_kernels.py runs this file there) the same cases run compiled on the device.

Tolerance, per output element, a worst-case bound rather than a guess:
    |y - y64| <= (u + (K + 2) * u32) * sum_k |x_k| |w_nk|  +  u * |y64|
u is the unit roundoff of x's dtype (2^-11 fp16, 2^-8 bf16, 2^-24 fp32). The tl.dot path rounds each
dequantized weight to x's dtype (u per product); the dequantized weight itself is a float32 product
(one u32), the fp32 accumulation adds at most K units of u32 per term, and the output is rounded to
x's dtype once (u * |y|). A wrong nibble, scale, or a missing outlier is off by a whole term.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from quantlite.errors import QuantliteError
from quantlite.kernels.dispatch import available_backends
from quantlite.kernels.prepared import prepare
from quantlite.quantizer import quantize

UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

pytestmark = pytest.mark.skipif(
    available_backends()["triton"] is not None, reason=f"triton back-end: {available_backends()['triton']}"
)


def kernel_device() -> str:
    from quantlite.kernels.triton_qmatmul import INTERPRETED

    return "cpu" if INTERPRETED else "cuda"


def assert_close_to_float64(y: torch.Tensor, x: torch.Tensor, qw) -> None:
    w64 = qw.dequantize(torch.float64).to(x.device)           # (N, K) float64
    x64 = x.double()
    y64 = x64 @ w64.T                                          # (M, N) float64
    magnitude = x64.abs() @ w64.abs().T                        # (M, N) sum_k |x_k| |w_nk|
    u, u32 = UNIT_ROUNDOFF[x.dtype], UNIT_ROUNDOFF[torch.float32]
    bound = (u + (x.shape[1] + 2) * u32) * magnitude + u * y64.abs()
    error = (y.double() - y64).abs()
    assert y.dtype == x.dtype and y.shape == y64.shape
    assert torch.isfinite(y).all(), "some outputs were never written (the buffer was poisoned with NaN)"
    worst = int((error - bound).argmax())
    row, col = divmod(worst, y.shape[1])
    assert bool((error <= bound).all()), (
        f"y[{row}, {col}] = {y[row, col].item()} vs float64 {y64[row, col].item()}: "
        f"error {error[row, col].item():.3g} > bound {bound[row, col].item():.3g}"
    )


def random_weight(n: int, k: int, generator: torch.Generator, *, block_size: int, method: str,
                  outlier_frac: float, heavy_row: bool = False):
    w = torch.randn(n, k, generator=generator)
    if heavy_row:  # one row takes most of the outliers: a long CSR segment beside empty ones
        w[n // 2] *= 8.0
    return quantize(w, block_size=block_size, method=method, outlier_frac=outlier_frac)


# (M, N, K, block_size, method, outlier_frac, split_k): M from 1 past 64 through both
# specialisations (decode for M <= 4), odd N, K on, just below and just above block multiples,
# a K shorter than one block, and forced K splits (split_k=None: the kernel's own choice).
CASES = [
    (1, 33, 64, 64, "quantlite", 0.02, None),
    (1, 1, 63, 64, "nf4", 0.0, None),
    (1, 65, 513, 64, "rtn", 0.01, 3),
    (2, 17, 65, 64, "quantlite", 0.03, None),
    (3, 45, 96, 32, "nf4", 0.02, 2),
    (4, 61, 255, 128, "quantlite", 0.01, None),
    (5, 31, 128, 64, "quantlite", 0.02, None),
    (7, 9, 33, 32, "rtn", 0.05, None),
    (16, 63, 191, 64, "quantlite", 0.02, 2),
    (17, 18, 256, 256, "nf4", 0.0, None),
    (33, 45, 200, 64, "quantlite", 0.02, None),
    (65, 31, 129, 128, "rtn", 0.01, None),
    (70, 65, 320, 64, "quantlite", 0.01, 4),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("m,n,k,block_size,method,outlier_frac,split_k", CASES)
def test_matches_float64_reference(m, n, k, block_size, method, outlier_frac, split_k, dtype, generator):
    from quantlite.kernels.triton_qmatmul import qmatmul_triton

    device = kernel_device()
    qw = random_weight(n, k, generator, block_size=block_size, method=method, outlier_frac=outlier_frac)
    x = torch.randn(m, k, generator=generator).to(device, dtype)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    y = qmatmul_triton(x, prepare(qw, device, widened=True), out=out, split_k=split_k)
    assert y is out
    assert_close_to_float64(y, x, qw)


@pytest.mark.parametrize("m,split_k", [(1, None), (1, 3), (3, 2), (40, None), (40, 3)])
def test_long_and_empty_outlier_rows(m, split_k, generator):
    """One row holds most outliers (a CSR segment longer than a chunk of entries), others none; the
    K splits share a tile's entries, so the shares cut through rows."""
    from quantlite.kernels.triton_qmatmul import qmatmul_triton

    device = kernel_device()
    qw = random_weight(37, 160, generator, block_size=32, method="quantlite", outlier_frac=0.02, heavy_row=True)
    lengths = torch.diff(qw.outlier_row_ptr.long())
    assert int(lengths.max()) > 64 and int((lengths == 0).sum()) > 0, "the weight does not have the intended CSR shape"
    x = torch.randn(m, 160, generator=generator).to(device)
    y = qmatmul_triton(x, prepare(qw, device, widened=True), out=torch.full((m, 37), float("nan"), device=device), split_k=split_k)
    assert_close_to_float64(y, x, qw)


def test_split_counters_are_reset_for_the_next_launch(generator):
    """Split-K reduces in the launch through per-tile arrival counters, which the last split resets."""
    from quantlite.kernels.triton_qmatmul import _split_counters, qmatmul_triton

    device = kernel_device()
    qw = random_weight(19, 640, generator, block_size=64, method="quantlite", outlier_frac=0.01)
    for m in (1, 2, 20):
        x = torch.randn(m, 640, generator=generator).to(device)
        y = qmatmul_triton(x, prepare(qw, device, widened=True), out=torch.full((m, 19), float("nan"), device=device), split_k=2)
        assert_close_to_float64(y, x, qw)
    assert int(_split_counters(torch.device(device), 1).abs().sum()) == 0


def test_strided_rows_of_x(generator):
    """x may be a column slice of a wider tensor: only unit column stride is required."""
    from quantlite.kernels.triton_qmatmul import qmatmul_triton

    device = kernel_device()
    qw = random_weight(21, 96, generator, block_size=32, method="quantlite", outlier_frac=0.02)
    wide = torch.randn(6, 130, generator=generator).to(device, torch.float16)
    x = wide[:, 10:106]  # (6, 96), row stride 130
    assert_close_to_float64(qmatmul_triton(x, prepare(qw, device, widened=True)), x, qw)


def test_rejects_bad_shapes(generator):
    from quantlite.kernels.triton_qmatmul import qmatmul_triton

    device = kernel_device()
    prepared = prepare(random_weight(8, 64, generator, block_size=64, method="nf4", outlier_frac=0.0), device, widened=True)
    with pytest.raises(QuantliteError, match="K=65.*N=8, K=64"):
        qmatmul_triton(torch.randn(2, 65, device=device), prepared)
    with pytest.raises(QuantliteError, match="out must be"):
        qmatmul_triton(torch.randn(2, 64, device=device), prepared, out=torch.empty(2, 9, device=device))
    with pytest.raises(QuantliteError, match="unit column stride"):
        qmatmul_triton(torch.randn(64, 2, device=device).T, prepared)
    with pytest.raises(QuantliteError, match="2-D fp16/bf16/fp32"):
        qmatmul_triton(torch.randn(2, 64, device=device, dtype=torch.float64), prepared)
    # 2**31 packed bytes (a stride-0 view: no memory) overflow the kernel's 32-bit offsets
    huge = dataclasses.replace(prepared, codes=torch.empty(1, dtype=torch.uint8, device=device).expand(2**16, 2**15))
    with pytest.raises(QuantliteError, match="32-bit indexing"):
        qmatmul_triton(torch.randn(2, 64, device=device), huge)
