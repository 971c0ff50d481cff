"""The model description: one config.json read and checked once, for convert, the packed reader, the
runtime and calibration alike, and the tensors (HF names and shapes) it implies.

Every model quantlite runs is a Llama-shaped decoder: pre-norm blocks of RMSNorm, rotary grouped-query
attention and a SwiGLU MLP. What differs between the members of that family is data, one FAMILIES
entry each (docs/architecture.md, "Adding a model family"):

    family    HF class             GGUF arch  biases                       q/k norm  sliding window
    llama     LlamaForCausalLM     llama      attention_bias: q,k,v,o;     no        no
                                              mlp_bias: gate,up,down
    mistral   MistralForCausalLM   (llama)    none                         no        sliding_window
    qwen2     Qwen2ForCausalLM     qwen2      always q,k,v                 no        refused if on
    qwen3     Qwen3ForCausalLM     qwen3      attention_bias: q,k,v,o      yes       refused if on

`read_model_config` refuses, with one message, whatever the runtime cannot run exactly (a rope type it
does not implement, another activation, Qwen's per-layer sliding windows), so `convert` stops before
writing anything with the same words `load` would use. No torch here: benchmarks import it without.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from quantlite.errors import QuantliteError

# The Linear layers of a decoder layer (names relative to `model.layers.{i}.`): quantized by default.
ATTENTION_PROJECTIONS = tuple(f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
MLP_PROJECTIONS = tuple(f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj"))
LINEAR_WEIGHTS = tuple(f"{p}.weight" for p in ATTENTION_PROJECTIONS + MLP_PROJECTIONS)
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # (head_dim,) each, Qwen3
EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"
LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)")
MAX_DIMENSION = 2**24  # no real model has a hidden size or vocabulary near this
MAX_LAYERS = 4096      # a reader builds a name per layer: a lying config must not make it build millions
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


class ModelConfigError(QuantliteError, ValueError):
    """A config.json describes something quantlite cannot run exactly (the message says what)."""


@dataclass(frozen=True)
class Family:
    """What one member of the Llama family changes (module docstring)."""
    model_type: str
    architecture: str                 # the HF class name in config.json's "architectures"
    gguf_architecture: str | None     # GGUF general.architecture, also its metadata key prefix; None: read as llama
    biases: tuple[tuple[str | None, tuple[str, ...]], ...]  # (config flag, or None for always; projections)
    qk_norm: bool = False             # RMSNorm over head_dim on each q and k head, before RoPE
    sliding_window: bool = False      # config "sliding_window" (null: none) limits how far back a query sees
    gguf_permutes_qk: bool = False    # llama.cpp's converter interleaves q/k rows for its rotary layout
    refused_flags: tuple[str, ...] = ()  # config switches the runtime cannot honour exactly when true


FAMILIES = {family.model_type: family for family in (
    Family("llama", "LlamaForCausalLM", "llama", biases=(("attention_bias", ATTENTION_PROJECTIONS),
                                                         ("mlp_bias", MLP_PROJECTIONS)), gguf_permutes_qk=True),
    Family("mistral", "MistralForCausalLM", None, biases=(), sliding_window=True, gguf_permutes_qk=True),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2", biases=((None, ATTENTION_PROJECTIONS[:3]),),
           refused_flags=("use_sliding_window",)),
    Family("qwen3", "Qwen3ForCausalLM", "qwen3", biases=(("attention_bias", ATTENTION_PROJECTIONS),), qk_norm=True,
           refused_flags=("use_sliding_window",)),
)}
GGUF_FAMILIES = {f.gguf_architecture: f for f in FAMILIES.values() if f.gguf_architecture}


@dataclass(frozen=True)
class ModelConfig:
    family: str                     # a key of FAMILIES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    biased: tuple[str, ...]         # projections with a bias, e.g. ("self_attn.q_proj", ...)
    qk_norm: bool
    sliding_window: int | None      # a query sees the keys of the last `sliding_window` positions (itself included)
    max_position_embeddings: int
    rope_type: str                  # one of ROPE_TYPES
    rope_theta: float
    rope_factor: float = 1.0        # linear, dynamic, llama3
    rope_low_freq_factor: float = 1.0   # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position: int = 0  # llama3: the pre-training context length


def read_model_config(config: object, error: Callable[[str], Exception] = ModelConfigError) -> ModelConfig:
    """The description of an HF config.json dict (either spelling of the RoPE settings: `rope_theta` +
    `rope_scaling` before transformers 5, `rope_parameters` since); raises error(message) for a config
    that is malformed or that the runtime cannot run exactly."""
    if not isinstance(config, dict):
        raise error("config is not a JSON object")
    _check_value_types(config, error)
    family = _family(config, error)

    def count(key: str, default: int | None = None, limit: int = MAX_DIMENSION) -> int:
        value = config.get(key)
        value = default if value is None else value
        if not (isinstance(value, int) and not isinstance(value, bool) and 0 < value <= limit):
            raise error(f"config {key!r} = {value!r} must be a positive integer up to {limit}")
        return value

    if config.get("hidden_act", "silu") != "silu":
        raise error(f"config hidden_act {config.get('hidden_act')!r}: only SwiGLU with silu is a Llama-family MLP")
    for flag in family.refused_flags:
        if config.get(flag):
            raise error(f"config {flag!r} is true: sliding-window attention on some {family.model_type} layers is not supported")
    hidden, heads = count("hidden_size"), count("num_attention_heads")
    kv_heads = count("num_key_value_heads", heads)
    if heads % kv_heads:
        raise error(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    head_dim = count("head_dim", hidden // heads if hidden % heads == 0 else None)
    if head_dim % 2:
        raise error(f"head_dim {head_dim} must be even for rotary embeddings")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise error(f"rope type {rope_type!r} is not supported; quantlite runs {', '.join(ROPE_TYPES)}")
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise error("partial_rotary_factor != 1 (RoPE on part of each head) is not supported")
    window = config.get("sliding_window") if family.sliding_window else None
    if window is not None:
        count("sliding_window")
    max_positions = count("max_position_embeddings", 2048)
    return ModelConfig(
        family=family.model_type, vocab_size=count("vocab_size"), hidden_size=hidden,
        intermediate_size=count("intermediate_size"), num_layers=count("num_hidden_layers", limit=MAX_LAYERS),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        biased=tuple(p for flag, projections in family.biases if flag is None or config.get(flag) for p in projections),
        qk_norm=family.qk_norm, sliding_window=window, max_position_embeddings=max_positions,
        rope_type=rope_type,
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        rope_factor=float(rope.get("factor", 1.0)),
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_max_position=int(rope.get("original_max_position_embeddings", max_positions)),
    )


def _family(config: dict, error: Callable[[str], Exception]) -> Family:
    """The family config.json names: its model_type, or (none given) its architectures."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise error(f"config 'architectures' = {architectures!r} must be a list")
    model_type = config.get("model_type")
    by_class = [f for f in FAMILIES.values() if f.architecture in architectures]
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    if model_type is None and by_class:
        return by_class[0]
    known = ", ".join(f"{f.architecture} ({name})" for name, f in FAMILIES.items())
    raise error(f"not a Llama-family model (model_type={model_type!r}, architectures={architectures!r}); quantlite runs {known}")


FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window")
NUMBERS = ("rms_norm_eps", "rope_theta", "partial_rotary_factor")
ROPE_NUMBERS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "partial_rotary_factor")
ROPE_COUNTS = ("original_max_position_embeddings",)


def _check_value_types(config: dict, error: Callable[[str], Exception]) -> None:
    """The values read besides the sizes must have their JSON type: "tie_word_embeddings": "false" is
    not read as true, nor "rms_norm_eps": "abc" left to fail at the first token."""
    for key in FLAGS:
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise error(f"config {key!r} = {config[key]!r} must be true or false")
    rope = config.get("rope_parameters") or config.get("rope_scaling")
    if rope is not None and not isinstance(rope, dict):
        raise error(f"config rope_scaling/rope_parameters = {rope!r} must be an object")
    present = object()  # a key given as null is not a key left out
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


# ----------------------------------------------------------------------------------- tensors
def layer_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Tensors of one decoder layer, names relative to `model.layers.{i}.`."""
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    hidden, intermediate = config.hidden_size, config.intermediate_size
    outputs = {"self_attn.q_proj": q_out, "self_attn.k_proj": kv_out, "self_attn.v_proj": kv_out,
               "self_attn.o_proj": hidden, "mlp.gate_proj": intermediate, "mlp.up_proj": intermediate,
               "mlp.down_proj": hidden}
    inputs = {"self_attn.o_proj": q_out, "mlp.down_proj": intermediate}
    shapes: dict[str, tuple[int, ...]] = {"input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    shapes.update({f"{p}.weight": (n_out, inputs.get(p, hidden)) for p, n_out in outputs.items()})
    shapes.update({f"{p}.bias": (outputs[p],) for p in config.biased})
    if config.qk_norm:
        shapes.update({name: (config.head_dim,) for name in QK_NORMS})
    return shapes


def final_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """model.norm and, unless tied to the embedding, lm_head."""
    shapes = {FINAL_NORM: (config.hidden_size,)}
    if not config.tie_word_embeddings:
        shapes[LM_HEAD] = (config.vocab_size, config.hidden_size)
    return shapes


def all_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint, full HF names."""
    shapes = {EMBEDDING: (config.vocab_size, config.hidden_size)}
    for layer in range(config.num_layers):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in layer_shapes(config).items()})
    shapes.update(final_shapes(config))
    return shapes
