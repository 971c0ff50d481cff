"""The streaming runtime against transformers' LlamaForCausalLM (code nobody here wrote).

Each case builds a tiny random-weight Llama with transformers, saves it as a safetensors checkpoint,
converts it with `quantlite.convert` and loads it with `quantlite.load`.

Tolerances:
  * unquantized (--no-quantize): both sides run the same float32 math in a different order (SDPA vs
    SDPA with our mask, separate vs fused reductions), so the logits differ by float32 rounding only:
    max |diff| / max |logit| <= 1e-4 (observed ~1e-7), and greedy tokens are identical;
  * quantized: transformers runs the same model with each Linear weight replaced by qw.dequantize()
    of the very QWeight the runtime uses, so only the matmul order differs: <= 1e-3.
"""
from __future__ import annotations

import json
import os
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

import quantlite  # noqa: E402
from quantlite.q8weight import Q8Weight  # noqa: E402
from quantlite.qweight import QWeight  # noqa: E402

BASE = dict(
    vocab_size=131, hidden_size=80, intermediate_size=152, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, eos_token_id=None, bos_token_id=None,
)
# hidden 80 is not a multiple of the block size 64 in any of them
CASES = {
    "mha-untied-default-old-spelling": dict(num_key_value_heads=4, rope_theta=500.0, old_spelling=True),
    "gqa-tied-linear": dict(tie_word_embeddings=True, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
    "mqa-dynamic": dict(num_key_value_heads=1, rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 1e4}),
    "gqa-llama3-bias": dict(
        attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "head-dim-explicit-llama3-old-spelling": dict(
        head_dim=24, old_spelling=True,
        rope_parameters={"rope_type": "llama3", "factor": 4.0, "rope_theta": 1e4, "low_freq_factor": 1.0,
                         "high_freq_factor": 2.0, "original_max_position_embeddings": 8},
    ),
}


def module_generator() -> torch.Generator:
    """A fresh random generator for a module-scoped fixture (the `generator` fixture is per test)."""
    seed = int(os.environ.get("QUANTLITE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"module random seed: {seed} (replay with QUANTLITE_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def build_checkpoint(tmp_path, generator, old_spelling=False, **overrides):
    """A random-weight LlamaForCausalLM saved as safetensors; returns (model, folder)."""
    config = transformers.LlamaConfig(**{**BASE, **overrides})
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # larger than the init std so attention is far from uniform
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    folder = tmp_path / "hf"
    model.save_pretrained(folder, safe_serialization=True)
    if old_spelling:  # the transformers < 5 spelling of the same settings
        saved = json.loads((folder / "config.json").read_text())
        rope = saved.pop("rope_parameters")
        saved["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            saved["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
        (folder / "config.json").write_text(json.dumps(saved))
    return model, folder


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


def load_packed_weights(reference, packed) -> int:
    """Copy every tensor of `packed` (a PackedModel), dequantized to float32, into the transformers
    model `reference`: layers, embedding, final norm and an untied head. Returns how many layer
    weights were 4-bit QWeights."""
    def as_float(value):
        return value.dequantize() if isinstance(value, (QWeight, Q8Weight)) else value.float()

    quantized = 0
    with torch.no_grad():
        for index, layer in enumerate(reference.model.layers):
            for name, value in packed.load_layer(index).items():
                layer.get_parameter(name).copy_(as_float(value))
                quantized += isinstance(value, QWeight)
        reference.model.embed_tokens.weight.copy_(as_float(packed.load_embedding()))  # tied: the head is this table
        final = packed.load_final()
        reference.model.norm.weight.copy_(as_float(final["model.norm.weight"]))
        if "lm_head.weight" in final:
            reference.lm_head.weight.copy_(as_float(final["lm_head.weight"]))
    return quantized


def assert_greedy_tokens_agree(reference, prompt: list[int], ours: list[int], greedy: list[int], rel: float = 1e-4) -> None:
    """`ours` are greedy tokens of the reference model up to ties: equal to transformers' `greedy`, or,
    from the first step where they part, every token of ours is within `rel` x max|logit| of the
    reference's best logit given the same prefix (teacher-forced). Random-weight models meet near-ties
    (two logits closer than the float32 rounding of the two computations) a few times in a hundred runs;
    this tells a tie from a wrong token."""
    assert len(ours) == len(greedy), (ours, greedy)
    if ours == greedy:
        return
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + ours])).logits[0, len(prompt) - 1:-1].double()  # (new, vocab)
    chosen = logits.gather(1, torch.tensor(ours)[:, None])[:, 0]
    shortfall = logits.max(dim=1).values - chosen
    assert float(shortfall.max()) <= rel * float(logits.abs().max()), (ours, greedy, shortfall.tolist())


@pytest.mark.parametrize("case", list(CASES))
def test_unquantized_logits_and_greedy_tokens_match_transformers(case, tmp_path, generator):
    options = dict(CASES[case])
    reference, folder = build_checkpoint(tmp_path, generator, **options)
    quantlite.convert(folder, tmp_path / "packed", no_quantize=True, progress=False)
    seq = 2 * BASE["max_position_embeddings"] - 5  # past max_position_embeddings: dynamic NTK kicks in
    input_ids = torch.randint(0, BASE["vocab_size"], (2, seq), generator=generator)

    with quantlite.load(tmp_path / "packed", memory_budget="1GB") as model, torch.no_grad():
        ours = model(input_ids)
        expected = reference(input_ids).logits
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        assert relative_error(ours, expected) <= 1e-4

        prompt = input_ids[0, :7]
        generated = model.generate(prompt.tolist(), max_new_tokens=12)
        greedy = reference.generate(prompt[None], max_new_tokens=12, do_sample=False)[0, 7:]
        assert_greedy_tokens_agree(reference, prompt.tolist(), generated.token_ids[0], greedy.tolist())


@pytest.mark.parametrize("tied, width", [(False, "q8"), (True, "q4"), (False, "float")])
def test_quantized_matches_transformers_on_dequantized_weights(tmp_path, generator, tied, width):
    """Layers in 4 bits, the head and embedding as `width`, norms in bfloat16 (a float32 source):
    transformers given the same dequantized weights computes the same logits."""
    reference, folder = build_checkpoint(tmp_path, generator, tie_word_embeddings=tied, attention_bias=True)
    quantlite.convert(folder, tmp_path / "packed", head=width, embedding=width, progress=False)
    packed = quantlite.PackedModel.open(tmp_path / "packed")
    assert type(packed.load_embedding()) is {"q8": Q8Weight, "q4": QWeight, "float": torch.Tensor}[width]
    final = packed.load_final()
    assert final["model.norm.weight"].dtype == torch.bfloat16  # a float32 source's floats go to 16 bits
    assert ("lm_head.weight" in final) == (not tied)
    assert load_packed_weights(reference, packed) == 7 * BASE["num_hidden_layers"]  # every Linear of every layer is a QWeight

    input_ids = torch.randint(0, BASE["vocab_size"], (3, 19), generator=generator)
    with quantlite.load(tmp_path / "packed") as model, torch.no_grad():
        assert relative_error(model(input_ids), reference(input_ids).logits) <= 1e-3


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"model_type": "gpt_neox"}, "model_type"),
        ({"num_key_value_heads": 3}, "multiple"),
        ({"hidden_size": None}, "hidden_size"),
    ],
)
def test_configs_it_cannot_run_exactly_are_refused(change, message):
    from quantlite.model_config import ModelConfigError, read_model_config

    config = {**BASE, "model_type": "llama", "hidden_act": "silu", **change}
    with pytest.raises(ModelConfigError, match=message):
        read_model_config(config)
