"""ctypes binding of the CPU decode-step primitives (csrc/cpu/decode_ops.c, C ABI at the end of
csrc/include/quantlite.h): the float32 work between a decode step's matmuls, and whole layers.

    rms_norm(x, weight, eps)    x (..., n) -> (..., n)
    silu_mul(gate_up)           (..., 2n) = [gate | up] -> (..., n) silu(gate) * up
    decode_attention(...)       one new position per sequence: q/k norm, RoPE, KV-cache write, GQA
    DecodeLayers(...)(x, ...)   consecutive 4-bit decoder layers' decode step: the calls above and the
                                layers' qmatmuls in llama.decoder_layer's order, one C call for all

quantlite/runtime/llama.py holds the same math in torch and calls these where `takes` (`takes_layer`)
says yes (CPU float32 tensors outside autograd, the library built). Why: a decode step of SmolLM2
ran ~20 torch ops per layer at 1.5-15 us each, about a third of the step; one C call per op left
~10 Python hops a layer, which ran slowly after each matmul had emptied the caches; one call for
the layers leaves a few (docs/runtime.md, "The split of a decode step"). One hop, as
quantlite.kernels.native: check, allocate, call.
"""
from __future__ import annotations

import ctypes
import functools
import weakref

import torch

from quantlite.kernels import native
from quantlite.qweight import QWeight

_I64, _INT, _PTR, _FLOAT = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
_WEIGHT = ctypes.POINTER(native._Weight)  # ql_weight *, as native._cpu_weight_pointer makes it


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


