"""quantlite.eval.fake_quantized: inside the block each Linear (but lm_head) holds its quantize ->
dequantize round trip; on exit, even after an error, the original weights are back."""
import pytest
import torch

from quantlite.eval import fake_quantized
from quantlite.quantizer import quantize


def small_model(generator) -> torch.nn.Module:
    model = torch.nn.ModuleDict({
        "proj": torch.nn.Linear(96, 40, bias=False),
        "mlp": torch.nn.Sequential(torch.nn.Linear(40, 130), torch.nn.Linear(130, 64)),
        "lm_head": torch.nn.Linear(64, 10, bias=False),
    })
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator))
    return model


def test_round_trip_inside_originals_after(generator):
    model = small_model(generator)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    with fake_quantized(model, lambda w, name, _: quantize(w, method="nf4", name=name), progress=False) as stats:
        for name in ("proj.weight", "mlp.0.weight", "mlp.1.weight"):
            expected = quantize(originals[name], method="nf4").dequantize()
            assert torch.equal(dict(model.named_parameters())[name], expected), name
        assert torch.equal(model["lm_head"].weight, originals["lm_head.weight"])  # skipped by default
        assert torch.equal(model["mlp"][0].bias, originals["mlp.0.bias"])          # biases are not quantized
        assert stats.tensors == 3 and stats.weights == 96 * 40 + 40 * 130 + 130 * 64
        stored = sum(quantize(originals[n], method="nf4").nbytes for n in ("proj.weight", "mlp.0.weight", "mlp.1.weight"))
        assert stats.bits_per_weight == pytest.approx(8 * stored / stats.weights)
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name


def test_originals_come_back_after_an_error(generator):
    model = small_model(generator)
    originals = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with fake_quantized(model, lambda w, name, _: quantize(w, name=name), progress=False):
            raise RuntimeError("boom")
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name


def test_importance_reaches_the_quantizer(generator):
    model = small_model(generator)
    seen = {}

    def quantizer(w, name, importance):
        seen[name] = importance
        return quantize(w, name=name, importance=importance)

    stats = {name: torch.rand(k, generator=generator) for name, k in (("proj.weight", 96), ("mlp.0.weight", 40), ("mlp.1.weight", 130))}
    with fake_quantized(model, quantizer, importance=stats, progress=False):
        pass
    assert all(seen[name] is stats[name] for name in stats)
