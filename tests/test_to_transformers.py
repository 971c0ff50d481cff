"""quantlite.to_transformers: the packed model as transformers' LlamaForCausalLM with QLinear layers,
against quantlite's own streaming runtime on the same packed folder.

Both run the same float32 math on the same weights: QLinear and the runtime call the same qmatmul on
the same QWeights, and the runtime's attention, RoPE and norms follow transformers' (test_llama_exact
holds them to 1e-4 relative in the unquantized case). So the tolerance is that case's 1e-4 relative
(max |diff| / max |logit|) on the tiny models. Greedy tokens must be identical.

SmolLM2 is worse conditioned: the two sides' float32 roundings differ (transformers' RMSNorm in torch,
the runtime's in C), and a random pair of token ids at the start of a sequence can drive its large
activations so that an ulp becomes 1e-4 of the largest logit. Measured over 69 draws of (2, 11) random
ids: a median of 2e-6, 7e-5 for the worst of 60, and 1.55e-4 for one draw (seed 1488205912; 9.1e-5
there with session 12's code, before the prefill GEMM): so 1e-3 for SmolLM2.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import quantlite  # noqa: E402
from quantlite.errors import FormatError  # noqa: E402
from quantlite.qlinear import QLinear  # noqa: E402
from test_llama_exact import BASE, build_checkpoint, relative_error  # noqa: E402


def assert_matches_runtime(packed_dir, hf_model, generator, vocab: int, tolerance: float = 1e-4) -> None:
    input_ids = torch.randint(0, vocab, (2, 11), generator=generator)
    prompt = input_ids[0, :6]
    with quantlite.load(packed_dir) as runtime, torch.no_grad():
        expected = runtime(input_ids)
        logits = hf_model(input_ids).logits
        assert logits.dtype == torch.float32 and logits.shape == expected.shape
        assert relative_error(logits, expected) <= tolerance
        greedy = hf_model.generate(prompt[None], max_new_tokens=10, do_sample=False)[0, len(prompt):]
        assert greedy.tolist() == runtime.generate(prompt.tolist(), max_new_tokens=10).token_ids[0]


@pytest.mark.parametrize("tied, width", [(False, "q8"), (True, "q4"), (False, "q4"), (True, "float")])
def test_logits_and_greedy_tokens_equal_the_runtime(tmp_path, generator, tied, width):
    """Head and embedding stored as `width` (int8, 4-bit or float), the layers in 4 bits."""
    _, folder = build_checkpoint(tmp_path, generator, tie_word_embeddings=tied, attention_bias=True, mlp_bias=True)
    quantlite.convert(folder, tmp_path / "packed", head=width, embedding=width, progress=False)
    model = quantlite.to_transformers(tmp_path / "packed")

    assert type(model) is transformers.LlamaForCausalLM and not model.training
    layers = model.model.layers
    assert all(isinstance(getattr(layer.self_attn, p), QLinear) for layer in layers for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert all(isinstance(getattr(layer.mlp, p), QLinear) for layer in layers for p in ("gate_proj", "up_proj", "down_proj"))
    assert layers[0].self_attn.q_proj.bias is not None and layers[1].mlp.down_proj.bias is not None
    # no dense copy of a quantized Linear: the only 2-D float Parameters are the embedding and a plain head
    matrices = {id(p) for p in model.parameters() if p.dim() == 2}
    dense_head = not isinstance(model.lm_head, QLinear)
    assert matrices == {id(model.model.embed_tokens.weight)} | ({id(model.lm_head.weight)} if dense_head else set())
    assert isinstance(model.lm_head, QLinear) == (width == "q4")  # an int8 head is dequantized
    if tied and width == "float":
        assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(not t.is_meta and t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])

    assert_matches_runtime(tmp_path / "packed", model, generator, BASE["vocab_size"])


def test_gradients_reach_the_input_side_through_qlinear(tmp_path, generator):
    """What an adapter trained on top needs: the loss differentiates through every QLinear."""
    _, folder = build_checkpoint(tmp_path, generator)
    quantlite.convert(folder, tmp_path / "packed", progress=False)
    model = quantlite.to_transformers(tmp_path / "packed")
    input_ids = torch.randint(0, BASE["vocab_size"], (1, 9), generator=generator)
    model(input_ids, labels=input_ids).loss.backward()
    first_norm = model.model.layers[0].input_layernorm.weight  # before every QLinear of the model
    assert first_norm.grad is not None and bool(first_norm.grad.abs().sum() > 0)


def test_a_folder_that_is_not_packed_is_refused(tmp_path):
    with pytest.raises(FormatError, match="not a packed quantlite model"):
        quantlite.to_transformers(tmp_path)


@pytest.mark.slow  # a 4-bit conversion of a 135M model
def test_smollm2_matches_the_runtime(smollm2_gguf, tmp_path, generator):
    quantlite.convert(smollm2_gguf, tmp_path / "packed", calibration="none", progress=False)  # about the export
    model = quantlite.to_transformers(tmp_path / "packed")
    assert_matches_runtime(tmp_path / "packed", model, generator, model.config.vocab_size, tolerance=1e-3)


def test_text_generation_pipeline_answers_as_the_runtime(stories260k_hf, tmp_path):
    """stories260K (../shared/data) has a real tokenizer: the transformers pipeline on top of the
    converted model writes the runtime's greedy continuation."""
    quantlite.convert(stories260k_hf, tmp_path / "packed", progress=False)
    model = quantlite.to_transformers(tmp_path / "packed")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "packed" / "tokenizer")
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    prompt = "Once upon a time"
    (answer,) = pipe(prompt, max_new_tokens=16, do_sample=False)
    with quantlite.load(tmp_path / "packed") as runtime:
        expected = runtime.generate([prompt], max_new_tokens=16).texts[0]
    assert answer["generated_text"] == prompt + expected


