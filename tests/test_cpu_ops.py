"""The CPU decode-step primitives (csrc/cpu/decode_ops.c via quantlite.kernels.cpu_ops) against a
float64 reference, on fresh random inputs.

Tolerances, and where they come from (u = 2**-24, float32's unit roundoff):
- a sum of n float32 terms in 16 partial sums added pairwise errs by at most (n / 16 + 4) u times the
  sum of the terms' magnitudes; we allow twice each bound;
- rms_norm: the mean of squares as above, then sqrt, the divide and two products: a few u more;
- silu_mul: exp_f32 errs by < 2 ulp (Cephes' polynomial), then 1 + e, the divide and the product;
- attention: a score errs by the dot product's bound (D terms) plus RoPE's (two products, one sum) on
  q and k; a softmax weight p_t by twice the largest score error plus exp and the sum over T, and
  each output element by that times sum_t p_t |v_t|.
The library's AVX-512 / AVX2 / baseline versions (picked by the loader) do the same arithmetic; this
machine's best one runs here.
"""
from __future__ import annotations

import dataclasses
import gc
import weakref

import pytest
import torch

from quantlite.kernels import cpu_ops, native
from quantlite.model_config import ModelConfig
from quantlite.runtime import llama

from test_native_helpers import library_built  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("library_built")
U = 2.0**-24


def assert_within(got: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    got = got.double()
    if not got.numel():
        return
    assert torch.isfinite(got).all() or not torch.isfinite(reference).all(), f"{what}: NaN/Inf where the reference is finite"
    excess = (got - reference).abs() / bound
    worst = int(excess.flatten().argmax())
    assert excess.max() <= 1.0, (f"{what}: element {worst} = {got.flatten()[worst].item()} vs reference "
                                 f"{reference.flatten()[worst].item()} (bound {bound.flatten()[worst].item():.3g})")


# ---------------------------------------------------------------------------- rms_norm
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 17), (2, 1, 1), (4, 7, 1000), (0, 64)])
def test_rms_norm_matches_float64(generator, shape):
    x = torch.randn(shape, generator=generator) * torch.rand(shape[:-1] + (1,), generator=generator).add(0.01) * 10
    weight = torch.randn(shape[-1], generator=generator)
    eps = 1e-6
    got = cpu_ops.rms_norm(x, weight, eps)
    x64 = x.double()
    normed = x64 / torch.sqrt(x64.square().mean(-1, keepdim=True) + eps)
    reference = weight.double() * normed
    n = shape[-1]
    bound = 2 * (n / 16 + 4 + 6) * U * reference.abs() + 1e-30
    assert got.shape == x.shape
    assert_within(got, reference, bound, f"rms_norm {shape}")
    assert torch.equal(llama.rms_norm(x, weight, eps), got)  # llama.rms_norm takes the native path here


def test_rms_norm_reads_strided_rows(generator):
    x = torch.randn(6, 40, generator=generator)[:, :33]  # rows of 40, 33 used
    weight = torch.randn(33, generator=generator)
    reference = weight.double() * x.double() / torch.sqrt(x.double().square().mean(-1, keepdim=True) + 1e-5)
    assert_within(cpu_ops.rms_norm(x, weight, 1e-5), reference, 2 * (33 / 16 + 10) * U * reference.abs() + 1e-30, "strided")


def test_silu_mul_reads_strided_rows(generator):
    gate_up = torch.randn(5, 50, generator=generator)[:, :46]  # rows of 50, 2 x 23 used
    gate, up = gate_up.double().chunk(2, dim=-1)
    reference = gate * torch.sigmoid(gate) * up
    assert_within(cpu_ops.silu_mul(gate_up), reference, 2 * 6 * U * reference.abs() + 1e-300, "strided")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_the_primitives_refuse_what_is_not_float32(dtype):
    with pytest.raises(native.NativeKernelError, match="weight is torch.*expected float32 on the CPU"):
        cpu_ops.rms_norm(torch.ones(2, 8), torch.ones(8, dtype=dtype), 1e-5)
    with pytest.raises(native.NativeKernelError, match="gate_up is torch.*expected float32"):
        cpu_ops.silu_mul(torch.ones(2, 8, dtype=dtype))
    keys = torch.zeros(1, 1, 4, 8, dtype=dtype)
    with pytest.raises(native.NativeKernelError, match="keys is torch.*expected float32"):
        cpu_ops.decode_attention(torch.ones(1, 1, 24), torch.ones(1, 1, 1, 8), torch.zeros(1, 1, 1, 8), None,
                                 keys, torch.zeros(1, 1, 4, 8), 0, 1, 0.5)


