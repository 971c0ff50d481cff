"""Turn a llama2.c checkpoint (legacy version-0 export, e.g. stories260K.bin) and its SentencePiece
tokenizer (tok512.model) into a Hugging Face Llama folder: config.json, model.safetensors and the
tokenizer files, so transformers and `quantlite convert` can read it.

The llama2.c file (run.c's layout): 7 little-endian int32 (dim, hidden_dim, n_layers, n_heads,
n_kv_heads, vocab_size, seq_len), then float32 arrays in this order:
    token_embedding (vocab, dim)       rms_att  (L, dim)            wq (L, dim, dim)
    wk (L, kv_dim, dim)                wv (L, kv_dim, dim)          wo (L, dim, dim)
    rms_ffn (L, dim)                   w1 (L, hidden, dim)          w2 (L, dim, hidden)
    w3 (L, hidden, dim)                rms_final (dim,)
    freq_cis_real, freq_cis_imag (seq_len, head_size / 2)          (recomputed by HF: skipped)
    wcls (vocab, dim)                  only when vocab_size < 0 (untied classifier)
llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ... of each head; HF Llama rotates the two
halves (x_i, x_{i + head_size/2}). The q and k rows are permuted so both give the same result
(the same permutation as transformers' convert_llama_weights_to_hf.py, inverted).

Example:
  python scripts/llama2c_to_hf.py ../shared/data/stories260K.bin ../shared/data/tok512.model ./stories260K-hf
  quantlite ppl ./stories260K-hf --data ../shared/data/tinystories_valid_sample.txt --ctx 512
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np
import torch

HEADER = struct.Struct("<7i")
VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c's newer export versions, not this legacy layout
RMS_NORM_EPS = 1e-5           # run.c's rmsnorm
ROPE_THETA = 10000.0          # run.c's RoPE base
BOS_ID, EOS_ID = 1, 2         # llama2.c tokenizers: 1 = "<s>", 2 = "</s>"


class Llama2cFormatError(ValueError):
    """The file is not a legacy llama2.c checkpoint this script can read."""


def read_llama2c(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, HF-named float32 tensors) of a legacy llama2.c checkpoint."""
    raw = path.read_bytes()
    if len(raw) < HEADER.size:
        raise Llama2cFormatError(f"{path}: {len(raw)} bytes, too short for the 28-byte llama2.c header")
    if struct.unpack_from("<I", raw)[0] == VERSIONED_MAGIC:
        raise Llama2cFormatError(f"{path}: a versioned llama2.c export (magic 'ak42'); only the legacy version-0 layout is supported")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = HEADER.unpack_from(raw)
    shared_classifier = vocab > 0
    vocab = abs(vocab)
    if min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0 or dim % n_heads or n_heads % n_kv_heads:
        raise Llama2cFormatError(
            f"{path}: implausible header dim={dim} hidden_dim={hidden} n_layers={n_layers} n_heads={n_heads} "
            f"n_kv_heads={n_kv_heads} vocab_size={vocab} seq_len={seq_len}"
        )
    head_size = dim // n_heads
    kv_dim = head_size * n_kv_heads
    shapes = [
        ("embed", (vocab, dim)), ("rms_att", (n_layers, dim)), ("wq", (n_layers, dim, dim)),
        ("wk", (n_layers, kv_dim, dim)), ("wv", (n_layers, kv_dim, dim)), ("wo", (n_layers, dim, dim)),
        ("rms_ffn", (n_layers, dim)), ("w1", (n_layers, hidden, dim)), ("w2", (n_layers, dim, hidden)),
        ("w3", (n_layers, hidden, dim)), ("rms_final", (dim,)),
        ("freq_cis_real", (seq_len, head_size // 2)), ("freq_cis_imag", (seq_len, head_size // 2)),
    ]
    if not shared_classifier:
        shapes.append(("wcls", (vocab, dim)))
    expected = HEADER.size + 4 * sum(int(np.prod(shape)) for _, shape in shapes)
    if len(raw) != expected:
        raise Llama2cFormatError(f"{path}: {len(raw)} bytes, but the header implies {expected}")
    floats = np.frombuffer(raw, dtype="<f4", offset=HEADER.size)
    arrays, offset = {}, 0
    for name, shape in shapes:
        size = int(np.prod(shape))
        arrays[name] = torch.from_numpy(floats[offset : offset + size].copy()).view(shape)
        offset += size

    def to_halves(w: torch.Tensor, heads: int) -> torch.Tensor:
        """(heads * head_size, dim) rows in interleaved-pair order -> rotate-half order per head."""
        return w.view(heads, head_size // 2, 2, dim).transpose(1, 2).reshape(heads * head_size, dim)

    tensors = {"model.embed_tokens.weight": arrays["embed"], "model.norm.weight": arrays["rms_final"]}
    for i in range(n_layers):
        p = f"model.layers.{i}."
        tensors[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        tensors[p + "self_attn.q_proj.weight"] = to_halves(arrays["wq"][i], n_heads)
        tensors[p + "self_attn.k_proj.weight"] = to_halves(arrays["wk"][i], n_kv_heads)
        tensors[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        tensors[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        tensors[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
        tensors[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        tensors[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        tensors[p + "mlp.up_proj.weight"] = arrays["w3"][i]
    if not shared_classifier:
        tensors["lm_head.weight"] = arrays["wcls"]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": dim,
        "intermediate_size": hidden, "num_hidden_layers": n_layers, "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads, "head_dim": head_size, "vocab_size": vocab,
        "max_position_embeddings": seq_len, "rms_norm_eps": RMS_NORM_EPS, "rope_theta": ROPE_THETA,
        "hidden_act": "silu", "tie_word_embeddings": shared_classifier, "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID, "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    return config, {name: t.contiguous() for name, t in tensors.items()}


def write_tokenizer(sentencepiece_model: Path, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json converted from the SentencePiece model; BOS is put
    before every text, as llama2.c's encode(..., bos=1) does."""
    from transformers import LlamaTokenizer

    staging = out / ".spm"
    staging.mkdir(exist_ok=True)
    try:
        shutil.copyfile(sentencepiece_model, staging / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(staging, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(out)
    finally:
        shutil.rmtree(staging)
    shutil.copyfile(sentencepiece_model, out / "tokenizer.model")


def convert(checkpoint: Path, sentencepiece_model: Path, out: Path) -> None:
    from safetensors.torch import save_file

    config, tensors = read_llama2c(checkpoint)
    if not sentencepiece_model.is_file():
        raise FileNotFoundError(f"{sentencepiece_model}: no such SentencePiece model")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(sentencepiece_model, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="llama2.c checkpoint (legacy layout), e.g. stories260K.bin")
    parser.add_argument("tokenizer", type=Path, help="SentencePiece model, e.g. tok512.model")
    parser.add_argument("out", type=Path, help="output folder (created; existing files are overwritten)")
    args = parser.parse_args(argv)
    try:
        convert(args.checkpoint, args.tokenizer, args.out)
    except (Llama2cFormatError, OSError) as error:
        print(f"llama2c_to_hf: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: config.json, model.safetensors, tokenizer files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
