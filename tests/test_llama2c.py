"""scripts/llama2c_to_hf.py: the llama2.c stories260K checkpoint becomes an HF Llama folder that
greedily decodes exactly the tokens llama2.c's run.c produces (golden ids from ../shared/data/README.md)."""

import pytest
import torch

from conftest import load_llama2c_script

# README.md of the shared data: greedy decoding from BOS with llama2.c's run.c, first 24 ids.
GOLDEN_IDS = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292]
GOLDEN_TEXT = "Once upon a time, there was a little girl named Lily."


def test_greedy_decode_matches_llama2c(stories260k_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories260k_hf)
    out = model.generate(torch.tensor([[1]]), max_new_tokens=len(GOLDEN_IDS), do_sample=False)
    assert out[0, 1:].tolist() == GOLDEN_IDS
    assert tokenizer.decode(GOLDEN_IDS).startswith(GOLDEN_TEXT)
    # the tokenizer puts BOS first, as llama2.c's encode(bos=1) does, and splits like SentencePiece
    assert tokenizer("Once upon a time").input_ids == [1, *GOLDEN_IDS[:4]]


def test_streaming_runtime_decodes_the_golden_ids(stories260k_hf, tmp_path):
    """Our own runtime, not transformers: the float conversion of stories260K, greedy from BOS through
    the KV cache, gives llama2.c's ids; so does the prompt's first pass (one forward, no cache)."""
    import quantlite

    quantlite.convert(stories260k_hf, tmp_path / "packed", no_quantize=True, progress=False)
    with quantlite.load(tmp_path / "packed") as model:
        result = model.generate([1], max_new_tokens=len(GOLDEN_IDS))
        assert result.token_ids[0] == GOLDEN_IDS
        assert model.tokenizer.decode(result.token_ids[0]).startswith(GOLDEN_TEXT)
        logits = model(torch.tensor([[1, *GOLDEN_IDS[:-1]]]))  # (1, 24, vocab)
        assert logits[0].argmax(-1).tolist() == GOLDEN_IDS


def test_config_describes_the_checkpoint(stories260k_hf):
    import json

    config = json.loads((stories260k_hf / "config.json").read_text())
    # header of stories260K.bin (README.md): dim 64, hidden 172, 5 layers, 8 heads, 4 KV heads, vocab 512, seq 512
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]) == (64, 172, 5)
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == (8, 4, 512)
    assert config["tie_word_embeddings"] is True and config["max_position_embeddings"] == 512


def test_rejects_bad_files(shared_data, tmp_path):
    script = load_llama2c_script()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes((shared_data / "stories260K.bin").read_bytes()[:5000])
    with pytest.raises(script.Llama2cFormatError, match="header implies"):
        script.read_llama2c(truncated)
    versioned = tmp_path / "v1.bin"
    versioned.write_bytes(b"24ka" + bytes(252))
    with pytest.raises(script.Llama2cFormatError, match="versioned"):
        script.read_llama2c(versioned)
    assert script.main([str(tmp_path / "missing.bin"), str(shared_data / "tok512.model"), str(tmp_path / "out")]) == 2
