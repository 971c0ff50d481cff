"""What a Llama checkpoint must contain, derived from its config: tensor names (HF spelling) and shapes.

Both directions use it: the converter checks a source against it before writing anything, and the
packed-model reader checks every shard against it before handing tensors to the runtime.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

# The Linear weights of a decoder layer: the tensors quantized by default.
ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
LINEAR_WEIGHTS = tuple(f"self_attn.{p}.weight" for p in ATTENTION_PROJECTIONS) + tuple(
    f"mlp.{p}.weight" for p in MLP_PROJECTIONS
)
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
MAX_DIMENSION = 2**24  # no real model has a hidden size or vocabulary near this
MAX_LAYERS = 4096      # a reader builds a name per layer: a lying config must not make it build millions
LLAMA_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    attention_bias: bool
    mlp_bias: bool


def llama_dims(config: object, error: Callable[[str], Exception]) -> LlamaDims:
    """Check that `config` (an HF config.json dict) describes a Llama model; raise error(message) if not."""
    if not isinstance(config, dict):
        raise error("config is not a JSON object")
    if not isinstance(config.get("architectures") or [], list):
        raise error(f"config 'architectures' = {config['architectures']!r} must be a list")
    architectures = config.get("architectures") or []
    if config.get("model_type") not in LLAMA_MODEL_TYPES and "LlamaForCausalLM" not in architectures:
        raise error(
            f"not a Llama model (model_type={config.get('model_type')!r}, architectures={architectures!r}); "
            "quantlite converts LlamaForCausalLM checkpoints"
        )

    def count(key: str, default: int | None = None, limit: int = MAX_DIMENSION) -> int:
        value = config.get(key)
        value = default if value is None else value
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit):
            raise error(f"config {key!r} = {value!r} must be a positive integer up to {limit}")
        return value

    _check_value_types(config, error)
    hidden, heads = count("hidden_size"), count("num_attention_heads")
    kv_heads = count("num_key_value_heads", heads)
    if heads % kv_heads:
        raise error(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = hidden // heads if hidden % heads == 0 else None  # the default when config has no head_dim
    dims = LlamaDims(
        hidden=hidden, intermediate=count("intermediate_size"), layers=count("num_hidden_layers", limit=MAX_LAYERS),
        heads=heads, kv_heads=kv_heads, head_dim=count("head_dim", head_dim), vocab=count("vocab_size"),
        tied=bool(config.get("tie_word_embeddings", False)),
        attention_bias=bool(config.get("attention_bias", False)), mlp_bias=bool(config.get("mlp_bias", False)),
    )
    if dims.head_dim % 2:
        raise error(f"head_dim {dims.head_dim} must be even for rotary embeddings")
    return dims


FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")
NUMBERS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "partial_rotary_factor")
ROPE_COUNTS = ("original_max_position_embeddings",)


def _check_value_types(config: dict, error: Callable[[str], Exception]) -> None:
    """The values the runtime reads besides the sizes must have their JSON type, so a checkpoint that
    converts and verifies also runs: "tie_word_embeddings": "false" is not read as true, nor
    "rms_norm_eps": "abc" left to fail at the first token."""
    for key in FLAGS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise error(f"config {key!r} = {config[key]!r} must be true or false")
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise error(f"config rope_scaling/rope_parameters = {rope!r} must be an object")
    present = object()  # a key given as null is not a key left out: the runtime would read None
    values = [(key, config.get(key, present)) for key in NUMBERS] + [
        (f"rope {key}", (rope or {}).get(key, present)) for key in ROPE_NUMBERS]
    for key, value in values:
        if value is not present and not (_is_number(value) and math.isfinite(value) and value > 0):
            raise error(f"config {key!r} = {value!r} must be a positive finite number")
    for key, value in [("max_position_embeddings", config.get("max_position_embeddings", present))] + [
            (f"rope {key}", (rope or {}).get(key, present)) for key in ROPE_COUNTS]:
        if value is not present and not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_DIMENSION):
            raise error(f"config {key!r} = {value!r} must be a positive integer up to {MAX_DIMENSION}")
    for key in ("hidden_act", "model_type"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise error(f"config {key!r} = {config[key]!r} must be a string")
    if rope is not None and not isinstance(rope.get("rope_type", rope.get("type", "default")), str):
        raise error("config rope type must be a string")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def layer_shapes(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Tensors of one decoder layer, names relative to `model.layers.{i}.`."""
    q_out, kv_out = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (dims.hidden,),
        "post_attention_layernorm.weight": (dims.hidden,),
        "self_attn.q_proj.weight": (q_out, dims.hidden),
        "self_attn.k_proj.weight": (kv_out, dims.hidden),
        "self_attn.v_proj.weight": (kv_out, dims.hidden),
        "self_attn.o_proj.weight": (dims.hidden, q_out),
        "mlp.gate_proj.weight": (dims.intermediate, dims.hidden),
        "mlp.up_proj.weight": (dims.intermediate, dims.hidden),
        "mlp.down_proj.weight": (dims.hidden, dims.intermediate),
    }
    if dims.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (q_out,), "self_attn.k_proj.bias": (kv_out,),
                       "self_attn.v_proj.bias": (kv_out,), "self_attn.o_proj.bias": (dims.hidden,)})
    if dims.mlp_bias:
        shapes.update({"mlp.gate_proj.bias": (dims.intermediate,), "mlp.up_proj.bias": (dims.intermediate,),
                       "mlp.down_proj.bias": (dims.hidden,)})
    return shapes


def final_shapes(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """model.norm and, unless tied to the embedding, lm_head."""
    shapes = {FINAL_NORM: (dims.hidden,)}
    if not dims.tied:
        shapes[LM_HEAD] = (dims.vocab, dims.hidden)
    return shapes


def all_shapes(dims: LlamaDims) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, full HF names."""
    shapes = {EMBEDDING: (dims.vocab, dims.hidden)}
    for layer in range(dims.layers):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in layer_shapes(dims).items()})
    shapes.update(final_shapes(dims))
    return shapes
