"""The model math of the Llama family as plain functions over tensors, exact against transformers'
LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and Qwen3ForCausalLM (tests/test_llama_exact.py,
tests/test_families.py). What differs between them comes in the ModelConfig (quantlite.model_config):
which projections have a bias, per-head q/k RMSNorm, a sliding attention window.

Nothing here knows where weights live (that is streaming.py): every function takes the tensors it
needs. A decoder layer's weights come as a dict named relative to `model.layers.{i}.`:

    input_layernorm.weight             (hidden,)                      float
    self_attn.{q,k,v,o}_proj.weight    (n_out, n_in) float or QWeight  q: n_heads*head_dim out,
                                                                       k, v: n_kv_heads*head_dim out
    self_attn.{q,k,v,o}_proj.bias      (n_out,) float, those of config.biased
    self_attn.{q,k}_norm.weight        (head_dim,) float, only with config.qk_norm
    post_attention_layernorm.weight    (hidden,)                      float
    mlp.{gate,up,down}_proj.weight     (n_out, n_in) float or QWeight  gate, up: intermediate out
    mlp.{gate,up,down}_proj.bias       (n_out,) float, those of config.biased

`fuse_projections` (the loader calls it once per layer) joins the projections that read the same
input, so a decode step makes 4 matmul calls per layer instead of 7 (every call costs ~10 us of
Python and a thread-pool wake-up, docs/runtime.md):

    self_attn.qkv_proj.{weight,bias}   rows of q, k, v in that order
    mlp.gate_up_proj.{weight,bias}     rows of gate, then up

Activations are (batch, seq, hidden) in the compute dtype; RoPE angles and softmax in float32.
`OP_SECONDS` accumulates the time spent in matmuls and in attention (generate --stats' split).

On the CPU in float32 the glue between the matmuls runs in native primitives (quantlite.kernels.cpu_ops:
rms_norm, silu_mul and, for a decode step, q/k norm + RoPE + cache write + attention in one call),
which compute what the torch code beside each call computes (tests/test_cpu_ops.py holds both to a
float64 reference): one C call instead of ~20 torch ops per layer (docs/runtime.md). A decode step
of 4-bit layers goes further: `decoder_layers` hands every layer to one native call that makes those
same calls and the layers' matmuls in decoder_layer's order (bit for bit the same result).
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantlite.errors import QuantliteError
from quantlite.kernels import cpu_ops
from quantlite.kernels.dispatch import qmatmul  # the fastest live back-end for x's device
from quantlite.model_config import ModelConfig
from quantlite.q8weight import Q8Weight
from quantlite.qweight import QWeight, concat_rows


@dataclass
class OpSeconds:
    """Wall seconds spent in `linear` (the matmuls) and in attention (everything between the q/k/v and
    the output projection: q/k norm, RoPE, cache update, attend), summed
    over every call in this process; a reader takes differences. Two perf_counter calls per op:
    ~0.2 us, against ~10 us for the cheapest matmul call. The native decode layers
    (native_decode_layers) time their matmul and attention calls in C and add them here."""
    matmul: float = 0.0
    attention: float = 0.0


OP_SECONDS = OpSeconds()


# ----------------------------------------------------------------------------------- RoPE
def rope_inv_freq(config: ModelConfig, seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(head_dim // 2,) float32 inverse frequencies, scaled as the config says.
    seq_len (longest position + 1 in this call) matters only for "dynamic" NTK scaling, and there
    only past max_position_embeddings."""
    if config.rope_type == "dynamic":
        seq_len = max(seq_len, config.max_position_embeddings)
    else:
        seq_len = 0
    with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode once cached
        return _rope_inv_freq(config, seq_len, torch.device(device))


