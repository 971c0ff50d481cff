"""QLinear and quantize_model: a drop-in nn.Linear, and a random transformers Llama that still
generates after quantize_model and matches the same model with dequantized dense weights."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from quantlite.errors import QuantizationInputError
from quantlite.qlinear import QLinear, quantize_model
from test_triton_qmatmul import assert_close_to_float64

# Reference and QLinear both run in float32 over the same dequantized weights; they differ only in
# summation order (the native CPU kernel, when live, blocks K differently from F.linear). Logits
# of this tiny model are O(1) after ~10 float32 layers of O(100)-term sums: 1e-4 is ~1000 units of
# float32 roundoff, while quantization itself moves the logits by ~1e-2 (asserted below).
LOGIT_ATOL = 1e-4
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # the GPU script runs this file on a GPU


def tiny_llama(generator: torch.Generator):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=136, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, eos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # weights of unit-ish scale so that 4-bit error is visible in the logits
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[1] ** 0.5)
    return model


def dequantized_twin(model: nn.Module) -> nn.Module:
    """A copy of a quantized model with each QLinear back as nn.Linear holding dequantize()."""
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, QLinear):
            dense = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            dense.weight.data = module.dequantize()
            if module.bias is not None:
                dense.bias.data = module.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, dense)
    return twin


def test_from_linear_keeps_bias_and_matches_reference(generator):
    linear = nn.Linear(100, 23)
    with torch.no_grad():
        linear.bias.copy_(torch.randn(23, generator=generator))
    qlinear = QLinear.from_linear(linear, block_size=32, outlier_frac=0.01)
    assert (qlinear.in_features, qlinear.out_features) == (100, 23)
    assert torch.equal(qlinear.bias, linear.bias)
    x = torch.randn(4, 7, 100, generator=generator)
    y = qlinear(x)
    assert y.shape == (4, 7, 23)
    assert_close_to_float64((y - qlinear.bias).reshape(28, 23), x.reshape(28, 100), qlinear.qweight)


@pytest.mark.parametrize("device", DEVICES)
def test_quantized_llama_matches_dequantized_reference_and_generates(device, generator):
    model = tiny_llama(generator)
    original = copy.deepcopy(model).to(device)
    quantize_model(model, progress=False)
    model.to(device)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QLinear), "lm_head is skipped"
    assert isinstance(model.model.layers[1].mlp.down_proj, QLinear)
    assert sum(isinstance(m, QLinear) for m in model.modules()) == 2 * 7
    reference = dequantized_twin(model)

    ids = torch.randint(0, 96, (2, 9), generator=generator).to(device)
    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
        unquantized = original(ids).logits
    assert (logits - expected).abs().max() < LOGIT_ATOL
    assert (logits - unquantized).abs().max() > 100 * LOGIT_ATOL, "quantize_model changed nothing"

    prompt = ids[:1, :4]
    # an explicit mask: without one, generate() takes every id equal to pad_token_id (0) for padding
    tokens = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                            pad_token_id=0)
    assert tokens.shape == (1, 14) and torch.equal(tokens[:, :4], prompt)
    # Greedy tokens of the quantized model are the reference's argmax at each step, up to a tie
    # within the logit tolerance (teacher forcing on the reference avoids flaky near-ties).
    with torch.no_grad():
        steps = reference(tokens[:, :-1]).logits[0, 3:]  # (10, vocab): logits that chose tokens 4..13
    chosen = steps.gather(1, tokens[0, 4:, None]).squeeze(1)
    assert bool((chosen >= steps.max(dim=1).values - 2 * LOGIT_ATOL).all())


def test_skip_by_full_or_last_name(generator):
    model = tiny_llama(generator)
    quantize_model(model, skip=("down_proj", "model.layers.0.self_attn.q_proj"), progress=False)
    assert isinstance(model.lm_head, QLinear), "an explicit skip replaces the default ('lm_head',)"
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert isinstance(model.model.layers[1].self_attn.q_proj, QLinear)


def test_state_dict_round_trip_and_dtype_cast(generator):
    source = QLinear.from_linear(nn.Linear(64, 12), block_size=32, outlier_frac=0.02)
    state = source.state_dict()
    assert {"bias", "qweight.codes", "qweight.outlier_vals", "qweight.meta"} <= set(state)
    target = QLinear.from_linear(nn.Linear(64, 12), block_size=32)
    target.load_state_dict(state, strict=True)
    x = torch.randn(3, 64, generator=generator)
    assert torch.equal(target(x), source(x))

    codes = source.qweight.codes
    source.half()  # casts the bias, never the codes or scales
    assert source.bias.dtype == torch.float16 and source.qweight.codes is codes
    assert source(x.half()).dtype == torch.float16
    source.to("meta")  # a device move takes the QWeight along (meta: a device this CPU machine has)
    assert source.qweight.device.type == "meta" and source.qweight.codes.dtype == torch.uint8


def test_linear_subclasses_are_left_alone():
    attention = nn.MultiheadAttention(16, 2)  # its out_proj is a Linear subclass read via .weight
    block = nn.Sequential(nn.Linear(16, 16), attention)
    quantize_model(block, progress=False)
    assert isinstance(block[0], QLinear) and type(attention.out_proj) is not QLinear


def test_errors():
    with pytest.raises(QuantizationInputError, match="needs an nn.Linear"):
        QLinear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(QuantizationInputError, match="meta device"):
        QLinear.from_linear(nn.Linear(64, 8, device="meta"))
    with pytest.raises(QuantizationInputError, match="itself an nn.Linear"):
        quantize_model(nn.Linear(64, 8))
    with pytest.raises(QuantizationInputError, match="block_size 40"):
        quantize_model(nn.Sequential(nn.Linear(64, 8)), block_size=40, progress=False)
    with pytest.raises(QuantizationInputError, match="bias has shape"):
        QLinear(QLinear.from_linear(nn.Linear(64, 8)).qweight, torch.zeros(9))
