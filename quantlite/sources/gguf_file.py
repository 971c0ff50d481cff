"""A GGUF file (llama.cpp's format) of a Llama-family model, read with the `gguf` package tensor by tensor.

The architectures read are those of quantlite.model_config.GGUF_FAMILIES (llama, qwen2, qwen3; llama.cpp
writes Mistral checkpoints as llama). Three things differ from a Hugging Face checkpoint, and each is
undone here:
  * names: `blk.7.attn_q.weight` is `model.layers.7.self_attn.q_proj.weight` (GGUF_NAMES);
  * Q and K projections of the families whose Family.gguf_permutes_qk says so (llama): llama.cpp's
    converter permutes their rows for its rotary layout (interleaved pairs instead of HF's two halves);
    `unpermute_rows` is the inverse, as in transformers' LlamaTensorProcessor (tests/test_convert_gguf.py
    checks every tensor against transformers' loader);
  * the config and the tokenizer live in GGUF metadata, under keys prefixed by the architecture: the
    config is rebuilt as the HF config.json that describes the same model, and transformers writes the
    tokenizer as tokenizer.json.
Quantized GGUF tensors (Q4_1, Q8_0, ...) are dequantized to float32 on read.
"""
from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch

from quantlite.errors import ConversionError
from quantlite.sources.checksum import sha256_file
from quantlite.model_config import GGUF_FAMILIES, LM_HEAD, ModelConfig, all_shapes, read_model_config
from quantlite.sources.tokenizer_files import TOKENIZER_FILES, finish_tokenizer_folder

GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
GGUF_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    **{f"{gguf}.{kind}": f"{hf}.{kind}" for kind in ("weight", "bias") for gguf, hf in (
        ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"), ("ffn_gate", "mlp.gate_proj"), ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"))},
}
GGUF_LAYER = re.compile(r"blk\.(\d+)\.(.+)")
# GGUF metadata key (after "<architecture>.") -> HF config key, as transformers' GGUF_CONFIG_MAPPING;
# head_dim is attention.key_length where llama.cpp writes it (qwen3), else rope.dimension_count.
GGUF_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
# The header walk before gguf.GGUFReader sees the file: every count is bounded by the bytes left.
GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type id -> bytes
GGUF_STRING, GGUF_ARRAY = 8, 9
MAX_ARRAY_DEPTH = 3    # llama.cpp writes flat arrays; nested ones exist in the spec, not in Llama files
MAX_TENSOR_DIMS = 4    # GGML_MAX_DIMS
TOKEN_ID_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
                 "padding_token_id": "pad_token_id", "unknown_token_id": "unk_token_id"}