@functools.lru_cache(maxsize=16)
def _rope_inv_freq(config: ModelConfig, seq_len: int, device: torch.device) -> torch.Tensor:
    """rope_inv_freq, computed once per model and (dynamic scaling) length: a decode step asked for
    it afresh cost ~30 us of a ~20 ms step, every step. Callers only read the tensor."""
    dim = config.head_dim
    base = config.rope_theta
    if config.rope_type == "dynamic":
        # NTK-aware: past the trained context, raise the base so the lowest frequency still fits.
        grow = config.rope_factor * seq_len / config.max_position_embeddings - (config.rope_factor - 1)
        base = base * grow ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (base**exponents)
    if config.rope_type == "linear":
        inv_freq = inv_freq / config.rope_factor
    elif config.rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, config)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    factor, low, high = config.rope_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    context = config.rope_original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < context / high) * ~(wavelen > context / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(config: ModelConfig, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (batch, seq) int64 -> cos, signed sin (batch, seq, 1, head_dim) in dtype, angles in
    float32. The sin's first half is negated, so that apply_rope needs one roll instead of
    rotate_half's slice-negate-concatenate (x2 * -s equals -x2 * s exactly)."""
    longest = int(positions.max()) + 1 if config.rope_type == "dynamic" else 0  # only dynamic scaling asks
    inv_freq = rope_inv_freq(config, longest, positions.device)
    angles = positions[..., None, None].float() * inv_freq  # (batch, seq, 1, head_dim // 2)
    sin = angles.sin()
    return torch.cat((angles, angles), dim=-1).cos().to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (batch, seq, heads, head_dim); rotates the two halves of each head (the HF/NeoX layout):
    x * cos + (-x2, x1) * sin, with the sign already in rope_cos_sin's sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


# ----------------------------------------------------------------------------------- building blocks
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., hidden): normalised in float32, then scaled, in x's dtype (as transformers does)."""
    if cpu_ops.takes(x, weight):
        return cpu_ops.rms_norm(x, weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor | QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) @ weight(N, K).T (+ bias): a fused dequant-matmul when the weight is quantized."""
    start = time.perf_counter()
    y = qmatmul(x, weight) if isinstance(weight, (QWeight, Q8Weight)) else F.linear(x, weight)
    OP_SECONDS.matmul += time.perf_counter() - start
    return y if bias is None else y + bias


# q/k/v and gate/up read the same input: one matmul over their rows concatenated
FUSED_PROJECTIONS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def fuse_projections(w: dict) -> dict:
    """A layer's weights with each group of FUSED_PROJECTIONS joined by rows (QWeights by
    qweight.concat_rows, float weights by torch.cat), biases likewise (missing ones as zeros).
    A group whose weights are of mixed kinds is left as it is (`projections` takes either form)."""
    fused = dict(w)
    for group, parts in FUSED_PROJECTIONS.items():
        weights = [fused.get(f"{part}.weight") for part in parts]
        if all(isinstance(weight, QWeight) for weight in weights):
            joined = concat_rows(weights)
        elif all(isinstance(weight, torch.Tensor) and weight.dtype == weights[0].dtype for weight in weights):
            joined = torch.cat(weights)
        else:
            continue
        biases = [fused.pop(f"{part}.bias", None) for part in parts]
        for part in parts:
            del fused[f"{part}.weight"]
        fused[f"{group}.weight"] = joined  # (sum of the parts' n_out, n_in)
        if any(bias is not None for bias in biases):
            like = next(bias for bias in biases if bias is not None)
            fused[f"{group}.bias"] = torch.cat([like.new_zeros(weight.shape[0]) if bias is None else bias
                                                for weight, bias in zip(weights, biases)])
    return fused


def projections(x: torch.Tensor, w: dict, group: str) -> torch.Tensor:
    """x (..., K) -> (..., sum of n_out): the outputs of the group's projections side by side, in
    one call when fuse_projections joined them."""
    if f"{group}.weight" in w:
        return linear(x, w[f"{group}.weight"], w.get(f"{group}.bias"))
    return torch.cat([linear(x, w[f"{part}.weight"], w.get(f"{part}.bias")) for part in FUSED_PROJECTIONS[group]], dim=-1)


def embed(input_ids: torch.Tensor, weight: torch.Tensor | QWeight, dtype: torch.dtype) -> torch.Tensor:
    """input_ids (batch, seq) int64 -> (batch, seq, hidden) rows of the embedding in dtype.
    A quantized table dequantizes only the rows asked for."""
    if not isinstance(weight, (QWeight, Q8Weight)):
        return F.embedding(input_ids, weight).to(dtype)
    if input_ids.numel() == 1:  # a decode step of one sequence: no duplicates to share (torch.unique ~20 us)
        return weight.dequantize_rows(input_ids.reshape(1), dtype).reshape(*input_ids.shape, -1)
    rows, inverse = torch.unique(input_ids.reshape(-1), return_inverse=True)
    table = weight.dequantize_rows(rows, dtype)  # (n_unique, hidden)
    return table[inverse].reshape(*input_ids.shape, -1)


# ----------------------------------------------------------------------------------- attention
class KVCache:
    """Keys and values of every layer, preallocated for the whole generation.

    keys[i], values[i]: (batch, n_kv_heads, max_len, head_dim) of model layer first_layer + i (0 here;
    a pipeline stage's cache holds its own layers only); the first `length` positions are filled.
    A layer writes its new positions at [length, length + seq); `advance(seq)` after the last layer.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device: torch.device | str):
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_len = max_len
        self.length = 0
        self.first_layer = 0
        self.native_layers: dict[tuple[int, int], cpu_ops.DecodeLayers] = {}  # native_decode_layers' packed calls,
        # by (first layer, number of layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def end(self, seq: int) -> int:
        """length + seq: where this call's positions end, if the cache has room for them."""
        end = self.length + seq
        if end > self.max_len:
            raise QuantliteError(f"KV cache holds {self.max_len} positions; this step needs {end}")
        return end

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Model layer `layer`'s keys and values, (batch, n_kv_heads, max_len, head_dim) each."""
        return self.keys[layer - self.first_layer], self.values[layer - self.first_layer]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (batch, n_kv_heads, seq, head_dim) -> all keys and values so far, this call's included."""
        end = self.end(k.shape[2])
        keys, values = self.layer(layer)
        keys[:, :, self.length : end] = k
        values[:, :, self.length : end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, seq: int) -> None:
        self.length += seq