class _LayerArgs(ctypes.Structure):
    """ql_decode_layer_args (quantlite.h), as raw pointers."""

    _fields_ = [
        ("hidden", _I64), ("intermediate", _I64),
        ("qkv", _WEIGHT), ("o", _WEIGHT), ("gate_up", _WEIGHT), ("down", _WEIGHT),
        ("qkv_bias", _PTR), ("o_bias", _PTR), ("gate_up_bias", _PTR), ("down_bias", _PTR),  # or NULL
        ("input_norm", _PTR), ("post_attention_norm", _PTR),  # (E,)
        ("eps", _FLOAT),
        ("attention", _AttentionArgs),  # its qkv and out unused
        ("x", _PTR), ("out", _PTR),  # (B, E)
        ("matmul_seconds", ctypes.c_double), ("attention_seconds", ctypes.c_double),
        ("int8_activations", ctypes.c_int32),  # 1: the matmuls are ql_cpu_qmatmul_q8act (layers[0]'s counts)
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
    library.ql_cpu_decode_layer.argtypes = [ctypes.POINTER(_LayerArgs), _I64, _INT]
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
    batch, kv_heads, _, head_dim = keys.shape
    if qkv.shape != (batch, 1, (heads + 2 * kv_heads) * head_dim):
        raise native.NativeKernelError(f"native cpu decode_attention: qkv {tuple(qkv.shape)} and keys {tuple(keys.shape)} "
                                       f"do not agree with {heads} query heads")
    _check_float32_cpu("decode_attention", qkv=qkv)
    args, _norms = _attention_cache_args("decode_attention", keys, values, heads, scale, q_norm, k_norm, eps)
    _step = _set_attention_step(args, "decode_attention", cos, sin, mask, position)  # _norms, _step: alive over the call
    qkv = qkv.contiguous()
    out = torch.empty(batch, 1, heads * head_dim)
    args.qkv, args.out = qkv.data_ptr(), out.data_ptr()
    status = _library().ql_cpu_decode_attention(ctypes.byref(args), _attention_threads())
    if status:
        raise _failed(status, f"decode_attention (batch {batch}, {heads}/{kv_heads} heads of {head_dim}, position {position})")
    return out


def _attention_cache_args(what: str, keys, values, heads, scale, q_norm, k_norm, eps) -> tuple[_AttentionArgs, tuple]:
    """decode_attention's arguments that stay from step to step (the cache, the heads, q/k norm),
    checked, as the C struct; and the tensors it points into besides the cache (contiguous copies
    where needed: the caller keeps them alive over its calls)."""
    batch, kv_heads, capacity, head_dim = keys.shape
    if (values.shape != keys.shape or heads <= 0 or heads % kv_heads
            or (q_norm is not None and q_norm.shape != (head_dim,)) or (k_norm is not None and k_norm.shape != (head_dim,))):
        raise native.NativeKernelError(
            f"native cpu {what}: keys {tuple(keys.shape)}, values {tuple(values.shape)}, q/k norm weights "
            f"{None if q_norm is None else tuple(q_norm.shape)} do not agree with {heads} query heads")
    _check_float32_cpu(what, keys=keys, values=values, q_norm=q_norm, k_norm=k_norm)
    if not (keys.is_contiguous() and values.is_contiguous()):
        raise native.NativeKernelError(f"native cpu {what}: the key and value caches must be contiguous")
    q_norm, k_norm = [None if t is None else t.contiguous() for t in (q_norm, k_norm)]
    args = _AttentionArgs(batch, heads, kv_heads, head_dim, 0, capacity, None, None, None, _pointer(q_norm),
                          _pointer(k_norm), eps, scale, None, 0, keys.data_ptr(), values.data_ptr(), None)
    return args, (q_norm, k_norm)


def _set_attention_step(args: _AttentionArgs, what: str, cos, sin, mask, position) -> tuple:
    """Sets a step's position, RoPE rows and mask (shapes as decode_attention's) in args, checked;
    returns the tensors args now points into (the caller keeps them alive over the call)."""
    batch, head_dim = args.batch, args.head_dim
    if (cos.shape != (batch, 1, 1, head_dim) or sin.shape != cos.shape
            or (mask is not None and mask.shape != (batch, 1, 1, position + 1))):
        raise native.NativeKernelError(
            f"native cpu {what}: cos {tuple(cos.shape)}, sin {tuple(sin.shape)}, mask {None if mask is None else tuple(mask.shape)} "
            f"do not agree with {batch} sequences of {args.heads} heads of {head_dim} at position {position}")
    _check_float32_cpu(what, cos=cos, sin=sin, mask=mask)
    if not 0 <= position < args.capacity:
        raise native.NativeKernelError(f"native cpu {what}: position {position} outside the cache's {args.capacity}")
    cos, sin = cos.contiguous(), sin.contiguous()
    mask = None if mask is None else mask.contiguous()
    args.position, args.cos, args.sin = position, cos.data_ptr(), sin.data_ptr()
    args.mask, args.mask_row_stride = _pointer(mask), position + 1
    return cos, sin, mask


# the projections of a decoder layer that DecodeLayers takes, in ql_decode_layer_args' order
LAYER_PROJECTIONS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
LAYER_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # Qwen3's, else absent


def takes_layer(x: torch.Tensor, w: dict) -> bool:
    """Whether DecodeLayers computes a decode step of the layer with weights `w` (named as llama.py's
    decoder_layer has them): x float32 on the CPU outside autograd, the projections joined by
    llama.fuse_projections and 4-bit (QWeight), and qmatmul's default on the CPU the native kernel,
    ql_cpu_qmatmul, which native.qmatmul_cpu runs for every number of rows since issue 12's prefill
    GEMM (so the per-op calls run the same kernels)."""
    if not takes(x) or _default_cpu_backend() != "cpu":
        return False
    floats = [w.get(name) for name in LAYER_NORMS + HEAD_NORMS] + [w.get(f"{name}.bias") for name in LAYER_PROJECTIONS]
    return (all(type(w.get(f"{name}.weight")) is QWeight for name in LAYER_PROJECTIONS)
            and takes(*(t for t in floats if t is not None)))  # float32 CPU norms and biases, as the per-op path's


_ABSENT = object()  # what DecodeLayers.serves compares a weight the layer does not have with


def _absent() -> object:
    """DecodeLayers' stand-in for the weak reference of a weight the layer does not have (a dead weak
    reference gives None, which is never _ABSENT)."""
    return _ABSENT


@functools.cache
def _default_cpu_backend() -> str:
    from quantlite.kernels.dispatch import default_backend

    return default_backend("cpu")


class DecodeLayers:
    """A decode step of consecutive pre-norm decoder layers in one native call (ql_cpu_decode_layer),
    as llama.decoder_layer computes each from the same native ops (the same result, bit for bit).

    Made once per layers and KV cache: each layer's weights (w as decoder_layer has them:
    LAYER_PROJECTIONS as QWeights, their optional biases, LAYER_NORMS, HEAD_NORMS where the model has
    them), its cache and the attention's constants are checked and packed into the C structs here;
    a step then sets only x, the position, RoPE and the mask. Why: packing a layer's struct cost ~40
    us of Python, and the Python between one layer's call and the next ~90 us on the loaded machine
    (it runs after the matmuls have emptied the CPU's caches), against ~30 us of C glue and attention.
    It holds weak references to the weights (a streamed layer's arena is not kept alive by it):
    `serves(layers, caches)` says whether these are still what it points to."""

    def __init__(self, layers: list[dict], eps: float, caches: list[tuple[torch.Tensor, torch.Tensor]], heads: int,
                 scale: float):
        packed = [_pack_layer(w, eps, keys, values, heads, scale) for w, (keys, values) in zip(layers, caches, strict=True)]
        self._array = (_LayerArgs * len(packed))(*(args for args, _ in packed))
        self._copies = [copies for _, copies in packed]  # contiguous copies the structs point into (rarely any)
        self._sources = [_sources(w) for w in layers]
        self._caches = [(weakref.ref(keys), weakref.ref(values)) for keys, values in caches]
        self.batch, self.hidden = caches[0][0].shape[0], self._array[0].hidden

    def serves(self, layers: list[dict], caches: list[tuple[torch.Tensor, torch.Tensor]]) -> bool:
        """Whether this was made for these weights and caches (the same objects, alive)."""
        if len(layers) != len(self._sources):
            return False
        for w, (keys, values), sources, (packed_keys, packed_values) in zip(layers, caches, self._sources, self._caches):
            if packed_keys() is not keys or packed_values() is not values:
                return False
            for name, source in sources:
                if w.get(name, _ABSENT) is not source():
                    return False
        return True

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                 position: int) -> tuple[torch.Tensor, float, float]:
        """x (B, 1, E) float32 at cache index `position`; cos, sin, mask as decode_attention's ->
        (the last layer's output (B, 1, E), seconds inside the matmuls, seconds inside the attention)."""
        if x.shape != (self.batch, 1, self.hidden):
            raise native.NativeKernelError(f"native cpu decode_layer: x is {tuple(x.shape)}, expected "
                                           f"({self.batch}, 1, {self.hidden})")
        _check_float32_cpu("decode_layer", x=x)
        first = self._array[0]
        _step = _set_attention_step(first.attention, "decode_layer", cos, sin, mask, position)  # alive over the call
        x = x.contiguous()
        out = torch.empty(self.batch, 1, self.hidden)
        first.x, first.out = x.data_ptr(), out.data_ptr()
        first.int8_activations = native.int8_activations_on()  # as the per-op path's qmatmul would run
        for args in self._array:
            args.matmul_seconds = args.attention_seconds = 0.0
        status = _library().ql_cpu_decode_layer(self._array, len(self._array), native._threads(None))
        if status:
            raise _failed(status, f"decode_layer ({len(self._array)} layers, x {tuple(x.shape)}, position {position})")
        return (out, sum(args.matmul_seconds for args in self._array), sum(args.attention_seconds for args in self._array))


