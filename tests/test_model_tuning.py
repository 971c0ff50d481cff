"""quantlite.model_tuning: every decoder layer, codes included, tuned at once towards the float model's
next-token distributions, early-stopped on held-out windows; and convert --tune-model-steps."""

import pytest
import torch
import torch.nn.functional as F

from quantlite.converter import convert
from quantlite.errors import ConversionError
from quantlite.model_tuning import held_out_count, tune_model
from quantlite.packed import PackedModel
from quantlite.qweight import QWeight
from quantlite.sources import open_source
from quantlite.sources.synthetic import write_random_llama
from test_tuning import TINY, stored_as_calibrated


def float_model(source) -> tuple[list[dict], dict]:
    """The decoder layers (names relative to each) and the rest (embedding, final norm, head) as float32."""
    layers = [{name.removeprefix(f"model.layers.{i}."): source.read(name).float()
               for name in source.shapes if name.startswith(f"model.layers.{i}.")} for i in range(TINY["num_hidden_layers"])]
    rest = {name: source.read(name).float() for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")}
    return layers, rest


def log_probs_f64(layers: list[dict], rest: dict, windows: torch.Tensor, config) -> torch.Tensor:
    """(W, ctx, V) float64 next-token log-probabilities of the model with these layers."""
    from quantlite.runtime import llama

    cos, sin = llama.rope_cos_sin(config, torch.arange(windows.shape[1]).unsqueeze(0), torch.float64)
    x = rest["model.embed_tokens.weight"].double()[windows]
    for layer in layers:
        weights = {n: (v.dequantize(torch.float64) if isinstance(v, QWeight) else v.double()) for n, v in layer.items()}
        x = llama.decoder_layer(x, weights, config, cos, sin)
    x = llama.rms_norm(x, rest["model.norm.weight"].double(), config.rms_norm_eps)
    return F.log_softmax(x @ rest["lm_head.weight"].double().T, dim=-1)


def held_out_kl_f64(layers, float_layers, rest, windows, config) -> float:
    """The held-out score tune_model reports, recomputed in float64: mean KL(float || quantized) per
    token over the last held_out_count(W) windows."""
    held = windows[-held_out_count(windows.shape[0]):]
    target, ours = log_probs_f64(float_layers, rest, held, config), log_probs_f64(layers, rest, held, config)
    return float((target.exp() * (target - ours)).sum(-1).mean())


@pytest.fixture
def tiny(tmp_path, generator):
    source = open_source(write_random_llama(tmp_path / "tiny", TINY, generator=generator))
    float_layers, rest = float_model(source)
    layers = [stored_as_calibrated(layer, generator) for layer in float_layers]
    windows = torch.randint(TINY["vocab_size"], (48, 32), generator=generator)  # 6 held out
    return source.model_config, float_layers, rest, layers, windows


def run_tune_model(tiny, **options):
    from quantlite.runtime import llama

    config, float_layers, rest, layers, windows = tiny
    cos, sin = llama.rope_cos_sin(config, torch.arange(windows.shape[1]).unsqueeze(0), torch.float32)
    with torch.no_grad():
        x = rest["model.embed_tokens.weight"][windows]
        for layer in float_layers:
            x = llama.decoder_layer(x, layer, config, cos, sin)
        float_final = llama.rms_norm(x, rest["model.norm.weight"], config.rms_norm_eps)
    return tune_model(layers, rest["model.embed_tokens.weight"], rest["model.norm.weight"], rest["lm_head.weight"],
                      float_final, rest["lm_head.weight"], windows, config, **options)


def test_model_tuning_lowers_the_held_out_divergence_moving_codes_in_the_same_format(tiny):
    config, float_layers, rest, layers, windows = tiny
    # 200 steps: at 100 a few seeds in a hundred (e.g. 624957332) had not yet moved the held-out score
    # by 3 %; at 200 the worst of ten seeds, that one included, kept 0.83 of it
    result = run_tune_model(tiny, steps=200, code_learning_rate=1e-4)

    before = held_out_kl_f64(layers, float_layers, rest, windows, config)
    after = held_out_kl_f64(result.layers, float_layers, rest, windows, config)
    assert result.kl_before == pytest.approx(before, rel=1e-3)  # the reported scores are the stored layers' KL
    assert result.kl_after == pytest.approx(after, rel=1e-3)
    assert after < 0.97 * before and result.best_step in (100, 150, 200)
    moved = 0
    for old_layer, new_layer in zip(layers, result.layers):
        assert old_layer.keys() == new_layer.keys()
        for name, old in old_layer.items():
            new = new_layer[name]
            if not isinstance(old, QWeight):
                assert new.dtype == old.dtype and new.shape == old.shape  # gains stay in their stored dtype
                continue
            moved += int((new.unpacked_codes() != old.unpacked_codes()).sum())
            assert torch.equal(new.outlier_row_ptr, old.outlier_row_ptr) and torch.equal(new.outlier_cols, old.outlier_cols)
            assert new.nbytes == old.nbytes and new.double_quant  # the same format, the same bits per weight
            assert torch.equal(QWeight.from_dict(new.to_dict()).dequantize(), new.dequantize())
    assert moved > 0


def test_model_tuning_that_does_not_help_returns_the_layers_as_given(tiny):
    result = run_tune_model(tiny, steps=50, learning_rate=3.0, code_learning_rate=3.0)
    assert result.best_step == 0 and result.kl_after == result.kl_before
    assert all(new[name] is value for old, new in zip(tiny[3], result.layers) for name, value in old.items())


def test_held_out_windows():
    assert [held_out_count(w) for w in (1, 2, 8, 15, 16, 128)] == [0, 1, 1, 1, 2, 16]


def test_model_tuning_needs_two_windows(tiny):
    config, float_layers, rest, layers, windows = tiny
    with pytest.raises(ValueError, match="at least two calibration windows"):
        tune_model(layers, rest["model.embed_tokens.weight"], rest["model.norm.weight"], rest["lm_head.weight"],
                   torch.zeros(1, 16, 64), rest["lm_head.weight"], windows[:1], config, steps=1)


def packed_kl(path, float_path, windows) -> float:
    """Mean KL(float || packed) per token, both run by quantlite's evaluation models (the runtime for the
    packed directory, transformers for the HF folder)."""
    from quantlite.eval import open_for_eval

    with torch.no_grad():
        target = F.log_softmax(open_for_eval(float_path).forward(windows).double(), dim=-1)
        ours = F.log_softmax(open_for_eval(path).forward(windows).double(), dim=-1)
    return float((target.exp() * (target - ours)).sum(-1).mean())


@pytest.fixture
def calibration(stories260k_hf, shared_data, tmp_path):
    text = tmp_path / "calibration.txt"  # the end of the TinyStories sample: the perplexity tests evaluate its start
    text.write_text((shared_data / "tinystories_valid_sample.txt").read_text(encoding="utf-8")[-20000:], encoding="utf-8")
    return dict(calibration=text, calibration_windows=8, calibration_ctx=128, progress=False)


def test_convert_tune_model_steps_lowers_the_packed_models_divergence(stories260k_hf, calibration, tmp_path, monkeypatch):
    import quantlite.converter as converter
    from quantlite.runtime.generate import Tokenizer

    plain = convert(stories260k_hf, tmp_path / "plain", **calibration)
    made, real_ids = [], converter._calibration_ids  # the text is tokenized once, for the layers and the model tuning
    monkeypatch.setattr(converter, "_calibration_ids", lambda *args: made.append(args) or real_ids(*args))
    tuned = convert(stories260k_hf, tmp_path / "tuned", tune_model_steps=100, **calibration)
    assert len(made) == 1
    assert tuned.manifest["quantization"]["calibration"]["tune_model_steps"] == 100
    assert "tune_model_steps" not in plain.manifest["quantization"]["calibration"]
    assert tuned.manifest["totals"]["quantized_bits_per_weight"] == plain.manifest["totals"]["quantized_bits_per_weight"]

    ids = torch.tensor(Tokenizer(tmp_path / "plain" / "tokenizer").encode(calibration["calibration"].read_text()))
    held_out = ids[7 * 128 : 8 * 128].unsqueeze(0)  # the eighth window, never trained on
    assert packed_kl(tuned.path, stories260k_hf, held_out) < packed_kl(plain.path, stories260k_hf, held_out)

    before, after = PackedModel.open(plain.path), PackedModel.open(tuned.path)
    source = open_source(stories260k_hf)
    moved = 0
    for layer in range(source.model_config.num_layers):
        for name, value in after.load_layer(layer).items():
            if isinstance(value, QWeight):
                moved += int((value.unpacked_codes() != before.load_layer(layer)[name].unpacked_codes()).sum())
                w = source.read(f"model.layers.{layer}.{name}").double()
                sqnr = 10 * torch.log10(w.square().sum() / (w - value.dequantize(torch.float64)).square().sum())
                recorded = tuned.manifest["tensors"][f"model.layers.{layer}.{name}"]["sqnr_db"]
                assert recorded == pytest.approx(float(sqnr), abs=2e-3)  # the manifest describes the tuned weight
    assert moved > 0


def test_a_conversion_stopped_while_tuning_the_model_resumes_to_identical_bytes(stories260k_hf, calibration, tmp_path,
                                                                                 monkeypatch):
    import quantlite.tuning as tuning

    options = dict(tune_model_steps=100, **calibration)
    convert(stories260k_hf, tmp_path / "whole", **options)
    real_flat_layer, written = tuning.flat_layer, []

    def interrupted(layer, prefix, *args):
        if prefix == "model.layers.2.":  # layers 0 and 1 rewritten tuned, the others not yet
            raise KeyboardInterrupt
        written.append(prefix)
        return real_flat_layer(layer, prefix, *args)

    monkeypatch.setattr(tuning, "flat_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(stories260k_hf, tmp_path / "resumed", **options)
    assert written == ["model.layers.0.", "model.layers.1."]
    monkeypatch.setattr(tuning, "flat_layer", real_flat_layer)
    summary = convert(stories260k_hf, tmp_path / "resumed", **options)
    assert summary.files_resumed == 3  # tokenizer, embedding, final: the layers converted and tuned again
    for path in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert (tmp_path / "resumed" / path.name).read_bytes() == path.read_bytes(), path.name


def test_tune_model_steps_refusals(stories260k_hf, calibration, tmp_path, generator):
    src = write_random_llama(tmp_path / "tiny", TINY, generator=generator)
    with pytest.raises(ConversionError, match="--tune-model-steps tunes a calibrated conversion"):
        convert(src, tmp_path / "out", tune_model_steps=10, progress=False)
    with pytest.raises(ConversionError, match=r"--tune-model-steps \(-1\) must be an integer >= 0"):
        convert(src, tmp_path / "out", calibration="random", tune_model_steps=-1, progress=False)
    with pytest.raises(ConversionError, match="needs at least 2 calibration windows"):
        convert(stories260k_hf, tmp_path / "one", tune_model_steps=10, **{**calibration, "calibration_windows": 1})


def test_convert_command_takes_tune_model_steps(capsys, stories260k_hf, calibration, tmp_path):
    from quantlite.cli import build_parser, main

    parser = build_parser()
    assert parser.parse_args(["convert", "src", "out"]).tune_model_steps == 0
    assert parser.parse_args(["convert", "src", "out", "--tune-model-steps", "300"]).tune_model_steps == 300
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "src", "out", "--tune-model-steps", "-1"])
    assert "-1 must be between 0 and" in capsys.readouterr().err
    assert main(["convert", str(stories260k_hf), str(tmp_path / "none"), "--calibration", "none",
                 "--tune-model-steps", "5", "--quiet"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--tune-model-steps tunes a calibrated conversion" in err and "\n" not in err  # one line, no traceback
