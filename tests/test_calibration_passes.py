"""iter_layer_input_stats with forward_weights (convert's sequential order): the float pass only records
statistics, so the Linear whose output only reaches the layer's output (OUTPUT_ONLY_LINEAR) skips its
product; what is yielded is bit for bit what the pass with every product gives."""

import torch
import torch.nn.functional as F

from quantlite import calibration
from quantlite.calibration import OUTPUT_ONLY_LINEAR, iter_layer_input_stats
from quantlite.quantizer import quantize
from quantlite.sources import open_source


class CountedWeight(torch.Tensor):
    """A weight that counts the F.linear products made with it."""
    products = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is F.linear:
            CountedWeight.products += 1
        return super().__torch_function__(func, types, args, kwargs)


def counting_source(path):
    """open_source(path) whose OUTPUT_ONLY_LINEAR weights count their products."""
    source = open_source(path)
    read = source.read
    source.read = lambda name: read(name).as_subclass(CountedWeight) if name.endswith(OUTPUT_ONLY_LINEAR) else read(name)
    return source


def run(source, ids, windows, forward_weights):
    """[(layer, {name: E[x x^T]}, hidden states as they entered the layer)] with copies of what is
    only valid until the next layer."""
    return [(layer, stats, inputs.clone()) for layer, stats, inputs in
            iter_layer_input_stats(source, ids, ctx=64, max_windows=windows, progress=False,
                                   forward_weights=forward_weights)]


def test_the_recording_pass_skips_the_output_only_product(stories260k_hf, generator, monkeypatch):
    source = counting_source(stories260k_hf)
    plain = open_source(stories260k_hf)
    config = source.model_config
    windows = 3
    ids = torch.randint(config.vocab_size, (windows * 64,), generator=generator)

    def quantized(layer):  # the layer as a conversion would write it: 4-bit Linears, float norms
        prefix = f"model.layers.{layer}."
        return {name[len(prefix):]: quantize(plain.read(name).float()) if name.endswith("_proj.weight")
                else plain.read(name).float() for name in plain.shapes if name.startswith(prefix)}

    CountedWeight.products = 0
    ours = run(source, ids, windows, quantized)
    assert CountedWeight.products == 0
    monkeypatch.setattr(calibration, "OUTPUT_ONLY_LINEAR", "no such weight")  # every product made
    reference = run(source, ids, windows, quantized)
    assert CountedWeight.products == windows * config.num_layers  # one per window and layer: the test can see them
    assert len(ours) == len(reference) == config.num_layers
    for (layer, stats, inputs), (_, expected_stats, expected_inputs) in zip(ours, reference):
        assert torch.equal(inputs, expected_inputs), layer
        assert stats.keys() == expected_stats.keys()
        for name, statistic in stats.items():
            assert torch.equal(statistic, expected_stats[name]), name


def test_without_forward_weights_every_product_is_made(stories260k_hf, generator):
    """The float pass moves the windows on itself: the output-only Linear's product is needed."""
    source = counting_source(stories260k_hf)
    config = source.model_config
    ids = torch.randint(config.vocab_size, (2 * 64,), generator=generator)
    CountedWeight.products = 0
    run(source, ids, 2, None)
    assert CountedWeight.products == 2 * config.num_layers
