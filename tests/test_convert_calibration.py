"""convert(..., calibration=TEXT): E[x x^T] from the unquantized model over the text, then every Linear
quantized with it (GPTQ), exactly as quantize(w, importance=...) does it; recorded in the manifest."""

import pytest
import torch

from quantlite.calibration import collect_input_stats
from quantlite.converter import CALIBRATION_STATS, convert
from quantlite.errors import ConversionError
from quantlite.packed import PackedModel
from quantlite.quantizer import quantize


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
