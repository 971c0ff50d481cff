"""A random Llama checkpoint in Hugging Face layout, written tensor by tensor (never whole in memory).

For tests (tiny models with odd sizes) and for benchmarks/convert_memory.py (a multi-GB checkpoint whose
conversion must not need multi-GB of memory). Weights are N(0, 0.02) with a few large outliers per
matrix, like trained Linear weights; norms are near 1.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from quantlite.model_config import all_shapes, read_model_config

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 96, "intermediate_size": 200, "num_hidden_layers": 2, "num_attention_heads": 6,
    "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:  # a norm weight
        return (1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype)
    w = 0.02 * torch.randn(shape, generator=generator)
    n_outliers = max(1, w.numel() // 2000)
    where = torch.randint(0, w.numel(), (n_outliers,), generator=generator)
    w.view(-1)[where] = 0.5 * torch.randn(n_outliers, generator=generator)
    return w.to(dtype)


def write_random_llama(
    folder: str | Path,
    config: dict | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write config.json and model.safetensors (or shards of at most `max_shard_bytes` plus
    model.safetensors.index.json) for a Llama with `config` (default TINY_CONFIG). Peak memory is one shard."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(TINY_CONFIG if config is None else config)
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    generator = generator or torch.Generator().manual_seed(0)
    shapes = all_shapes(read_model_config(config, ValueError))
    (folder / "config.json").write_text(json.dumps(config, indent=2))

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if max_shard_bytes and shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes
    if len(shards) == 1:
        save_file({n: random_tensor(shapes[n], dtype, generator) for n in shards[0]}, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: random_tensor(shapes[n], dtype, generator) for n in names}, str(folder / file))
        weight_map.update(dict.fromkeys(names, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    return folder