def test_rms_norm_names_the_sizes():
    with pytest.raises(native.NativeKernelError, match=r"x is \(2, 8\), weight \(7,\)"):
        cpu_ops.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5)


# ---------------------------------------------------------------------------- silu_mul
@pytest.mark.parametrize("shape", [(1, 1, 2 * 1536), (3, 2, 2 * 37), (5, 2), (0, 8)])
def test_silu_mul_matches_float64(generator, shape):
    gate_up = torch.randn(shape, generator=generator) * 6
    if gate_up.numel():  # the ends of exp's range: under- and overflow, and around them
        gate_up.view(-1)[: min(8, gate_up.numel())] = torch.tensor([100.0, -100.0, 88.5, -88.5, 87.0, -87.0, 0.0, -1e-3])[
            : min(8, gate_up.numel())]
    got = cpu_ops.silu_mul(gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    reference = gate * torch.sigmoid(gate) * up
    bound = 2 * 6 * U * reference.abs() + 1e-37 * up.abs() + 1e-300
    assert got.shape == gate.shape
    assert_within(got, reference, bound, f"silu_mul {shape}")


def test_silu_mul_wants_an_even_size():
    with pytest.raises(native.NativeKernelError, match=r"\(3, 5\), its last size must be even"):
        cpu_ops.silu_mul(torch.ones(3, 5))


# ---------------------------------------------------------------------------- decode attention
def rope64(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) float64; cos, sin (..., D) with sin's first half negated (llama.rope_cos_sin)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def norm64(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    if weight is None:
        return x
    return weight.double() * x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps)


def reference_attention(qkv, cos, sin, mask, keys, values, position, heads, scale, q_norm, k_norm, eps):
    """float64: (out (B, H * D), new keys (B, Hkv, D), error bound on out (B, H * D))."""
    batch, kv_heads, _, d = keys.shape
    group, total = heads // kv_heads, position + 1
    heads_all = qkv.double().view(batch, heads + 2 * kv_heads, d)
    c, s = cos.double().view(batch, 1, d), sin.double().view(batch, 1, d)
    q = rope64(norm64(heads_all[:, :heads], q_norm, eps), c, s)                   # (B, H, D)
    k_new = rope64(norm64(heads_all[:, heads : heads + kv_heads], k_norm, eps), c, s)
    k = keys[:, :, :total].double().clone()
    v = values[:, :, :total].double().clone()
    k[:, :, position], v[:, :, position] = k_new, heads_all[:, heads + kv_heads :]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # (B, H, T, D)
    scores = torch.einsum("bhd,bhtd->bht", q, k) * scale
    if mask is not None:
        scores = scores + mask.double().view(batch, 1, total)
    p = scores.softmax(-1)
    out = torch.einsum("bht,bhtd->bhd", p, v)
    # the bound: each score's error (the dot over D, RoPE and norm on q and k), twice of it on p, plus
    # exp, the sum over T and the divide; on out, times sum_t p_t |v_t|, plus the sum over T
    magnitude = torch.einsum("bhd,bhtd->bht", q.abs(), k.abs()) * scale
    score_error = (d / 16 + 4 + 12 + (12 + d / 16 if q_norm is not None else 0)) * U * magnitude.amax(-1, keepdim=True)
    p_error = 2 * score_error + (total / 16 + 4 + 4) * U
    bound = 2 * ((p_error + (total / 16 + 4) * U) * torch.einsum("bht,bhtd->bhd", p, v.abs())) + 1e-30
    return out.reshape(batch, heads * d), k_new, bound.reshape(batch, heads * d)