def test_lora_adapter_on_qlinear_layers(tmp_path, generator):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    from quantlite.integrations.peft import LoraQLinear, lora_config
    from test_triton_qmatmul import UNIT_ROUNDOFF

    _, folder = build_checkpoint(tmp_path, generator)
    quantlite.convert(folder, tmp_path / "packed", progress=False)
    model = quantlite.to_transformers(tmp_path / "packed")
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=generator)
    with torch.no_grad():
        base_logits = model(input_ids).logits
    adapted = peft.get_peft_model(model, lora_config(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    layer = adapted.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoraQLinear) and isinstance(layer.base_layer, QLinear)
    with torch.no_grad():  # B starts at zero: the adapted model is the base model
        assert torch.equal(adapted(input_ids).logits, base_logits)

    adapted(input_ids, labels=input_ids).loss.backward()
    trained = {name for name, p in adapted.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in name for name in trained)
    assert all(adapted.get_parameter(name).grad is not None for name in trained)

    with torch.no_grad():  # y = QLinear(x) + scaling * x @ A.T @ B.T, against float64
        layer.lora_B["default"].weight.normal_(generator=generator)
        x = torch.randn(5, BASE["hidden_size"], generator=generator)
        a, b = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        scaling = layer.scaling["default"]
        w64 = layer.base_layer.qweight.dequantize(torch.float64)  # (N, K)
        x64 = x.double()
        assert layer.base_layer.bias is None  # no attention bias in this checkpoint
        expected = x64 @ w64.T + scaling * (x64 @ a.T @ b.T)  # (5, N)
        magnitude = x64.abs() @ w64.abs().T + scaling * ((x64.abs() @ a.abs().T) @ b.abs().T)
        # float32 sums of K terms (base), K then r terms (adapter), and the final additions
        bound = (BASE["hidden_size"] + 4 + 4) * UNIT_ROUNDOFF[torch.float32] * magnitude
        assert bool(((layer(x).double() - expected).abs() <= bound).all())