def _pack_layer(w: dict, eps: float, keys: torch.Tensor, values: torch.Tensor, heads: int,
                scale: float) -> tuple[_LayerArgs, tuple]:
    """One layer's ql_decode_layer_args but the step's fields, checked, and the contiguous copies it
    points into where a weight was not contiguous (the weights themselves are not held: the caller
    checks that they are alive, DecodeLayers.serves)."""
    weights = [w[f"{name}.weight"] for name in LAYER_PROJECTIONS]
    biases = [w.get(f"{name}.bias") for name in LAYER_PROJECTIONS]
    norms = [w[name] for name in LAYER_NORMS]
    hidden = weights[0].shape[1]
    if any(norm.shape != (hidden,) for norm in norms) or any(
            bias is not None and bias.shape != (weight.shape[0],) for bias, weight in zip(biases, weights)):
        raise native.NativeKernelError(
            f"native cpu decode_layer: norm weights {[tuple(n.shape) for n in norms]}, biases "
            f"{[None if b is None else tuple(b.shape) for b in biases]} do not agree with {hidden} features and "
            f"projections {[tuple(p.shape) for p in weights]}")
    _check_float32_cpu("decode_layer", **dict(zip(LAYER_NORMS, norms)),
                       **{f"{name}.bias": bias for name, bias in zip(LAYER_PROJECTIONS, biases)})
    head_norms = [w.get(name) for name in HEAD_NORMS]
    attention, head_norms_used = _attention_cache_args("decode_layer", keys, values, heads, scale, *head_norms, eps)
    norms_used = [t.contiguous() for t in norms]
    biases_used = [None if b is None else b.contiguous() for b in biases]
    args = _LayerArgs(hidden, weights[2].shape[0] // 2, *(native._cpu_weight_pointer(p) for p in weights),
                      *(_pointer(b) for b in biases_used), norms_used[0].data_ptr(), norms_used[1].data_ptr(), eps,
                      attention)
    pairs = zip([*head_norms_used, *norms_used, *biases_used], [*head_norms, *norms, *biases])
    return args, [used for used, given in pairs if used is not given]


def _sources(w: dict) -> list[tuple[str, object]]:
    """(name, a weak reference or _absent) of every weight of w that a packed layer points into."""
    names = [f"{name}.{part}" for name in LAYER_PROJECTIONS for part in ("weight", "bias")] + list(LAYER_NORMS + HEAD_NORMS)
    return [(name, _absent if w.get(name) is None else weakref.ref(w[name])) for name in names]
