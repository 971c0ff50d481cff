"""quantlite.tuning: a quantized decoder layer's block scales, outlier values and norm gains tuned
towards the float layer's output, codes fixed, stored in the same format; and convert --tune-steps."""

import pytest
import torch

from quantlite.converter import convert
from quantlite.errors import ConversionError
from quantlite.packed import PackedModel
from quantlite.quantizer import quantize
from quantlite.qweight import QWeight, decode_double_quant
from quantlite.sources import open_source
from quantlite.sources.synthetic import write_random_llama
from quantlite.tuning import tune_layer

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
}


def quantized_layer(source, generator):
    """Layer 0 of `source` as the calibrated converter stores it: GPTQ codes (E[x x^T] of random
    inputs), 1 % outliers (so their values are tuned too), double-quantized scales, bf16 norms;
    the float originals; and random inputs (W, ctx, hidden)."""
    float_layer = {name.removeprefix("model.layers.0."): source.read(name).float()
                   for name in source.shapes if name.startswith("model.layers.0.")}
    inputs = torch.randn(3, 16, TINY["hidden_size"], generator=generator)
    return stored_as_calibrated(float_layer, generator), float_layer, inputs


def stored_as_calibrated(float_layer: dict, generator) -> dict:
    """A float layer as the calibrated converter stores it: GPTQ codes (E[x x^T] of random inputs), 1 %
    outliers, double-quantized scales, bf16 norms."""
    layer = {}
    for name, w in float_layer.items():
        if name.endswith("_proj.weight"):
            x = torch.randn(256, w.shape[1], generator=generator)
            layer[name] = quantize(w, importance=x.T @ x / 256, outlier_frac=0.01, name=name)
        else:
            layer[name] = w.to(torch.bfloat16)
    return layer


def relative_output_error_f64(layer: dict, float_layer: dict, inputs: torch.Tensor, config) -> float:
    """The loss tune_layer reports, recomputed in float64 from the dequantized weights."""
    from quantlite.runtime import llama

    def run(weights):
        weights = {n: (v.dequantize(torch.float64) if isinstance(v, QWeight) else v.double()) for n, v in weights.items()}
        cos, sin = llama.rope_cos_sin(config, torch.arange(inputs.shape[1]).unsqueeze(0), torch.float64)
        return llama.decoder_layer(inputs.double(), weights, config, cos, sin)

    target = run(float_layer)
    return float((run(layer) - target).square().sum() / (target - inputs.double()).square().sum())


@pytest.fixture
def tiny_source(tmp_path, generator):
    return open_source(write_random_llama(tmp_path / "tiny", TINY, generator=generator))


def test_tuning_lowers_the_layer_error_and_stores_a_valid_weight_with_the_same_codes(tiny_source, generator):
    layer, float_layer, inputs = quantized_layer(tiny_source, generator)
    result = tune_layer(layer, float_layer, inputs, tiny_source.model_config, steps=60)

    # the reported losses are the layer's relative output error, as float64 recomputes it
    config = tiny_source.model_config
    before = relative_output_error_f64(layer, float_layer, inputs, config)
    after = relative_output_error_f64(result.layer, float_layer, inputs, config)
    assert result.loss_before == pytest.approx(before, rel=1e-3)
    assert result.loss_after == pytest.approx(after, rel=1e-3)
    assert after < 0.97 * before  # tuning helped, measured on the stored (rounded) form

    for name, old in layer.items():
        new = result.layer[name]
        if not isinstance(old, QWeight):
            assert new.dtype == old.dtype and new.shape == old.shape  # norms stay in their stored dtype
            continue
        assert torch.equal(new.codes, old.codes) and torch.equal(new.codebook, old.codebook)
        assert torch.equal(new.outlier_row_ptr, old.outlier_row_ptr) and torch.equal(new.outlier_cols, old.outlier_cols)
        assert new.double_quant and new.scale_codes.dtype == torch.uint8 and new.outlier_vals.dtype == torch.float16
        assert new.nbytes == old.nbytes  # the same format, the same bits per weight
        # the scales are on the double-quantization grid, and dequantize() is their math
        assert torch.equal(new.block_scales(), decode_double_quant(new.scale_codes, new.scale_group_min, new.scale_group_step))
        levels = new.codebook.double()[new.unpacked_codes().long()]
        dense = (levels * new.block_scales().double().repeat_interleave(new.block_size, dim=1))[:, : new.shape[1]]
        rows = torch.repeat_interleave(torch.arange(new.shape[0]), torch.diff(new.outlier_row_ptr.long()))
        dense[rows, new.outlier_cols.long()] += new.outlier_vals.double()
        assert torch.allclose(new.dequantize(torch.float64), dense, rtol=0, atol=1e-12)
        assert torch.equal(QWeight.from_dict(new.to_dict()).dequantize(), new.dequantize())  # the format round trip
    assert any(not torch.equal(result.layer[n].scale_codes, layer[n].scale_codes) for n in layer if isinstance(layer[n], QWeight))