def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None for a tensor the Llama model does not use."""
    if gguf_name in GGUF_NAMES:
        return GGUF_NAMES[gguf_name]
    match = GGUF_LAYER.fullmatch(gguf_name)
    if match and match.group(2) in GGUF_LAYER_NAMES:
        return f"model.layers.{int(match.group(1))}.{GGUF_LAYER_NAMES[match.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's Q/K row permutation. w (n_heads * head_dim, K): within each head llama.cpp
    stores rows as (head_dim/2, 2) pairs; HF stores them as (2, head_dim/2) halves."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFCheckpoint:
    kind = "gguf"

    def __init__(self, path: Path):
        try:
            import gguf
        except ImportError as error:
            raise ConversionError("reading GGUF files needs the `gguf` package: pip install gguf") from error
        self.path = Path(path)
        check_header(self.path)
        try:
            self._reader = gguf.GGUFReader(str(self.path))
        except (ValueError, OSError, KeyError, IndexError, TypeError, AssertionError, OverflowError, struct.error) as error:
            raise ConversionError(f"{self.path}: not a readable GGUF file ({error})") from error
        architecture = self._field("general.architecture")
        if architecture not in GGUF_FAMILIES:
            raise ConversionError(f"{self.path}: GGUF architecture is {architecture!r}; quantlite converts "
                                  f"{', '.join(map(repr, GGUF_FAMILIES))}")
        self.family = GGUF_FAMILIES[architecture]
        if "rope_freqs.weight" in {t.name for t in self._reader.tensors} or self._field(f"{architecture}.rope.scaling.type") not in (None, "none"):
            raise ConversionError(f"{self.path}: RoPE scaling in GGUF files is not supported yet; convert the HF checkpoint instead")
        self._tensors = {}
        for tensor in self._reader.tensors:
            name = hf_name(tensor.name)
            if name is None:
                raise ConversionError(f"{self.path}: unexpected GGUF tensor {tensor.name!r} for a {architecture} model")
            self._tensors[name] = tensor
        self.config = self._build_config()
        self.model_config: ModelConfig = read_model_config(self.config, lambda m: ConversionError(f"{self.path} (GGUF metadata): {m}"))
        self.shapes = all_shapes(self.model_config)
        self._check_tensors()

    # ----------------------------------------------------------------- the source surface
    def itemsize(self, name: str) -> int:
        return 4  # every tensor is dequantized to float32

    def read(self, name: str) -> torch.Tensor:
        import gguf

        tensor = self._tensors[name]
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        if self.family.gguf_permutes_qk and name.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            weights = unpermute_rows(weights, self.model_config.num_heads)
        elif self.family.gguf_permutes_qk and name.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            weights = unpermute_rows(weights, self.model_config.num_kv_heads)
        # a copy: float32 tensors come back as read-only views of the memory-mapped file
        return torch.from_numpy(np.array(weights, dtype=np.float32, order="C")).reshape(self.shapes[name])

    def write_tokenizer(self, folder: Path) -> None:
        """transformers builds the tokenizer from GGUF metadata (its GGUF tokenizer converters)."""
        try:
            from transformers import AutoTokenizer
        except ImportError as error:
            raise ConversionError("turning a GGUF tokenizer into tokenizer.json needs transformers: pip install transformers") from error
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name,
                                                      trust_remote_code=False)
        except (ValueError, KeyError, OSError, NotImplementedError) as error:
            raise ConversionError(f"{self.path}: transformers cannot build its tokenizer ({error})") from error
        with tempfile.TemporaryDirectory() as scratch:
            tokenizer.save_pretrained(scratch)
            for name in Path(scratch).iterdir():
                if name.name in TOKENIZER_FILES or name.suffix == ".jinja":
                    (folder / name.name).write_bytes(name.read_bytes())
        template = self._field("tokenizer.chat_template")
        finish_tokenizer_folder(folder, {"chat_template": template,
                                         "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token})

    def has_tokenizer(self) -> bool:
        """The GGUF holds a vocabulary (tokenizer.ggml.tokens), from which write_tokenizer builds tokenizer.json."""
        return "tokenizer.ggml.tokens" in self._reader.fields

    def tokenizer_nbytes(self) -> int:
        """An upper bound for tokenizer.json: the metadata (token list, merges) as JSON, a few times over."""
        return 4 * int(min(t.data_offset for t in self._reader.tensors)) if self._reader.tensors else 0

    def identity(self) -> dict:
        return {self.path.name: sha256_file(self.path)}

    # ----------------------------------------------------------------- metadata
    def _field(self, name: str):
        """A metadata value, decoded on demand (the token list alone is 49k strings), or None."""
        if name not in self._reader.fields:
            return None
        try:
            return self._reader.fields[name].contents()
        except (ValueError, IndexError, TypeError, UnicodeDecodeError):
            return None  # unreadable metadata we do not need is not an error; needed keys are checked

    def _build_config(self) -> dict:
        family = self.family
        # a llama-architecture file has biases when llama.cpp found them (attention_bias in HF terms)
        biased = "model.layers.0.self_attn.o_proj.bias" in self._tensors
        config: dict = {"architectures": [family.architecture], "model_type": family.model_type, "hidden_act": "silu",
                        "attention_bias": biased, "mlp_bias": "model.layers.0.mlp.up_proj.bias" in self._tensors,
                        "torch_dtype": "float32", "tie_word_embeddings": LM_HEAD not in self._tensors}
        for gguf_key, hf_key in GGUF_CONFIG_KEYS.items():
            value = self._field(f"{family.gguf_architecture}.{gguf_key}")
            if value is not None:
                config[hf_key] = value
        config.setdefault("rope_theta", 10000.0)  # llama.cpp's default when the key is absent
        if "vocab_size" not in config and self._field("tokenizer.ggml.tokens") is not None:
            config["vocab_size"] = len(self._field("tokenizer.ggml.tokens"))
        for gguf_key, hf_key in TOKEN_ID_KEYS.items():
            value = self._field(f"tokenizer.ggml.{gguf_key}")
            if value is not None:
                config[hf_key] = value
        return config

    def _check_tensors(self) -> None:
        import gguf

        readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, *gguf.quants._type_traits}
        for name, tensor in self._tensors.items():  # before anything is written, not midway
            if tensor.tensor_type not in readable or tensor.tensor_type in INTEGER_TYPES:
                raise ConversionError(f"{self.path}: tensor {tensor.name!r} is of GGUF type "
                                      f"{getattr(tensor.tensor_type, 'name', tensor.tensor_type)}, which quantlite cannot read")
        present = set(self._tensors)
        missing, extra = sorted(set(self.shapes) - present), sorted(present - set(self.shapes))
        if missing:
            raise ConversionError(f"{self.path}: missing tensors {', '.join(missing[:5])} that the GGUF metadata implies")
        if extra:
            raise ConversionError(f"{self.path}: unexpected tensors {', '.join(extra[:5])} for a {self.family.model_type} model")
        for name, shape in self.shapes.items():
            # GGUF lists dimensions fastest-first: (K, N) for a weight HF stores as (N, K)
            gguf_shape = tuple(int(d) for d in reversed(self._tensors[name].shape.tolist()))
            if gguf_shape != shape:
                raise ConversionError(f"{self.path}: tensor {name!r} has shape {list(gguf_shape)}, the metadata implies {list(shape)}")


INTEGER_TYPES = {24, 25, 26, 27}  # I8, I16, I32, I64: not weights


def check_header(path: Path) -> None:
    """Walk the GGUF header (metadata and tensor infos) and refuse it before any count in it is trusted:
    a 113-byte file declaring a 2**40-element array must not make the reader allocate without end.
    Every string, array and tensor count must fit in the bytes that are left in the file."""
    def fail(message: str) -> ConversionError:
        return ConversionError(f"{path}: not a readable GGUF file ({message})")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(24)
            if len(header) < 24 or header[:4] != b"GGUF":
                raise fail("no GGUF magic")
            version, n_tensors, n_fields = struct.unpack("<IQQ", header[4:])
            if version not in (2, 3):
                raise fail(f"GGUF version {version}; quantlite reads versions 2 and 3")

            def take(count: int, what: str) -> bytes:
                if count > size - handle.tell():
                    raise fail(f"{what} of {count} bytes runs past the end of the {size}-byte file")
                return handle.read(count)

            def number(fmt: str, what: str) -> int:
                return struct.unpack("<" + fmt, take(struct.calcsize(fmt), what))[0]

            def string(what: str) -> None:
                take(number("Q", what), what)

            def value(kind: int, depth: int) -> None:
                if kind in GGUF_SCALAR_SIZES:
                    take(GGUF_SCALAR_SIZES[kind], "a value")
                elif kind == GGUF_STRING:
                    string("a string")
                elif kind == GGUF_ARRAY and depth < MAX_ARRAY_DEPTH:
                    item, count = number("I", "an array type"), number("Q", "an array length")
                    least = GGUF_SCALAR_SIZES.get(item, 8 if item == GGUF_STRING else 12)
                    if count * least > size - handle.tell():
                        raise fail(f"an array of {count} items cannot fit in the {size}-byte file")
                    if item in GGUF_SCALAR_SIZES:
                        take(count * least, "an array")
                    else:
                        for _ in range(count):
                            value(item, depth + 1)
                else:
                    raise fail(f"unknown or too deeply nested value type {kind}")

            if n_fields * 13 > size or n_tensors * 24 > size:  # the smallest field and tensor info
                raise fail(f"{n_fields} metadata fields and {n_tensors} tensors cannot fit in {size} bytes")
            for _ in range(n_fields):
                string("a key")
                value(number("I", "a value type"), 0)
            for _ in range(n_tensors):
                string("a tensor name")
                dims = number("I", "a dimension count")
                if dims > MAX_TENSOR_DIMS:
                    raise fail(f"a tensor with {dims} dimensions")
                shape = [number("Q", "a dimension") for _ in range(dims)]
                number("I", "a tensor type")
                number("Q", "a tensor offset")
                if any(d >= 2**40 for d in shape):
                    raise fail(f"a tensor of shape {shape}")
    except OSError as error:
        raise ConversionError(f"{path}: cannot read ({error.strerror or error})") from error
