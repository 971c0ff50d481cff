"""convert(..., calibration=TEXT): the decoder layers in GPTQ's sequential order — E[x x^T] of every
Linear's input over the text, reached through the layers before as written (quantized), then every
Linear quantized with it exactly as quantize(w, importance=...) does; recorded in the manifest."""

import json

import pytest
import torch

from quantlite.calibration import (
    RANDOM_CALIBRATION_PRIOR, RANDOM_TOKEN_EXPONENT, RANDOM_TOKEN_RANK_OFFSET, collect_input_stats, iter_layer_input_stats,
    random_token_ids, token_frequency_ranks, with_identity_prior,
)
from quantlite.converter import convert
from quantlite.errors import ConversionError
from quantlite.packed import PackedModel
from quantlite.quantizer import quantize
from quantlite.qweight import QWeight
from quantlite.sources import open_source


@pytest.fixture
def calibration_text(shared_data, tmp_path):
    # the end of the TinyStories sample: the perplexity tests evaluate its start
    text = (shared_data / "tinystories_valid_sample.txt").read_text(encoding="utf-8")[-40000:]
    path = tmp_path / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_calibrated_conversion_quantizes_each_layer_with_its_sequential_statistics(stories260k_hf, calibration_text,
                                                                                   tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "packed"
    summary = convert(stories260k_hf, out, calibration=calibration_text, calibration_windows=4,
                      calibration_ctx=256, progress=False)
    calibration = summary.manifest["quantization"]["calibration"]
    assert calibration["windows"] == 4 and calibration["ctx"] == 256 and len(calibration["sha256"]) == 64
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # nothing left besides the model
    packed = PackedModel.open(out)
    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(stories260k_hf)(calibration_text.read_text(), return_tensors="pt").input_ids[0]
    float_stats = collect_input_stats(model, ids, ctx=256, max_windows=4, full=True, progress=False)

    # Layer 0 has no layer before it: its statistics are those of transformers' own forward pass
    # (hooks on its nn.Linear modules), bit for bit, so the stored codes are quantize()'s.
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        w = model.state_dict()[f"model.layers.0.{name}"]
        expected = quantize(w, importance=float_stats[f"model.layers.0.{name}"])
        assert torch.equal(packed.load_layer(0)[name].dequantize(), expected.dequantize())
        assert not torch.equal(expected.dequantize(), quantize(w).dequantize())  # calibration changed the codes

    # Layer 2 is calibrated on inputs that went through layers 0 and 1 as stored. Reference: the same
    # statistics from transformers with those two layers' weights replaced by the stored ones (the
    # 4-bit Linears dequantized, the norms in their stored 16-bit values).
    for layer in (0, 1):
        for name, value in packed.load_layer(layer).items():
            stored = value.dequantize() if isinstance(value, QWeight) else value.float()
            model.get_parameter(f"model.layers.{layer}.{name}").data = stored
    sequential = collect_input_stats(model, ids, ctx=256, max_windows=4, full=True, progress=False)
    layers = iter_layer_input_stats(open_source(stories260k_hf), ids, ctx=256, max_windows=4, progress=False,
                                    forward_weights=lambda i: {k: v if isinstance(v, QWeight) else v.float()
                                                               for k, v in packed.load_layer(i).items()})
    ours = {layer: stats for layer, stats, _inputs in layers}[2]
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        key = f"model.layers.2.{name}"
        # the fused kernel and F.linear on dequantized weights sum in different orders
        torch.testing.assert_close(ours[key], sequential[key], rtol=1e-4, atol=1e-5 * float(sequential[key].abs().max()))
        assert not torch.allclose(ours[key], float_stats[key], rtol=1e-3)  # the quantized layers 0-1 changed them
        w = open_source(stories260k_hf).read(key).float()  # the model above holds layers 0-1 replaced, not 2
        assert torch.equal(packed.load_layer(2)[name].dequantize(), quantize(w, importance=ours[key]).dequantize())


def test_an_interrupted_calibrated_conversion_resumes_to_identical_bytes(stories260k_hf, calibration_text, tmp_path,
                                                                         monkeypatch):
    import quantlite.converter as converter

    options = dict(calibration=calibration_text, calibration_windows=2, calibration_ctx=128, progress=False)
    convert(stories260k_hf, tmp_path / "whole", **options)
    real_write_shard = converter.write_shard

    def interrupted(source, out, settings, file, names, importance=None, tune=None):
        if file == "layer-00002.safetensors":
            raise KeyboardInterrupt
        return real_write_shard(source, out, settings, file, names, importance, tune)

    monkeypatch.setattr(converter, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(stories260k_hf, tmp_path / "resumed", **options)
    monkeypatch.setattr(converter, "write_shard", real_write_shard)
    summary = convert(stories260k_hf, tmp_path / "resumed", **options)
    assert summary.files_resumed == 3  # tokenizer, layers 0 and 1: read back, run, not quantized again
    for path in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert (tmp_path / "resumed" / path.name).read_bytes() == path.read_bytes(), path.name


def test_self_calibration_samples_its_own_text_reproducibly(stories260k_hf, tmp_path):
    options = dict(calibration="self", calibration_windows=2, calibration_ctx=96, progress=False)
    first = convert(stories260k_hf, tmp_path / "a", **options)
    convert(stories260k_hf, tmp_path / "b", **options)
    convert(stories260k_hf, tmp_path / "plain", calibration="none", progress=False)
    assert first.manifest["quantization"]["calibration"]["file"] == "self"
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # the float copy is gone
    shard = "layer-00003.safetensors"
    assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()  # seeded sampling
    assert (tmp_path / "a" / shard).read_bytes() != (tmp_path / "plain" / shard).read_bytes()  # it calibrated


def test_random_calibration_quantizes_layer_0_with_the_statistics_of_random_tokens(stories260k_hf, tmp_path):
    """convert(calibration="random"): layer 0 is quantized with E[x x^T] over the seeded random windows (the
    ids random_token_ids gives; transformers' forward pass agrees to float rounding) plus the identity
    prior, bit for bit as quantize() does with them; recorded in the manifest."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = convert(stories260k_hf, tmp_path / "packed", calibration="random", calibration_windows=3,
                      calibration_ctx=64, progress=False)
    assert summary.manifest["quantization"]["calibration"] == {
        "file": "random", "windows": 3, "ctx": 64, "seed": 0, "exponent": RANDOM_TOKEN_EXPONENT,
        "rank_offset": RANDOM_TOKEN_RANK_OFFSET, "identity_prior": RANDOM_CALIBRATION_PRIOR}
    tokenizer = AutoTokenizer.from_pretrained(stories260k_hf)  # its special tokens are tokenizer.json's
    ranks = token_frequency_ranks(json.loads((stories260k_hf / "tokenizer.json").read_text())["model"], len(tokenizer))
    ids = random_token_ids(len(tokenizer), tokenizer.all_special_ids, 3 * 64, 0, ranks)
    stats = next(iter_layer_input_stats(open_source(stories260k_hf), ids, ctx=64, max_windows=3, progress=False))[1]
    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    hooked = collect_input_stats(model, ids, ctx=64, max_windows=3, full=True, progress=False)
    packed = PackedModel.open(tmp_path / "packed")
    for name in ("self_attn.k_proj.weight", "mlp.up_proj.weight"):
        key = f"model.layers.0.{name}"
        torch.testing.assert_close(stats[key], hooked[key], rtol=1e-5, atol=1e-6 * float(hooked[key].abs().max()))
        w = model.state_dict()[key]
        block_size = 32 if "self_attn" in name else 64  # the data-free block sizes (convert's attention_block_size)
        expected = quantize(w, importance=with_identity_prior(stats[key], RANDOM_CALIBRATION_PRIOR), block_size=block_size)
        assert torch.equal(packed.load_layer(0)[name].dequantize(), expected.dequantize())
        assert not torch.equal(expected.dequantize(), quantize(w, block_size=block_size).dequantize())  # it calibrated


def test_the_default_is_random_calibration_and_none_is_data_free(stories260k_hf, tmp_path):
    """convert() without `calibration` on a source with a tokenizer writes what calibration="random"
    writes; "none" is the data-free conversion; the plain methods stay plain."""
    options = dict(calibration_windows=2, calibration_ctx=64, progress=False)
    default = convert(stories260k_hf, tmp_path / "default", **options)
    convert(stories260k_hf, tmp_path / "random", calibration="random", **options)
    none = convert(stories260k_hf, tmp_path / "none", calibration="none", **options)
    nf4 = convert(stories260k_hf, tmp_path / "nf4", method="nf4", **options)
    assert default.manifest["quantization"]["calibration"]["file"] == "random"
    assert none.manifest["quantization"]["calibration"] is None and nf4.manifest["quantization"]["calibration"] is None
    assert none.manifest["quantization"]["attention_block_size"] == default.manifest["quantization"]["attention_block_size"] == 32
    for path in sorted((tmp_path / "default").glob("*.safetensors")):
        assert (tmp_path / "random" / path.name).read_bytes() == path.read_bytes(), path.name
    shard = "layer-00000.safetensors"
    assert (tmp_path / "none" / shard).read_bytes() != (tmp_path / "default" / shard).read_bytes()  # it calibrated


def test_random_token_statistics_lower_the_layer_output_error_on_real_text(stories260k_hf, calibration_text, generator):
    """What --calibration random is for: on a trained model, GPTQ with E[x x^T] of random token ids (plus the
    identity prior) gives each decoder layer a lower output error on real text, tr(dW H dW^T) / tr(W H W^T)
    with H from TinyStories, than the data-free default. Random windows drawn fresh."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories260k_hf)
    real = collect_input_stats(model, tokenizer(calibration_text.read_text(), return_tensors="pt").input_ids[0],
                               ctx=256, max_windows=4, full=True, progress=False)
    ranks = token_frequency_ranks(json.loads((stories260k_hf / "tokenizer.json").read_text())["model"], len(tokenizer))
    ids = random_token_ids(len(tokenizer), tokenizer.all_special_ids, 4 * 256, int(torch.randint(2**31, (1,), generator=generator)),
                           ranks)
    random = collect_input_stats(model, ids, ctx=256, max_windows=4, full=True, progress=False)

    def output_error(w, qw, h):  # float64
        d, h = qw.dequantize(torch.float64) - w.double(), h.double()
        return float(torch.einsum("nk,kl,nl->", d, h, d) / torch.einsum("nk,kl,nl->", w.double(), h, w.double()))

    for layer in range(model.config.num_hidden_layers):
        names = [n for n in random if n.startswith(f"model.layers.{layer}.")]
        weights = {name: model.state_dict()[name] for name in names}
        data_free = sum(output_error(w, quantize(w), real[name]) for name, w in weights.items())
        calibrated = sum(output_error(w, quantize(w, importance=with_identity_prior(random[name], RANDOM_CALIBRATION_PRIOR)),
                                      real[name]) for name, w in weights.items())
        assert calibrated < data_free, (layer, calibrated, data_free)


def test_the_identity_prior_adds_a_multiple_of_the_mean_diagonal(generator):
    x = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    h = x.T @ x / 50
    weight = float(torch.rand(1, generator=generator)) * 3
    expected = h + weight * torch.diagonal(h).mean() * torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(with_identity_prior(h, weight), expected, rtol=1e-12, atol=0)


def test_layer_streaming_statistics_equal_those_of_the_whole_model(stories260k_hf, calibration_text):
    """iter_layer_input_stats (one layer at a time, quantlite's model math) against collect_input_stats
    (transformers' forward pass with hooks): the same E[x x^T], and the same sharing (q/k/v, gate/up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(stories260k_hf)(calibration_text.read_text(), return_tensors="pt").input_ids[0]
    whole = collect_input_stats(model, ids, ctx=128, max_windows=3, full=True, progress=False)
    layers = iter_layer_input_stats(open_source(stories260k_hf), ids, ctx=128, max_windows=3, progress=False)
    streamed = {name: stats for _layer, layer_stats, _inputs in layers for name, stats in layer_stats.items()}
    assert set(streamed) == set(whole) and len(whole) == 7 * model.config.num_hidden_layers
    for name, expected in whole.items():
        # float32 products summed in float64: the two forward passes may round differently in the last bits
        torch.testing.assert_close(streamed[name], expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    q, k, gate, up, down = (f"model.layers.1.{n}" for n in ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                           "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"))
    assert streamed[q] is streamed[k] and streamed[gate] is streamed[up] and streamed[down] is not streamed[up]


def test_calibration_refusals(stories260k_hf, calibration_text, tmp_path):
    with pytest.raises(ConversionError, match="no use with --no-quantize"):
        convert(stories260k_hf, tmp_path / "a", calibration=calibration_text, no_quantize=True, progress=False)
    with pytest.raises(ConversionError, match="not a readable file"):
        convert(stories260k_hf, tmp_path / "b", calibration=tmp_path / "missing.txt", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time.")
    with pytest.raises(ConversionError, match="fewer than one window"):
        convert(stories260k_hf, tmp_path / "c", calibration=short, progress=False)
    assert not (tmp_path / "c" / "quantlite.json").exists()