def make_case(generator, batch, heads, kv_heads, d, position, capacity, qk_norm):
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * d, generator=generator) * 2
    angles = torch.rand(batch, 1, 1, d // 2, generator=generator) * 100
    cos = torch.cat((angles, angles), -1).cos()
    sin = torch.cat((-angles.sin(), angles.sin()), -1)
    keys = torch.randn(batch, kv_heads, capacity, d, generator=generator)
    values = torch.randn(batch, kv_heads, capacity, d, generator=generator)
    norms = (torch.rand(d, generator=generator) + 0.5, torch.rand(d, generator=generator) + 0.5) if qk_norm else (None, None)
    return qkv, cos, sin, keys, values, norms


@pytest.mark.parametrize("batch, heads, kv_heads, d, position, qk_norm", [
    (1, 9, 3, 64, 0, False),       # SmolLM2's heads; the first position: attends to itself only
    (1, 9, 3, 64, 70, False),
    (2, 7, 7, 34, 16, False),      # odd head count, no grouping, D not a multiple of 16
    (3, 6, 2, 16, 33, True),       # Qwen3's q/k norm
    (2, 5, 1, 80, 129, False),     # one kv head for all
    (8, 8, 2, 64, 300, False),     # enough work for the thread pool
])
def test_decode_attention_matches_float64(generator, batch, heads, kv_heads, d, position, qk_norm):
    capacity = position + 3
    qkv, cos, sin, keys, values, (q_norm, k_norm) = make_case(generator, batch, heads, kv_heads, d, position, capacity, qk_norm)
    before_keys, before_values = keys.clone(), values.clone()
    eps, scale = 1e-6, d**-0.5
    reference, k_new, bound = reference_attention(qkv, cos, sin, None, keys, values, position, heads, scale, q_norm, k_norm, eps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as generate's decode steps: the kernels' pool takes the large batch
    try:
        with native.cpu_threads(2):
            got = cpu_ops.decode_attention(qkv, cos, sin, None, keys, values, position, heads, scale, q_norm, k_norm, eps)
    finally:
        torch.set_num_threads(threads)
    assert got.shape == (batch, 1, heads * d)
    assert_within(got.view(batch, -1), reference, bound, "attention output")
    # the cache: rope(norm(k)) and v written at `position`, nothing else touched
    k_bound = 2 * (12 + (d / 16 + 16 if qk_norm else 0)) * U * k_new.abs().amax(-1, keepdim=True) + 1e-30
    assert_within(keys[:, :, position], k_new, k_bound.expand_as(k_new), "new key in the cache")
    v_new = qkv.view(batch, heads + 2 * kv_heads, d)[:, heads + kv_heads :]
    assert torch.equal(values[:, :, position], v_new)
    others = [i for i in range(capacity) if i != position]
    assert torch.equal(keys[:, :, others], before_keys[:, :, others])
    assert torch.equal(values[:, :, others], before_values[:, :, others])


@pytest.mark.parametrize("batch, heads, kv_heads, position", [(1, 9, 3, 300), (1, 6, 6, 400), (2, 4, 1, 511), (3, 10, 5, 120)])
def test_decode_attention_is_the_same_on_1_and_2_threads(generator, batch, heads, kv_heads, position):
    # enough work for the pool (ATTENTION_PARALLEL_MIN); one sequence's query heads go to it one by
    # one, a batch's by kv head: neither may change a bit
    d = 64
    qkv, cos, sin, keys, values, _ = make_case(generator, batch, heads, kv_heads, d, position, position + 1, False)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as generate's decode steps: the kernels' pool takes the attention
    try:
        for n in (1, 2):
            k, v = keys.clone(), values.clone()
            with native.cpu_threads(n):
                results.append((cpu_ops.decode_attention(qkv, cos, sin, None, k, v, position, heads, d**-0.5), k, v))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize("window", [4, 16, 17])
@pytest.mark.parametrize("offset", [-1, 0, 1, 9])
def test_decode_attention_masks_padding_and_the_window(generator, window, offset):
    # T around the window, left padding in some rows (a row with 0 valid keys but the new one too),
    # the mask built by llama.attention_mask as the runtime builds it
    batch, heads, kv_heads, d = 3, 4, 2, 32
    total = max(window + offset, 1)
    position = total - 1
    qkv, cos, sin, keys, values, _ = make_case(generator, batch, heads, kv_heads, d, position, total + 2, False)
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[1, : total // 2] = False
    valid[2, :position] = False
    mask = llama.attention_mask(valid, 1, torch.float32, window)  # (B, 1, 1, T)
    reference, _, bound = reference_attention(qkv, cos, sin, mask, keys, values, position, heads, d**-0.5, None, None, 0.0)
    got = cpu_ops.decode_attention(qkv, cos, sin, mask, keys, values, position, heads, d**-0.5)
    assert_within(got.view(batch, -1), reference, bound, f"masked attention, window {window}, T {total}")


def test_decode_attention_with_every_key_masked_averages_the_values(generator):
    # as SDPA with the same additive mask: every score is the lowest float, so the weights are equal
    qkv, cos, sin, keys, values, _ = make_case(generator, 1, 2, 1, 16, 5, 6, False)
    mask = torch.full((1, 1, 1, 6), torch.finfo(torch.float32).min)
    got = cpu_ops.decode_attention(qkv, cos, sin, mask, keys, values, 5, 2, 0.25)
    mean = values[0, 0, :6].double().mean(0)  # keys written first: row 5 is the new value
    assert torch.allclose(got.view(2, 16).double(), mean.expand(2, 16), rtol=0, atol=1e-6 * mean.abs().max().item())


def small_config(**sizes) -> ModelConfig:
    return ModelConfig(family="qwen3", vocab_size=32, hidden_size=48, intermediate_size=64, num_layers=1,
                       rms_norm_eps=1e-6, tie_word_embeddings=False, biased=(), sliding_window=None,
                       max_position_embeddings=64, rope_type="default", rope_theta=10000.0, **sizes)


def test_decode_attention_agrees_with_llama_torch_path(generator, monkeypatch):
    # the runtime's two ways through self_attention on the same decode step: the native call and the
    # torch code (norm, RoPE, cache update, SDPA), for a Qwen3-style layer with q/k norm and GQA
    config = small_config(num_heads=6, num_kv_heads=2, head_dim=16, qk_norm=True)
    hidden, heads_all = 48, (6 + 2 * 2) * 16
    w = {"self_attn.qkv_proj.weight": torch.randn(heads_all, hidden, generator=generator) / 7,
         "self_attn.o_proj.weight": torch.randn(hidden, 6 * 16, generator=generator) / 10,
         "self_attn.q_norm.weight": torch.rand(16, generator=generator) + 0.5,
         "self_attn.k_norm.weight": torch.rand(16, generator=generator) + 0.5}
    prompt = torch.randn(2, 9, hidden, generator=generator)
    step = torch.randn(2, 1, hidden, generator=generator)
    outputs = []
    for native_path in (True, False):
        if not native_path:
            monkeypatch.setattr(cpu_ops, "takes", lambda *tensors: False)
        cache = llama.KVCache(config, 2, 12, torch.float32, "cpu")
        positions = torch.arange(10).expand(2, 10)
        cos, sin = llama.rope_cos_sin(config, positions[:, :9], torch.float32)
        llama.self_attention(prompt, w, config, cos, sin, None, cache, 0)
        cache.advance(9)
        cos, sin = llama.rope_cos_sin(config, positions[:, 9:], torch.float32)
        outputs.append(llama.self_attention(step, w, config, cos, sin, None, cache, 0))
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-4, atol=1e-5 * outputs[1].abs().max().item())


def test_decode_attention_names_the_sizes_and_a_full_cache(generator):
    qkv, cos, sin, keys, values, _ = make_case(generator, 1, 4, 2, 16, 3, 4, False)
    with pytest.raises(native.NativeKernelError, match=r"qkv \(1, 1, 128\).*do not agree with 5 query heads"):
        cpu_ops.decode_attention(qkv, cos, sin, None, keys, values, 3, 5, 0.25)
    with pytest.raises(native.NativeKernelError, match="position 4 outside the cache's 4"):
        cpu_ops.decode_attention(qkv, cos, sin, None, keys, values, 4, 4, 0.25)
    config = small_config(num_heads=4, num_kv_heads=2, head_dim=16, qk_norm=False)
    cache = llama.KVCache(config, 1, 4, torch.float32, "cpu")
    cache.advance(4)
    with pytest.raises(llama.QuantliteError, match="KV cache holds 4 positions; this step needs 5"):
        cache.end(1)


# ---------------------------------------------------------------------------- a whole decoder layer
# cpu_ops.DecodeLayers runs, in one C call, the native calls llama.decoder_layer makes one by one on a
# decode step (rms_norm, qmatmul, decode_attention, silu_mul, the float32 adds) in the same order, so
# its output and cache writes must equal theirs bit for bit; each of those calls is held to float64
# above (and in test_native.py), and the layer as a whole to transformers in test_llama_exact.py,
# test_families.py and test_runtime_decode.py, which decode through it.
def layer_weights(generator, config: ModelConfig, biased: bool) -> dict:
    """Random 4-bit weights of one layer, named and joined as the loader hands them to decoder_layer."""
    from quantlite.quantizer import quantize

    hidden, inner, d = config.hidden_size, config.intermediate_size, config.head_dim
    shapes = {"self_attn.q_proj": (config.num_heads * d, hidden), "self_attn.k_proj": (config.num_kv_heads * d, hidden),
              "self_attn.v_proj": (config.num_kv_heads * d, hidden), "self_attn.o_proj": (hidden, config.num_heads * d),
              "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden), "mlp.down_proj": (hidden, inner)}
    w = {f"{name}.weight": quantize(torch.randn(shape, generator=generator) / shape[1] ** 0.5, block_size=32, name=name)
         for name, shape in shapes.items()}
    if biased:
        w.update({f"{name}.bias": torch.randn(shape[0], generator=generator) / 4 for name, shape in shapes.items()})
    w["input_layernorm.weight"] = torch.rand(hidden, generator=generator) + 0.5
    w["post_attention_layernorm.weight"] = torch.rand(hidden, generator=generator) + 0.5
    if config.qk_norm:
        w["self_attn.q_norm.weight"] = torch.rand(d, generator=generator) + 0.5
        w["self_attn.k_norm.weight"] = torch.rand(d, generator=generator) + 0.5
    return llama.fuse_projections(w)


def decode_layer_steps(generator, config, w, batch, padded, steps=3):
    """A prompt of 5 through decoder_layers (torch and per-op code), then `steps` decode steps ->
    (each step's output, the cache) for fresh inputs drawn from `generator`."""
    cache = llama.KVCache(config, batch, 5 + steps, torch.float32, "cpu")
    valid = torch.ones(batch, 5 + steps, dtype=torch.bool)
    if padded:
        valid[-1, :2] = False  # left padding in the last row
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = llama.rope_cos_sin(config, positions[:, :5], torch.float32)
    mask = llama.attention_mask(valid[:, :5], 5, torch.float32) if padded else None
    llama.decoder_layers(torch.randn(batch, 5, config.hidden_size, generator=generator), [w], config, cos, sin, mask, cache, 0)
    cache.advance(5)
    outputs = []
    for step in range(steps):
        end = 5 + step + 1
        cos, sin = llama.rope_cos_sin(config, positions[:, end - 1 : end], torch.float32)
        mask = llama.attention_mask(valid[:, :end], 1, torch.float32) if padded else None
        x = torch.randn(batch, 1, config.hidden_size, generator=generator)
        outputs.append(llama.decoder_layers(x, [w], config, cos, sin, mask, cache, 0))
        cache.advance(1)
    return outputs, cache


@pytest.mark.parametrize("hidden, inner, heads, kv_heads, d, batch, biased, qk_norm, padded", [
    (576, 1536, 9, 3, 64, 1, False, False, False),  # SmolLM2's layer
    (72, 45, 6, 2, 12, 1, True, True, False),       # odd sizes, every bias (Qwen2), q/k norm (Qwen3)
    (40, 33, 3, 3, 8, 3, False, False, True),       # a batch with left padding, no grouping
    (56, 24, 5, 1, 16, 2, True, False, False),      # one kv head for five
])
def test_decode_layer_equals_the_per_op_calls(seed, monkeypatch, hidden, inner, heads, kv_heads, d, batch, biased,
                                              qk_norm, padded):
    config = dataclasses.replace(small_config(num_heads=heads, num_kv_heads=kv_heads, head_dim=d, qk_norm=qk_norm),
                                 hidden_size=hidden, intermediate_size=inner)
    w = layer_weights(torch.Generator().manual_seed(seed), config, biased)
    x = torch.randn(batch, 1, hidden)
    assert cpu_ops.takes_layer(x, w)
    runs = {}
    for way in ("layer, 2 threads", "layer, 1 thread", "per op"):
        if way == "per op":
            monkeypatch.setattr(cpu_ops, "takes_layer", lambda x, w: False)
        with native.cpu_threads(1 if way == "layer, 1 thread" else 2):
            runs[way] = decode_layer_steps(torch.Generator().manual_seed(seed + 1), config, w, batch, padded)
    (per_op, per_op_cache) = runs.pop("per op")
    for way, (outputs, cache) in runs.items():
        assert list(cache.native_layers) == [(0, 1)], way  # the native layer ran
        for step, (got, want) in enumerate(zip(outputs, per_op)):
            assert torch.equal(got, want), f"{way}, step {step}: {(got - want).abs().max().item():.3g} from the per-op calls"
        end = cache.length
        assert torch.equal(cache.keys[0][:, :, :end], per_op_cache.keys[0][:, :, :end]), way
        assert torch.equal(cache.values[0][:, :, :end], per_op_cache.values[0][:, :, :end]), way


def test_decode_layer_is_packed_once_and_follows_new_weights(generator):
    config = dataclasses.replace(small_config(num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=False), hidden_size=32,
                                 intermediate_size=40)
    w = layer_weights(generator, config, biased=False)
    outputs, cache = decode_layer_steps(generator, config, w, 1, False)
    call = cache.native_layers[0, 1]
    caches = [cache.layer(0)]
    assert call.serves([w], caches)
    other = dict(w, **{"post_attention_layernorm.weight": w["post_attention_layernorm.weight"].clone()})
    assert not call.serves([other], caches)  # a weight replaced: packed anew
    assert not call.serves([w], [(caches[0][0].clone(), caches[0][1])])  # another cache likewise
    x = torch.randn(1, 1, 32, generator=generator)
    cos, sin = llama.rope_cos_sin(config, torch.tensor([[7]]), torch.float32)
    cache.length = 7
    llama.decoder_layers(x, [other], config, cos, sin, None, cache, 0)
    assert cache.native_layers[0, 1] is not call and cache.native_layers[0, 1].serves([other], caches)


def test_decode_layer_copies_a_strided_weight_and_holds_no_weight(generator, monkeypatch):
    config = dataclasses.replace(small_config(num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True), hidden_size=32,
                                 intermediate_size=40)
    w = layer_weights(generator, config, biased=True)
    w["input_layernorm.weight"] = torch.rand(64, generator=generator)[::2] + 0.5  # (32,), stride 2
    w["self_attn.q_norm.weight"] = torch.rand(16, generator=generator)[::2] + 0.5
    native_steps, cache = decode_layer_steps(torch.Generator().manual_seed(5), config, w, 1, False)
    monkeypatch.setattr(cpu_ops, "takes_layer", lambda x, w: False)
    per_op_steps, _ = decode_layer_steps(torch.Generator().manual_seed(5), config, w, 1, False)
    assert all(torch.equal(a, b) for a, b in zip(native_steps, per_op_steps))
    call, caches = cache.native_layers[0, 1], [cache.layer(0)]
    probe = weakref.ref(w["mlp.down_proj.weight"])
    del w
    gc.collect()
    assert probe() is None  # the packed call did not keep the layer's weights alive
    assert not call.serves([{}], caches)


@pytest.mark.parametrize("biased", [False, True])
def test_decode_layers_equal_layer_after_layer(seed, monkeypatch, biased):
    # several layers in one call (the resident model's decode step), each with its own weights and
    # cache, against decoder_layer called layer by layer through the per-op calls
    config = dataclasses.replace(small_config(num_heads=6, num_kv_heads=3, head_dim=10, qk_norm=False), hidden_size=44,
                                 intermediate_size=50, num_layers=3)
    generator = torch.Generator().manual_seed(seed)
    layers = [layer_weights(generator, config, biased) for _ in range(3)]
    results = []
    for native_path in (True, False):
        if not native_path:
            monkeypatch.setattr(cpu_ops, "takes_layer", lambda x, w: False)
        generator = torch.Generator().manual_seed(seed + 1)
        cache = llama.KVCache(config, 2, 6, torch.float32, "cpu")
        positions = torch.arange(6).expand(2, 6)
        x = torch.randn(2, 4, 44, generator=generator)
        llama.decoder_layers(x, layers, config, *llama.rope_cos_sin(config, positions[:, :4], torch.float32), None, cache)
        cache.advance(4)
        steps = []
        for position in (4, 5):
            x = torch.randn(2, 1, 44, generator=generator)
            steps.append(llama.decoder_layers(x, layers, config, *llama.rope_cos_sin(config, positions[:, position:position + 1],
                                                                                     torch.float32), None, cache))
            cache.advance(1)
        results.append((steps, cache))
    (native_steps, native_cache), (steps, per_op_cache) = results
    assert list(native_cache.native_layers) == [(0, 3)]
    for got, want in zip(native_steps, steps):
        assert torch.equal(got, want)
    for layer in range(3):
        assert torch.equal(native_cache.keys[layer], per_op_cache.keys[layer])
        assert torch.equal(native_cache.values[layer], per_op_cache.values[layer])


def test_decode_layer_names_the_sizes(generator):
    config = dataclasses.replace(small_config(num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=False), hidden_size=32,
                                 intermediate_size=40)
    w = layer_weights(generator, config, biased=False)
    caches = [(torch.zeros(1, 2, 6, 8), torch.zeros(1, 2, 6, 8))]
    bad = dict(w, **{"input_layernorm.weight": torch.ones(31)})
    with pytest.raises(native.NativeKernelError, match=r"norm weights \[\(31,\), \(32,\)\].*32 features"):
        cpu_ops.DecodeLayers([bad], 1e-6, caches, 4, 0.3)
    call = cpu_ops.DecodeLayers([w], 1e-6, caches, 4, 0.3)
    cos = sin = torch.zeros(1, 1, 1, 8)
    with pytest.raises(native.NativeKernelError, match=r"x is \(1, 1, 31\), expected \(1, 1, 32\)"):
        call(torch.zeros(1, 1, 31), cos, sin, None, 0)
    with pytest.raises(native.NativeKernelError, match="position 6 outside the cache's 6"):
        call(torch.zeros(1, 1, 32), cos, sin, None, 6)
    with pytest.raises(native.NativeKernelError, match="x is torch.float64"):
        call(torch.zeros(1, 1, 32, dtype=torch.float64), cos, sin, None, 0)


@pytest.mark.parametrize("name", ["input_layernorm.weight", "self_attn.q_norm.weight", "mlp.down_proj.bias"])
def test_a_layer_with_a_float_the_native_layer_cannot_read_takes_the_per_op_path(generator, name):
    # a norm or bias that is not float32 (a direct caller's bfloat16 norm): the per-op path computes
    # it in torch, so the native layer declines the layer instead of failing in the packing
    config = small_config(num_heads=4, num_kv_heads=2, head_dim=8, qk_norm=True)
    w = layer_weights(generator, config, biased=True)
    x = torch.randn(1, 1, config.hidden_size, generator=generator)
    assert cpu_ops.takes_layer(x, w)
    w[name] = w[name].to(torch.bfloat16)
    assert not cpu_ops.takes_layer(x, w)
    cache = llama.KVCache(config, 1, 4, torch.float32, "cpu")
    positions = torch.zeros(1, 1, dtype=torch.int64)
    cos, sin = llama.rope_cos_sin(config, positions, torch.float32)
    assert llama.native_decode_layers(x, [w], config, cos, sin, None, cache, 0) is None
    assert torch.isfinite(llama.decoder_layers(x, [w], config, cos, sin, None, cache, 0)).all()
