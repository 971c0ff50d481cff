"""qmatmul(x, qw): y = x @ qw.dequantize().T on the best back-end that can run here.

Back-ends (docs/kernels.md):
    "cuda"    native CUDA library (quantlite.kernels.native), CUDA tensors
    "triton"  Triton kernel (quantlite.kernels.triton_qmatmul): CUDA tensors, or CPU tensors when
              TRITON_INTERPRET=1 was set before the first import (slow: for tests)
    "cpu"     native CPU library (quantlite.kernels.native), CPU tensors
    "torch"   dequantize + F.linear (quantlite.kernels.reference): anywhere, the ground truth
Default choice: a CUDA tensor takes "cuda", else "triton", else "torch"; a CPU tensor takes "cpu",
else "torch" (the Triton interpreter is far slower than the reference on the CPU); any other
device takes "torch". When x requires grad, "torch" (the only back-end with a backward pass).
A Q8Weight (block-scaled int8: the head and embedding) has kernels on "cpu" and "torch" only; on a
CUDA device it takes "torch", and naming "cuda" or "triton" for it is an error (docs/kernels.md).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache

import torch

from quantlite.errors import BackendUnavailable, QuantliteError
from quantlite.kernels.prepared import prepare
from quantlite.kernels.reference import qmatmul_reference
from quantlite.q8weight import Q8Weight
from quantlite.qweight import QWeight

BACKENDS = ("cuda", "triton", "cpu", "torch")
INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NO_GPU_FOR_TRITON = "Triton compiles for a GPU and no CUDA device is visible; set TRITON_INTERPRET=1 to run it on the CPU (slow)"
INT4_ONLY_BACKENDS = ("cuda", "triton")  # no kernel for Q8Weight yet: it falls back to "torch"
DEFAULT_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
# what x is multiplied as: "float32" (the default, exact float32 accumulation) or "int8" (the opt-in
# of the native CPU back-end, ql_cpu_qmatmul_q8act: docs/native.md, "Issue 12, seventh round")
ACTIVATIONS = ("float32", "int8")


class KernelInputError(QuantliteError, ValueError):
    """qmatmul was given an input it cannot multiply (dtype, shape, device); the message names the sizes."""


def qmatmul(x: torch.Tensor, qw: QWeight | Q8Weight, backend: str | None = None, activations: str | None = None) -> torch.Tensor:
    """x (..., K) fp16/bf16/fp32 -> (..., N) in x's dtype, = x @ qw.dequantize().T.

    backend: None (choose by x's device and what is live, see the module docstring), or one of
    "cuda", "triton", "cpu", "torch"; a named back-end that cannot run raises BackendUnavailable
    with the reason. Only "torch" has a backward pass: when x requires grad (outside no_grad) it is
    the choice, and naming another is an error. The fused back-ends move the weight to x's device
    once and cache it (kernels.prepared); the reference dequantizes it on every call.

    activations: None or "float32" (exact, every back-end), or "int8": the opt-in of the native CPU
    back-end for a 4-bit weight (x quantized per block of 32 to int8, llama.cpp's Q8_0; faster at
    M = 1, at a perplexity cost docs/accuracy.md measures). None also follows
    quantlite.kernels.native.activations("int8") on the CPU back-end."""
    if backend is None and _native_cpu is not None and type(qw) is QWeight and type(x) is torch.Tensor and x.is_cpu \
            and x.dim() and x.shape[-1] == qw.shape[1] and x.dtype in INPUT_DTYPES \
            and not (x.requires_grad and torch.is_grad_enabled()):
        return _native_cpu.qmatmul_cpu(x, qw, activations=activations)  # the decode path's case (~120 calls a token)
    _check_inputs(x, qw)
    if activations is not None and activations not in ACTIVATIONS:
        raise KernelInputError(f"activations {activations!r} is not one of None, {', '.join(map(repr, ACTIVATIONS))}")
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    name = _default_choice(x.device.type) if backend is None and not needs_grad else \
        _choose_backend(x.device, backend, needs_grad)
    if isinstance(qw, Q8Weight) and name in INT4_ONLY_BACKENDS:
        if backend is not None:
            raise BackendUnavailable(f"back-end {backend!r} has no int8 kernel (the weight is a Q8Weight); use 'cpu' or 'torch'")
        name = "torch"
    if name in ("cpu", "cuda"):  # the native kernels take (..., K) as is (~120 calls a decode token)
        from quantlite.kernels import native

        if name == "cpu" and backend is None:
            _remember_native_cpu(native)
        if activations == "int8" and (name != "cpu" or isinstance(qw, Q8Weight)):
            raise BackendUnavailable(_INT8_ACTIVATIONS_ONLY)
        if isinstance(qw, Q8Weight):  # name == "cpu"
            return native.qmatmul_int8_cpu(x, qw)
        return native.qmatmul_cpu(x, qw, activations=activations) if name == "cpu" else native.qmatmul_cuda(x, qw)
    if activations == "int8":
        raise BackendUnavailable(_INT8_ACTIVATIONS_ONLY)
    n, k = qw.shape
    rows = x.reshape(-1, k)  # (M, K), a view when x is contiguous
    if rows.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], n)
    if name == "torch":
        y = qmatmul_reference(rows, qw)
    else:
        from quantlite.kernels.triton_qmatmul import qmatmul_triton

        y = qmatmul_triton(rows.contiguous(), prepare(qw, x.device, widened=True))
    return y.reshape(*x.shape[:-1], n)


_INT8_ACTIVATIONS_ONLY = "activations='int8' runs on the native CPU back-end ('cpu') with a 4-bit QWeight only"

# quantlite.kernels.native once a default call has chosen the CPU library (then every later one does:
# the choice is cached), so that qmatmul's first lines can hand a plain CPU call straight to it.
_native_cpu = None


def _remember_native_cpu(native) -> None:
    global _native_cpu
    _native_cpu = native


def default_backend(device: torch.device | str) -> str:
    """The back-end qmatmul(x, qw) uses when x lives on `device` and no back-end is named (and no
    gradient is needed: then it is always "torch")."""
    return _choose_backend(torch.device(device), None)


def fused_kernel_live(device: torch.device | str) -> bool:
    """Whether qmatmul runs a fused kernel for x on `device` by default: those take the prepared layout
    (kernels.prepared), the torch reference does not, so preparing for it would only cost memory."""
    return default_backend(device) != "torch"


def available_backends() -> dict[str, str | None]:
    """{back-end: None when it can run here, else the reason it cannot}, in BACKENDS order."""
    return dict(_backend_status())


@lru_cache(maxsize=1)
def _backend_status() -> tuple[tuple[str, str | None], ...]:
    # Cached: qmatmul consults it on every call, and what is installed does not change in a process.
    return (("cuda", _cuda_status()), ("triton", _triton_status()), ("cpu", _cpu_status()), ("torch", None))


def _native_module():
    """quantlite.kernels.native, or the reason it cannot be imported."""
    try:
        from quantlite.kernels import native
    except ImportError as error:
        return None, f"quantlite.kernels.native cannot be imported ({error})"
    return native, None


def _cuda_status() -> str | None:
    if not torch.cuda.is_available():
        return f"no CUDA device visible to torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'})"
    native, reason = _native_module()
    return reason or native.cuda_status()


def _cpu_status() -> str | None:
    native, reason = _native_module()
    return reason or native.cpu_status()


def _triton_status() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" and "triton" not in sys.modules:
        # without a GPU or the interpreter the kernel cannot run, and importing triton to learn so
        # would cost every CPU process 100 MB of RSS
        return NO_GPU_FOR_TRITON
    try:
        from quantlite.kernels import triton_qmatmul
    except (ImportError, RuntimeError) as error:  # a triton built for another torch/CUDA fails either way
        return f"the Triton kernel cannot be imported ({error})"
    if triton_qmatmul.INTERPRETED or torch.cuda.is_available():
        return None
    return NO_GPU_FOR_TRITON


@lru_cache(maxsize=None)
def _default_choice(device_type: str) -> str:
    """The first live back-end of DEFAULT_ORDER for a device type (cached: asked on every call)."""
    return _choose_backend(torch.device(device_type), None)


def _choose_backend(device: torch.device, backend: str | None, needs_grad: bool = False) -> str:
    status = dict(_backend_status())
    if backend is not None and backend not in status:
        raise BackendUnavailable(f"unknown back-end {backend!r}; choose one of {', '.join(BACKENDS)}")
    if needs_grad and backend not in (None, "torch"):
        raise BackendUnavailable(f"back-end {backend!r} has no backward pass and x requires grad; "
                                 "use backend='torch' (or None), or run under torch.no_grad()")
    if needs_grad:
        return "torch"  # the reference is differentiable with respect to x (the weight is frozen)
    if backend is None:
        order = DEFAULT_ORDER.get(device.type, ("torch",))
        return next(name for name in order if status[name] is None)
    if status[backend] is not None:
        raise BackendUnavailable(f"back-end {backend!r} is not available: {status[backend]}")
    mismatch = _device_mismatch(backend, device)
    if mismatch:
        raise BackendUnavailable(f"back-end {backend!r} cannot take x on {device}: {mismatch}")
    return backend


def _device_mismatch(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on tensors of `device`, or None."""
    if backend == "cuda" and device.type != "cuda":
        return "it runs on CUDA tensors"
    if backend == "cpu" and device.type != "cpu":
        return "it runs on CPU tensors"
    if backend == "triton" and device.type != "cuda":
        from quantlite.kernels import triton_qmatmul

        if not triton_qmatmul.INTERPRETED:
            return "it runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1"
    return None


def _check_inputs(x: torch.Tensor, qw: QWeight) -> None:
    if not isinstance(qw, (QWeight, Q8Weight)):
        raise KernelInputError(f"qmatmul needs a QWeight or Q8Weight, got {type(qw).__name__}")
    if not isinstance(x, torch.Tensor):
        raise KernelInputError(f"qmatmul needs x as a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise KernelInputError(f"qmatmul takes x in float16, bfloat16 or float32, got {x.dtype}")
    n, k = qw.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise KernelInputError(f"x has shape {tuple(x.shape)}: its last dimension must be K={k} of the (N={n}, K={k}) weight")