def test_tuning_that_does_not_help_returns_the_layer_unchanged(tiny_source, generator):
    """A learning rate far too large makes the trained parameters worse: the layer comes back as given,
    and the reported loss never rises."""
    layer, float_layer, inputs = quantized_layer(tiny_source, generator)
    result = tune_layer(layer, float_layer, inputs, tiny_source.model_config, steps=5, learning_rate=3.0)
    assert result.loss_after == result.loss_before
    assert all(result.layer[name] is value for name, value in layer.items())


def test_convert_tune_steps_writes_the_same_codes_with_tuned_scales(stories260k_hf, shared_data, tmp_path):
    text = tmp_path / "calibration.txt"  # the end of the TinyStories sample: the perplexity tests evaluate its start
    text.write_text((shared_data / "tinystories_valid_sample.txt").read_text(encoding="utf-8")[-20000:], encoding="utf-8")
    options = dict(calibration=text, calibration_windows=2, calibration_ctx=128, progress=False)
    plain = convert(stories260k_hf, tmp_path / "plain", **options)
    tuned = convert(stories260k_hf, tmp_path / "tuned", tune_steps=20, **options)
    assert tuned.manifest["quantization"]["calibration"]["tune_steps"] == 20
    assert "tune_steps" not in plain.manifest["quantization"]["calibration"]
    before, after = PackedModel.open(plain.path), PackedModel.open(tuned.path)
    source = open_source(stories260k_hf)
    changed = 0
    for layer in range(source.model_config.num_layers):
        old, new = before.load_layer(layer), after.load_layer(layer)
        assert old.keys() == new.keys()
        for name, value in new.items():
            if isinstance(value, QWeight):
                if layer == 0:  # layer 0 sees the same inputs in both conversions, so GPTQ gave it the same codes
                    assert torch.equal(value.codes, old[name].codes)
                changed += not torch.equal(value.scale_codes, old[name].scale_codes)
                w = source.read(f"model.layers.{layer}.{name}").double()
                sqnr = 10 * torch.log10(w.square().sum() / (w - value.dequantize(torch.float64)).square().sum())
                recorded = tuned.manifest["tensors"][f"model.layers.{layer}.{name}"]["sqnr_db"]
                assert recorded == pytest.approx(float(sqnr), abs=2e-3)  # the manifest describes the tuned weight
    assert changed > 0


def test_tune_steps_needs_calibration(tmp_path, generator):
    src = write_random_llama(tmp_path / "tiny", TINY, generator=generator)
    with pytest.raises(ConversionError, match="--tune-steps tunes a calibrated conversion"):
        convert(src, tmp_path / "out", tune_steps=10, progress=False)
    with pytest.raises(ConversionError, match="must be an integer >= 0"):
        convert(src, tmp_path / "out", calibration="random", tune_steps=-1, progress=False)


def test_convert_command_takes_tune_steps_zero_as_off_and_refuses_negative(capsys):
    from quantlite.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["convert", "src", "out", "--tune-steps", "0"]).tune_steps == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "src", "out", "--tune-steps", "-1"])
    assert "-1 must be between 0 and" in capsys.readouterr().err


def test_tuning_with_moving_codes_lowers_the_layer_error_and_stores_valid_codes(tiny_source, generator):
    layer, float_layer, inputs = quantized_layer(tiny_source, generator)
    result = tune_layer(layer, float_layer, inputs, tiny_source.model_config, steps=60, move_codes=True)

    config = tiny_source.model_config
    before = relative_output_error_f64(layer, float_layer, inputs, config)
    after = relative_output_error_f64(result.layer, float_layer, inputs, config)
    assert result.loss_after == pytest.approx(after, rel=1e-3)
    assert after < 0.97 * before
    moved = 0
    for name, old in layer.items():
        if not isinstance(old, QWeight):
            continue
        new = result.layer[name]
        codes, old_codes = new.unpacked_codes(), old.unpacked_codes()
        moved += int((codes != old_codes).sum())
        zero = int((new.codebook == 0).nonzero()[0, 0])
        assert bool((codes[:, new.shape[1]:] == zero).all())  # padding keeps the zero level
        rows = torch.repeat_interleave(torch.arange(new.shape[0]), torch.diff(new.outlier_row_ptr.long()))
        assert bool((codes[rows, new.outlier_cols.long()] == zero).all())  # so do the outliers, whose places stay
        assert torch.equal(new.outlier_row_ptr, old.outlier_row_ptr) and torch.equal(new.outlier_cols, old.outlier_cols)
        assert new.nbytes == old.nbytes
        assert torch.equal(QWeight.from_dict(new.to_dict()).dequantize(), new.dequantize())  # the format round trip
    assert moved > 0
