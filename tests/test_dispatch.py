"""qmatmul's dispatch: every back-end either matches the float64 reference or refuses with its reason,
the default choice follows the documented order, and bad input raises the project's errors."""
from __future__ import annotations

import pytest
import torch

from quantlite.errors import BackendUnavailable, QuantliteError
from quantlite.kernels import dispatch
from quantlite.kernels.dispatch import BACKENDS, KernelInputError, available_backends, qmatmul
from quantlite.quantizer import quantize
from test_triton_qmatmul import DTYPES, assert_close_to_float64


@pytest.fixture
def qweight(generator):
    """(N=37, K=100) with outliers and double-quantized scales: K is not a block multiple."""
    return quantize(torch.randn(37, 100, generator=generator), block_size=64, outlier_frac=0.02)


def test_available_backends_names_every_backend_and_a_reason_for_each_dead_one():
    status = available_backends()
    assert tuple(status) == BACKENDS
    assert status["torch"] is None, "the reference runs everywhere"
    for name, reason in status.items():
        assert reason is None or (isinstance(reason, str) and len(reason) > 10), f"{name}: {reason!r}"
    if not torch.cuda.is_available():
        assert "CUDA" in status["cuda"]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU script runs this file on a GPU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_matches_reference_or_says_why_not(backend, device, qweight, generator):
    x = torch.randn(5, 100, generator=generator).to(device)
    reason = available_backends()[backend] or dispatch._device_mismatch(backend, x.device)
    if reason is not None:
        with pytest.raises(BackendUnavailable, match=backend):
            qmatmul(x, qweight, backend=backend)
        return
    assert_close_to_float64(qmatmul(x, qweight, backend=backend), x, qweight)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_default_backend_keeps_leading_dimensions_and_dtype(dtype, device, qweight, generator):
    x = torch.randn(2, 3, 100, generator=generator).to(device, dtype)  # (batch, seq, K)
    y = qmatmul(x, qweight)
    assert y.shape == (2, 3, 37) and y.dtype == dtype
    assert_close_to_float64(y.reshape(6, 37), x.reshape(6, 100), qweight)
    vector = qmatmul(x[0, 0], qweight)  # (K,) -> (N,)
    assert vector.shape == (37,)
    assert_close_to_float64(vector[None], x[0, 0][None], qweight)


def test_gradient_flows_through_the_reference_and_fused_backends_refuse_it(qweight, generator):
    x = torch.randn(4, 100, generator=generator, requires_grad=True)
    upstream = torch.randn(4, 37, generator=generator)
    (qmatmul(x, qweight) * upstream).sum().backward()  # default choice: "torch" when a gradient is needed
    w64 = qweight.dequantize(torch.float64)
    expected = upstream.double() @ w64  # d/dx of sum(upstream * x @ W.T)
    # float32 backward: at most N + 2 units of 2^-24 of sum_n |upstream_n| |w_nk| (as in test_triton_qmatmul)
    bound = (37 + 2) * 2.0**-24 * (upstream.double().abs() @ w64.abs())
    assert bool(((x.grad.double() - expected).abs() <= bound).all())
    with pytest.raises(BackendUnavailable, match="no backward pass"):
        qmatmul(x, qweight, backend="cpu")
    with torch.no_grad():
        assert qmatmul(x, qweight).shape == (4, 37)


def test_empty_batch(qweight):
    assert qmatmul(torch.empty(0, 4, 100), qweight).shape == (0, 4, 37)


@pytest.mark.parametrize(
    "device, status, expected",
    [
        ("cpu", {"cpu": None}, "cpu"),
        ("cpu", {"cpu": "no library"}, "torch"),
        ("cuda", {"cuda": None, "triton": None}, "cuda"),
        ("cuda", {"cuda": "no library", "triton": None}, "triton"),
        ("cuda", {"cuda": "no library", "triton": "not installed"}, "torch"),
        ("meta", {"cpu": None, "cuda": None, "triton": None}, "torch"),
    ],
)
def test_default_choice_order(device, status, expected, monkeypatch):
    full = {"cuda": "off", "triton": "off", "cpu": "off", "torch": None} | status
    monkeypatch.setattr(dispatch, "_backend_status", lambda: tuple(full.items()))
    assert dispatch.default_backend(device) == expected
    assert dispatch.fused_kernel_live(device) is (expected != "torch")  # the loader prepares layouts only then


def test_named_backend_that_is_dead_raises_with_its_reason(monkeypatch):
    monkeypatch.setattr(dispatch, "_backend_status", lambda: (("cuda", "the library was not built (make native)"),
                                                             ("triton", None), ("cpu", None), ("torch", None)))
    with pytest.raises(BackendUnavailable, match=r"'cuda' is not available: the library was not built \(make native\)"):
        dispatch._choose_backend(torch.device("cuda"), "cuda")
    with pytest.raises(BackendUnavailable, match="'cpu' cannot take x on cuda"):
        dispatch._choose_backend(torch.device("cuda"), "cpu")


def test_bad_inputs_raise_kernel_input_errors(qweight):
    with pytest.raises(KernelInputError, match=r"\(3, 99\).*K=100 of the \(N=37, K=100\)"):
        qmatmul(torch.randn(3, 99), qweight)
    with pytest.raises(KernelInputError, match="float64"):
        qmatmul(torch.randn(3, 100, dtype=torch.float64), qweight)
    with pytest.raises(KernelInputError, match="int64"):
        qmatmul(torch.ones(3, 100, dtype=torch.int64), qweight)
    with pytest.raises(KernelInputError, match="needs a QWeight"):
        qmatmul(torch.randn(3, 100), torch.randn(37, 100))
    with pytest.raises(BackendUnavailable, match="unknown back-end 'cublas'"):
        qmatmul(torch.randn(3, 100), qweight, backend="cublas")
    assert issubclass(KernelInputError, QuantliteError)
