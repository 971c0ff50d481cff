"""ctypes binding of the CPU decode-step primitives (csrc/cpu/decode_ops.c, C ABI at the end of
csrc/include/quantlite.h): the float32 work between a decode step's matmuls.

    rms_norm(x, weight, eps)    x (..., n) -> (..., n)
    silu_mul(gate_up)           (..., 2n) = [gate | up] -> (..., n) silu(gate) * up
    decode_attention(...)       one new position per sequence: q/k norm, RoPE, KV-cache write, GQA

quantlite/runtime/llama.py holds the same math in torch and calls these where `takes` says yes (CPU
float32 tensors outside autograd, the library built). Why: a decode step of SmolLM2 ran ~20 torch ops
per layer at 1.5-15 us each, about a third of the step (docs/runtime.md, "The split of a decode
step"); each of these is one C call. One hop, as quantlite.kernels.native: check, allocate, call.
"""
from __future__ import annotations

import ctypes
import functools

import torch

from quantlite.kernels import native

_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float


class _AttentionArgs(ctypes.Structure):
    """ql_decode_attention_args (quantlite.h), as raw pointers."""

    _fields_ = [
        ("batch", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
        ("position", _I64), ("capacity", _I64),
        ("qkv", _PTR),       # (B, (H + 2 Hkv) * D)
        ("cos", _PTR),       # (B, D)
        ("sin", _PTR),       # (B, D), first half negated
        ("q_norm", _PTR),    # (D,) or NULL
        ("k_norm", _PTR),    # (D,) or NULL
        ("eps", _FLOAT), ("scale", _FLOAT),
        ("mask", _PTR),      # (B, mask_row_stride) additive, or NULL
        ("mask_row_stride", _I64),
        ("keys", _PTR),      # (B, Hkv, L, D)
        ("values", _PTR),    # (B, Hkv, L, D)
        ("out", _PTR),       # (B, H * D)
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The CPU library with these functions declared, or None where it is not built or loadable."""
    if native.cpu_status() is not None:
        return None
    library = native._cpu_library()
    library.ql_cpu_rms_norm.argtypes = [_PTR, _I64, _I64, _I64, _PTR, _FLOAT, _PTR]
    library.ql_cpu_silu_mul.argtypes = [_PTR, _I64, _I64, _I64, _PTR]
    library.ql_cpu_decode_attention.argtypes = [ctypes.POINTER(_AttentionArgs), _INT]
    return library


def takes(*tensors: torch.Tensor) -> bool:
    """Whether the primitives compute on these tensors: all float32 on the CPU, none needing a
    gradient, and the library built (otherwise llama.py runs its torch code)."""
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_cpu or t.requires_grad:
            return False
    return _library() is not None


def _failed(status: int, what: str) -> native.NativeKernelError:
    """The error for a non-zero status (formatted only then: a decode step makes ~120 of these calls)."""
    return native.NativeKernelError(f"native cpu {what}: {_library().ql_error_string(status).decode()}")


def _attention_threads() -> int:
    """Threads for a large batch's attention: the kernels' pool only where torch runs on one thread
    (generate's quantized decode steps, runtime.generate._decode_threads). Where torch keeps several
    (float weights: its sgemm has them, e.g. self-calibration's sampling), its OpenMP workers spin
    between ops on the cores a second pool would need, so the attention stays on this thread."""
    return native._threads(None) if torch.get_num_threads() == 1 else 1


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _check_float32_cpu(what: str, **tensors: torch.Tensor | None) -> None:
    """The C side reads and writes every pointer as float32 in host memory: anything else is refused."""
    for name, t in tensors.items():
        if t is not None and (t.dtype != torch.float32 or not t.is_cpu):
            raise native.NativeKernelError(f"native cpu {what}: {name} is {t.dtype} on {t.device}, expected float32 on the CPU")



def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., n) float32 -> weight * (x / sqrt(mean(x^2) + eps)) over the last size; weight (n,) float32."""
    n = x.shape[-1]
    if weight.shape != (n,):
        raise native.NativeKernelError(f"native cpu rms_norm: x is {tuple(x.shape)}, weight {tuple(weight.shape)}; "
                                       f"the weight must be ({n},)")
    _check_float32_cpu("rms_norm", x=x, weight=weight)
    rows = native.contiguous_rows(x, n) if n else x.reshape(0, 0)
    weight = weight.contiguous()
    out = torch.empty(x.shape)
    status = _library().ql_cpu_rms_norm(rows.data_ptr(), rows.shape[0], n, native.rows_stride(rows), weight.data_ptr(), eps,
                                        out.data_ptr())
    if status:
        raise _failed(status, f"rms_norm (x {tuple(x.shape)})")
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2n) float32, gate then up -> (..., n) silu(gate) * up."""
    if gate_up.dim() == 0 or gate_up.shape[-1] % 2:
        raise native.NativeKernelError(f"native cpu silu_mul: gate_up is {tuple(gate_up.shape)}, its last size must be even")
    _check_float32_cpu("silu_mul", gate_up=gate_up)
    n = gate_up.shape[-1] // 2
    rows = native.contiguous_rows(gate_up, 2 * n) if n else gate_up.reshape(0, 0)
    out = torch.empty(*gate_up.shape[:-1], n)
    status = _library().ql_cpu_silu_mul(rows.data_ptr(), rows.shape[0], n, native.rows_stride(rows), out.data_ptr())
    if status:
        raise _failed(status, f"silu_mul (gate_up {tuple(gate_up.shape)})")
    return out


def decode_attention(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    keys: torch.Tensor,
    values: torch.Tensor,
    position: int,
    heads: int,
    scale: float,
    q_norm: torch.Tensor | None = None,
    k_norm: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor:
    """One new position per sequence, as llama.self_attention computes it between its projections.

    qkv (B, 1, (H + 2 Hkv) * D): the q, k and v heads; cos, sin (B, 1, 1, D) from llama.rope_cos_sin;
    mask (B, 1, 1, T) additive or None, T = position + 1; keys, values (B, Hkv, L, D), the layer's
    cache: rope(k) and v are written at `position`, then each query head attends over [0, position].
    q_norm, k_norm (D,): per-head RMSNorm before RoPE (Qwen3), or None. -> (B, 1, H * D)."""
    batch, kv_heads, capacity, head_dim = keys.shape
    if (qkv.shape != (batch, 1, (heads + 2 * kv_heads) * head_dim) or values.shape != keys.shape
            or cos.shape != (batch, 1, 1, head_dim) or sin.shape != cos.shape
            or (mask is not None and mask.shape != (batch, 1, 1, position + 1))
            or (q_norm is not None and q_norm.shape != (head_dim,)) or (k_norm is not None and k_norm.shape != (head_dim,))):
        raise native.NativeKernelError(
            f"native cpu decode_attention: qkv {tuple(qkv.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, "
            f"mask {None if mask is None else tuple(mask.shape)}, q/k norm weights {None if q_norm is None else tuple(q_norm.shape)}, "
            f"keys {tuple(keys.shape)}, values {tuple(values.shape)} do not agree with {heads} query heads at position {position}")
    _check_float32_cpu("decode_attention", qkv=qkv, cos=cos, sin=sin, mask=mask, keys=keys, values=values,
                       q_norm=q_norm, k_norm=k_norm)
    if not 0 <= position < capacity:
        raise native.NativeKernelError(f"native cpu decode_attention: position {position} outside the cache's {capacity}")
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise native.NativeKernelError("native cpu decode_attention: the key and value caches must be contiguous")
    qkv, cos, sin = qkv.contiguous(), cos.contiguous(), sin.contiguous()
    if mask is not None:
        mask = mask.contiguous()
    if q_norm is not None:
        q_norm = q_norm.contiguous()
    if k_norm is not None:
        k_norm = k_norm.contiguous()
    out = torch.empty(batch, 1, heads * head_dim)
    args = _AttentionArgs(
        batch, heads, kv_heads, head_dim, position, capacity, qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(),
        _pointer(q_norm), _pointer(k_norm), eps, scale, _pointer(mask), position + 1, keys.data_ptr(),
        values.data_ptr(), out.data_ptr())
    status = _library().ql_cpu_decode_attention(ctypes.byref(args), _attention_threads())
    if status:
        raise _failed(status, f"decode_attention (batch {batch}, {heads}/{kv_heads} heads of {head_dim}, position {position})")
    return out
