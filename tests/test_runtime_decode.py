"""The decode path's fast forms: fused projections, concat_rows, the decode thread policy, the step split.

Reference for the fused projections: the same layer with its projections unfused. Both compute every
output element as the same dot product of the same float32 values; only the summation order inside
a matmul may differ (MKL blocks a taller matrix differently), so they agree to float32 rounding of a
K-term sum: |diff| <= K * eps * sum |x_k w_k|, bounded here by 1e-5 relative to the largest output
(K = 80, eps = 1.2e-7, with room for the sums' size).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import quantlite
from quantlite import quantize
from quantlite.qweight import SCALE_GROUP_SIZE, QWeight, concat_rows
from quantlite.runtime import llama
from test_llama_exact import BASE, assert_greedy_tokens_agree, build_checkpoint, load_packed_weights, module_generator

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ concat_rows
@pytest.mark.parametrize("rows", [(7, 5, 3), (SCALE_GROUP_SIZE, 40)])  # groups misaligned / aligned (1 block a row)
def test_concat_rows_dequantizes_to_the_stacked_parts(generator, rows):
    k = 64 if rows[0] == SCALE_GROUP_SIZE else 150  # 150: padded blocks of 64
    parts = [quantize(torch.randn(n, k, generator=generator) * 0.1, outlier_frac=0.02) for n in rows]
    assert all(p.double_quant for p in parts)
    joined = concat_rows(parts)
    assert joined.shape == (sum(rows), k)
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))
    # whole groups of 256 scales keep the stored form; otherwise the scales are decoded once
    assert joined.double_quant == (rows[0] == SCALE_GROUP_SIZE)
    assert joined.n_outliers == sum(p.n_outliers for p in parts) > 0
    QWeight.from_dict(joined.to_dict())  # a valid QWeight by the format's own checks


def test_concat_rows_refuses_parts_that_differ(generator):
    a = quantize(torch.randn(4, 64, generator=generator))
    b = quantize(torch.randn(4, 64, generator=generator), block_size=32)
    with pytest.raises(ValueError, match="block size"):
        concat_rows([a, b])


# ------------------------------------------------------------------------------ fuse_projections
@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A random Llama (GQA, attention and MLP biases) converted three times: quantized with a 4-bit
    tied head and embedding (every matmul native), with convert's defaults (an int8 tied head, also
    native), and unquantized."""
    tmp_path = tmp_path_factory.mktemp("decode")
    reference, folder = build_checkpoint(tmp_path, module_generator(), tie_word_embeddings=True,
                                         attention_bias=True, mlp_bias=True)
    quantlite.convert(folder, tmp_path / "q4", embedding="q4", head="q4", progress=False)
    quantlite.convert(folder, tmp_path / "default", progress=False)
    quantlite.convert(folder, tmp_path / "float", no_quantize=True, progress=False)
    return reference, tmp_path


@pytest.mark.parametrize("kind", ["q4", "float"])
def test_fused_layer_equals_the_unfused_layer(model_dirs, generator, kind):
    _, tmp_path = model_dirs
    packed = quantlite.PackedModel.open(tmp_path / kind)
    config = packed.model_config
    weights = {name: value if isinstance(value, QWeight) else value.float() for name, value in packed.load_layer(0).items()}
    fused = llama.fuse_projections(weights)
    assert "self_attn.qkv_proj.weight" in fused and "mlp.gate_up_proj.bias" in fused
    assert not any(name.startswith(("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj")) for name in fused)
    x = torch.randn(2, 9, config.hidden_size, generator=generator)
    cos, sin = llama.rope_cos_sin(config, torch.arange(9).expand(2, 9), torch.float32)
    with torch.no_grad():
        ours = llama.decoder_layer(x, fused, config, cos, sin)
        reference = llama.decoder_layer(x, weights, config, cos, sin)
    assert float((ours - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_fuse_fills_a_missing_bias_with_zeros(generator):
    w = {f"self_attn.{p}_proj.weight": torch.randn(8, 16, generator=generator) for p in "qkv"}
    w["self_attn.k_proj.bias"] = torch.randn(8, generator=generator)
    fused = llama.fuse_projections(w)
    bias = fused["self_attn.qkv_proj.bias"]
    assert torch.equal(bias[8:16], w["self_attn.k_proj.bias"]) and not bias[:8].any() and not bias[16:].any()


# ------------------------------------------------------------------------------ decode steps
def test_quantized_greedy_decode_matches_transformers(model_dirs):
    """Every matmul native (so decode runs with torch on one thread): the greedy tokens of transformers
    on the dequantized weights, and torch's thread count restored after."""
    reference, tmp_path = model_dirs
    load_packed_weights(reference, quantlite.PackedModel.open(tmp_path / "q4"))
    prompt = [5, 17, 3, 99, 42, 7]
    threads = torch.get_num_threads()
    seen = []
    with quantlite.load(tmp_path / "q4") as model:
        result = model.generate(prompt, max_new_tokens=10,
                                on_token=lambda row, token: seen.append(torch.get_num_threads()))
    greedy = reference.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt):]
    assert_greedy_tokens_agree(reference, prompt, result.token_ids[0], greedy.tolist(), rel=1e-3)  # quantized: 1e-3, as test_llama_exact
    assert torch.get_num_threads() == threads
    assert seen == [1] * len(seen)  # inside the decode loop torch runs on one thread

    with quantlite.load(tmp_path / "default") as model:  # the int8 head's kernel is native: the same policy
        seen_default = []
        model.generate(prompt, max_new_tokens=4, on_token=lambda row, token: seen_default.append(torch.get_num_threads()))
    assert seen_default == [1] * len(seen_default) and seen_default

    s = result.stats
    assert s.decode_steps == 9 and s.decode_matmul_seconds > 0 and s.decode_attention_seconds > 0
    assert s.decode_matmul_seconds + s.decode_attention_seconds <= s.decode_seconds


def test_float_weights_keep_torch_threads(model_dirs):
    _, tmp_path = model_dirs
    threads = torch.get_num_threads()
    seen = []
    with quantlite.load(tmp_path / "float") as model:
        model.generate([1, 2, 3], max_new_tokens=4, on_token=lambda row, token: seen.append(torch.get_num_threads()))
    assert set(seen) == {threads}


def test_runtime_imports_neither_scipy_nor_triton_on_a_cpu_machine(model_dirs):
    """Each costs a CPU process 70-100 MB of RSS and the runtime needs neither there (docs/runtime.md)."""
    _, tmp_path = model_dirs
    code = ("import sys, quantlite; m = quantlite.load(sys.argv[1]); m.generate([1, 2], max_new_tokens=2); "
            "print(sorted(name for name in ('scipy', 'triton') if name in sys.modules))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "q4")], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    imported = done.stdout.strip().splitlines()[-1]
    assert "scipy" not in imported
    assert torch.cuda.is_available() or "triton" not in imported