def needs_mask(config: ModelConfig, total: int) -> bool:
    """Whether `total` keys (cached and new) are more than the sliding window lets a query see."""
    return config.sliding_window is not None and total > config.sliding_window


def attention_mask(key_valid: torch.Tensor, q_len: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """key_valid (batch, T) bool, False at padding -> (batch, 1, q_len, T) additive mask.
    Query i sits at key index T - q_len + i and sees the valid keys at or before it, and with a sliding
    `window` only the last `window` of those positions (itself included), as transformers' Mistral. A
    query with nothing to see (left padding) gets a uniform row instead of NaN; its output is never used."""
    total = key_valid.shape[1]
    query_index = torch.arange(total - q_len, total, device=key_valid.device)[:, None]
    key_index = torch.arange(total, device=key_valid.device)[None, :]
    causal = key_index <= query_index  # (q_len, T)
    if window is not None:
        causal &= key_index > query_index - window
    allowed = causal[None, None] & key_valid[:, None, None, :]
    return torch.zeros(allowed.shape, dtype=dtype, device=key_valid.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def self_attention(
    x: torch.Tensor,
    w: dict,
    config: ModelConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None,
    cache: KVCache | None,
    layer: int,
) -> torch.Tensor:
    """x (batch, seq, hidden) normalised input -> (batch, seq, hidden). mask None means plain causal
    over this call's positions (no cache, no padding)."""
    batch, seq, _ = x.shape
    heads, kv_heads = config.num_heads, config.num_kv_heads
    qkv = projections(x, w, "self_attn.qkv_proj")  # (batch, seq, (heads + 2 kv_heads) * head_dim)
    start = time.perf_counter()
    head_norms = [w.get("self_attn.q_norm.weight"), w.get("self_attn.k_norm.weight")]  # Qwen3's, else None
    if seq == 1 and cache is not None and cpu_ops.takes(qkv, *(n for n in head_norms if n is not None)):
        # a CPU decode step: what follows, in one C call
        out = cpu_ops.decode_attention(qkv, cos, sin, mask, *cache.layer(layer), cache.end(1) - 1,
                                       heads, config.head_dim**-0.5, *head_norms, config.rms_norm_eps)
    else:
        qkv = qkv.view(batch, seq, heads + 2 * kv_heads, config.head_dim)
        qk = qkv[:, :, : heads + kv_heads]
        if config.qk_norm:  # Qwen3: each q and k head RMS-normalised over head_dim, before RoPE
            qk = torch.cat((rms_norm(qk[:, :, :heads], w["self_attn.q_norm.weight"], config.rms_norm_eps),
                            rms_norm(qk[:, :, heads:], w["self_attn.k_norm.weight"], config.rms_norm_eps)), dim=2)
        qk = apply_rope(qk, cos, sin)  # q and k heads rotated in one pass
        q = qk[:, :, :heads].transpose(1, 2)                       # (batch, heads, seq, head_dim)
        k = qk[:, :, heads:].transpose(1, 2)                       # (batch, kv_heads, seq, head_dim)
        v = qkv[:, :, heads + kv_heads :].transpose(1, 2)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (batch, kv_heads, T, head_dim)
        out = attend(q, k, v, mask, config.head_dim**-0.5)  # (batch, seq, heads * head_dim)
    OP_SECONDS.attention += time.perf_counter() - start
    return linear(out, w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Grouped-query attention: q (batch, heads, seq, head_dim), k, v (batch, kv_heads, T, head_dim),
    mask (batch, 1, seq, T) additive, or None (causal over this call's positions, all of them seen) -> (batch, seq,
    heads * head_dim). SDPA at one query too: with torch on one thread (generate's decode steps) its
    CPU kernel takes 18-44 us for T = 20..200 against 31-56 us for a plain matmul-softmax-matmul
    (docs/runtime.md); its 0.35 ms per call in issue 11 was torch's thread pool waking, not the kernel."""
    batch, heads, seq, head_dim = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and seq > 1, scale=scale,
                                         enable_gqa=heads != k.shape[1])  # (batch, heads, seq, head_dim)
    return out.transpose(1, 2).reshape(batch, seq, heads * head_dim)


def swiglu_mlp(x: torch.Tensor, w: dict) -> torch.Tensor:
    """x (batch, seq, hidden) -> down(silu(gate(x)) * up(x))."""
    return linear(silu_mul(projections(x, w, "mlp.gate_up_proj")), w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (..., 2 * intermediate), gate then up -> (..., intermediate) silu(gate) * up."""
    if cpu_ops.takes(gate_up):
        return cpu_ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def decoder_layer(
    x: torch.Tensor,
    w: dict,
    config: ModelConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None = None,
    cache: KVCache | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """One pre-norm decoder block: x + attn(norm(x)), then + mlp(norm(.)). (decoder_layers runs a CPU
    decode step of 4-bit layers as one native call instead.)"""
    x = x + self_attention(rms_norm(x, w["input_layernorm.weight"], config.rms_norm_eps), w, config, cos, sin, mask, cache, layer)
    return x + swiglu_mlp(rms_norm(x, w["post_attention_layernorm.weight"], config.rms_norm_eps), w)


def decoder_layers(
    x: torch.Tensor,
    layers: list[dict],
    config: ModelConfig,
    cos: torch.Tensor,
    sin: torch.Tensor,
    mask: torch.Tensor | None = None,
    cache: KVCache | None = None,
    first_layer: int = 0,
) -> torch.Tensor:
    """decoder_layer over consecutive model layers first_layer, first_layer + 1, ... (weights `layers`);
    a CPU decode step of 4-bit layers in one native call (native_decode_layers), the same result."""
    out = native_decode_layers(x, layers, config, cos, sin, mask, cache, first_layer)
    if out is not None:
        return out
    for i, w in enumerate(layers):
        x = decoder_layer(x, w, config, cos, sin, mask, cache, first_layer + i)
    return x


def native_decode_layers(x: torch.Tensor, layers: list[dict], config: ModelConfig, cos: torch.Tensor, sin: torch.Tensor,
                         mask: torch.Tensor | None, cache: KVCache | None, first_layer: int) -> torch.Tensor | None:
    """decoder_layers' decode step (x (batch, 1, hidden) float32 on the CPU) in one native call, which
    runs the calls the torch code of decoder_layer makes on the CPU (rms_norm, linear,
    decode_attention, silu_mul, the adds) in its order, layer after layer: one ctypes hop for the
    layers instead of ~10 a layer (docs/runtime.md, "The split of a decode step"). None for anything
    else (not one position with a cache, or layers cpu_ops.takes_layer refuses): the caller then runs
    the torch code. The call's arguments are packed once per layers and cache (cache.native_layers)."""
    if x.shape[1] != 1 or cache is None or not cpu_ops.takes(x):
        return None
    key = (first_layer, len(layers))
    caches = [cache.layer(first_layer + i) for i in range(len(layers))]
    call = cache.native_layers.get(key)
    if call is None or not call.serves(layers, caches):
        if not all(cpu_ops.takes_layer(x, w) for w in layers):
            return None
        call = cache.native_layers[key] = cpu_ops.DecodeLayers(layers, config.rms_norm_eps, caches, config.num_heads,
                                                               config.head_dim**-0.5)
    out, matmul_seconds, attention_seconds = call(x, cos, sin, mask, cache.end(1) - 1)
    OP_SECONDS.matmul += matmul_seconds
    OP_SECONDS.attention += attention_seconds
    return out
