"""The CUDA library (csrc/cuda). Its build is checked everywhere nvcc exists; its kernels run where a
CUDA device is (the `gpu` tests; on a machine without one they report why they did not run).

The GEMV kernel computes in the functions of quantlite_decode.h that tests/test_native.py exercises
through the scalar CPU kernel; here the same float64 reference and bound apply, plus, for the
tensor-core path (M > 8 with fp16 / bf16 x), one rounding of each dequantized weight to x's dtype:
2**-11 (fp16) or 2**-8 (bf16) of sum_k |x_k * W_nk|."""
from __future__ import annotations

import shutil

import pytest
import torch

from quantlite.kernels import native
from quantlite.quantizer import quantize

needs_cuda = pytest.mark.skipif(native.cuda_status() is not None, reason=f"CUDA back-end not live: {native.cuda_status()}")
WEIGHT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def test_cuda_library_is_built_where_nvcc_exists():
    if shutil.which("nvcc") is None:
        assert native.cuda_status() is not None  # nothing to build with: reported, not crashed
        return
    assert native.CUDA_LIBRARY.exists(), "nvcc is on PATH but `make native` did not produce the CUDA library"
    reason = native.cuda_status()
    # loads and answers; without a device it says why (e.g. the driver is missing)
    assert reason is None or reason.startswith(f"{native.CUDA_LIBRARY.name} loaded, but") or "torch build has no CUDA" in reason


def assert_close_to_reference(y, x, qw, tensor_core: bool):
    weight = qw.dequantize(torch.float64).to(x.device)
    x64 = x.reshape(-1, qw.shape[1]).double()
    reference = x64 @ weight.T
    magnitude = x64.abs() @ weight.abs().T
    rounding = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[x.dtype]
    bound = (2 * (qw.shape[1] + 2) * 2.0**-24 + (WEIGHT_ROUNDING[x.dtype] if tensor_core else 0.0)) * magnitude
    bound = bound + rounding * reference.abs() + 1e-30
    got = y.reshape(reference.shape).double()
    assert torch.isfinite(got).all()
    assert ((got - reference).abs() <= bound).all(), f"max excess {((got - reference).abs() / bound).max().item():.3g}"


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, block_size", [(37, 127, 64), (130, 96, 48), (257, 1000, 128)])
def test_cuda_qmatmul_matches_reference(generator, dtype, n, k, block_size):
    qw = quantize(torch.randn(n, k, generator=generator), block_size=block_size, outlier_frac=0.02)
    for m in (1, 3, 8, 9, 64, 130):
        x = torch.randn(m, k, generator=generator).to(dtype).cuda()
        y = native.qmatmul_cuda(x, qw)
        torch.cuda.synchronize()
        assert y.shape == (m, n) and y.dtype == dtype
        assert_close_to_reference(y, x, qw, tensor_core=m > 8 and dtype != torch.float32)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_dequantize_matches_qweight(generator, dtype):
    qw = quantize(torch.randn(70, 200, generator=generator), block_size=64, outlier_frac=0.05)
    assert torch.equal(native.dequantize_cuda(qw, dtype).cpu(), qw.dequantize(torch.float32).to(dtype))


@pytest.mark.gpu
@needs_cuda
def test_cuda_rejects_cpu_tensors(generator):
    qw = quantize(torch.randn(8, 64, generator=generator))
    with pytest.raises(native.NativeKernelError, match="expected a CUDA device"):
        native.qmatmul_cuda(torch.randn(1, 64), qw)
