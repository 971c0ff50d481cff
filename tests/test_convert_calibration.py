"""convert(..., calibration=TEXT): E[x x^T] from the unquantized model over the text, then every Linear
quantized with it (GPTQ), exactly as quantize(w, importance=...) does it; recorded in the manifest."""

import pytest
import torch

from quantlite.calibration import collect_input_stats, stream_input_stats
from quantlite.converter import CALIBRATION_STATS, convert
from quantlite.errors import ConversionError
from quantlite.packed import PackedModel
from quantlite.quantizer import quantize
from quantlite.sources import open_source


@pytest.fixture
def calibration_text(shared_data, tmp_path):
    # the end of the TinyStories sample: the perplexity tests evaluate its start
    text = (shared_data / "tinystories_valid_sample.txt").read_text(encoding="utf-8")[-40000:]
    path = tmp_path / "calibration.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_calibrated_conversion_equals_quantize_with_the_statistics(stories260k_hf, calibration_text, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "packed"
    summary = convert(stories260k_hf, out, calibration=calibration_text, calibration_windows=4,
                      calibration_ctx=256, progress=False)
    calibration = summary.manifest["quantization"]["calibration"]
    assert calibration["windows"] == 4 and calibration["ctx"] == 256 and len(calibration["sha256"]) == 64
    assert not (out / CALIBRATION_STATS).exists()  # a temporary of the conversion

    # the statistics of transformers' own forward pass (hooks on its nn.Linear modules), computed here
    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(stories260k_hf)(calibration_text.read_text(), return_tensors="pt").input_ids[0]
    stats = collect_input_stats(model, ids, ctx=256, max_windows=4, full=True, progress=False)
    packed = PackedModel.open(out)
    for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight"):
        stored = packed.load_layer(2)[name]
        w = model.state_dict()[f"model.layers.2.{name}"]
        expected = quantize(w, importance=stats[f"model.layers.2.{name}"])
        assert torch.equal(stored.dequantize(), expected.dequantize())
        assert not torch.equal(stored.dequantize(), quantize(w).dequantize())  # calibration changed the codes


def test_a_conversion_interrupted_after_calibration_reuses_the_statistics(stories260k_hf, calibration_text, tmp_path,
                                                                         monkeypatch):
    import quantlite.converter as converter

    options = dict(calibration=calibration_text, calibration_windows=2, calibration_ctx=128, progress=False)
    convert(stories260k_hf, tmp_path / "whole", **options)
    real_write_shard = converter.write_shard

    def interrupted(source, out, settings, file, names):
        if file == "layer-00002.safetensors":
            raise KeyboardInterrupt
        return real_write_shard(source, out, settings, file, names)

    monkeypatch.setattr(converter, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(stories260k_hf, tmp_path / "resumed", **options)
    assert (tmp_path / "resumed" / CALIBRATION_STATS / "COMPLETE").exists()
    monkeypatch.setattr(converter, "write_shard", real_write_shard)
    monkeypatch.setattr("quantlite.calibration.iter_layer_input_stats", lambda *a, **k: pytest.fail("statistics computed again"))
    convert(stories260k_hf, tmp_path / "resumed", **options)
    for path in sorted((tmp_path / "whole").glob("*.safetensors")):
        assert (tmp_path / "resumed" / path.name).read_bytes() == path.read_bytes(), path.name
    assert not (tmp_path / "resumed" / CALIBRATION_STATS).exists()


def test_layer_streaming_statistics_equal_those_of_the_whole_model(stories260k_hf, calibration_text):
    """stream_input_stats (one layer at a time, quantlite's model math) against collect_input_stats
    (transformers' forward pass with hooks): the same E[x x^T], and the same sharing (q/k/v, gate/up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(stories260k_hf)(calibration_text.read_text(), return_tensors="pt").input_ids[0]
    whole = collect_input_stats(model, ids, ctx=128, max_windows=3, full=True, progress=False)
    streamed = stream_input_stats(open_source(stories260k_hf), ids, ctx=128, max_windows=3, progress=False)
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
