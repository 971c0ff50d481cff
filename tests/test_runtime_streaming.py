"""Where the weights live: residency under a memory budget, bytes read per pass, the loader thread.

The reference for the logits here is the same packed model with every layer resident: streaming
must not change a single bit (the same kernels run on the same tensors), so equality is exact.
"""
from __future__ import annotations

import threading

import pytest
import torch

import quantlite
from quantlite.runtime.streaming import MemoryBudgetError, StreamingLlama, parse_size
from quantlite.packed import PackedModel
from test_llama_exact import BASE, build_checkpoint, module_generator

LAYERS = 4


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    """One converted 4-layer model for the module (plain NF4: the method is not what is tested here)."""
    tmp_path = tmp_path_factory.mktemp("streaming")
    _, folder = build_checkpoint(tmp_path, module_generator(), num_hidden_layers=LAYERS)
    quantlite.convert(folder, tmp_path / "packed", method="nf4", progress=False)
    return tmp_path / "packed"


class RecordingPacked:
    """A PackedModel that records which thread read each layer."""

    def __init__(self, packed: PackedModel):
        self.packed = packed
        self.reads: list[tuple[int, str]] = []

    def __getattr__(self, name):
        return getattr(self.packed, name)

    def load_layer(self, index):
        self.reads.append((index, threading.current_thread().name))
        return self.packed.load_layer(index)


def shard_bytes(packed_dir, layers) -> int:
    packed = PackedModel.open(packed_dir)
    return sum(packed.layer_nbytes(i) for i in layers)


def test_everything_resident_when_it_fits_and_second_pass_reads_nothing(packed_dir, generator):
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=generator)
    with quantlite.load(packed_dir, memory_budget="1GB") as model:
        first = model(input_ids)
        read_after_first = model.stats.bytes_read
        second = model(input_ids)
        assert model.stats.resident_layers == LAYERS and model.stats.streamed_layers == 0
        assert model.stats.layer_loads == LAYERS
        assert model.stats.bytes_read == read_after_first  # nothing read on the second pass
        assert torch.equal(first, second)


@pytest.mark.parametrize("prefetch", [True, False])
def test_small_budget_streams_the_rest_and_changes_nothing(packed_dir, generator, prefetch):
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=generator)
    with quantlite.load(packed_dir, memory_budget="1GB") as model:
        expected = model(input_ids)
        fixed, layer = model.stats.resident_bytes - sum(model.stats.layer_bytes), max(model.stats.layer_bytes)

    # room for the embedding and head, one resident layer, and the prefetch slot
    budget = fixed + layer * (2 if prefetch else 1) + layer // 2
    recording = RecordingPacked(PackedModel.open(packed_dir))
    with StreamingLlama(recording, memory_budget=budget, prefetch=prefetch) as model:
        assert torch.equal(model(input_ids), expected)
        assert model.stats.resident_layers == 1 and model.stats.streamed_layers == LAYERS - 1
        assert model.stats.resident_bytes <= budget
        before = model.stats.bytes_read
        assert torch.equal(model(input_ids), expected)
        # the second pass reads exactly the streamed layers' shards
        assert model.stats.bytes_read - before == shard_bytes(packed_dir, range(1, LAYERS))
        loaders = {thread for _, thread in recording.reads}
    assert [index for index, _ in recording.reads] == [0, 1, 2, 3, 1, 2, 3]
    main = threading.main_thread().name
    assert (loaders == {main}) if not prefetch else (main not in loaders)


def test_budget_below_the_fixed_parts_is_refused(packed_dir):
    with pytest.raises(MemoryBudgetError, match="embedding"):
        quantlite.load(packed_dir, memory_budget=1000)


@pytest.mark.parametrize("text, expected", [("1GB", 10**9), ("512MiB", 2**29), ("1.5 GiB", 3 * 2**29), ("2000", 2000), (3e6, 3_000_000)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "-1GB", "0", "1 parsec", ""])
def test_parse_size_rejects(text):
    with pytest.raises(MemoryBudgetError):
        parse_size(text)


def test_bad_input_ids_are_refused(packed_dir):
    with quantlite.load(packed_dir) as model:
        with pytest.raises(quantlite.errors.QuantliteError, match="token ids"):
            model(torch.tensor([[0, BASE["vocab_size"]]]))
        with pytest.raises(quantlite.errors.QuantliteError, match="batch, seq"):
            model(torch.tensor([1, 2, 3]))


def test_full_forward_with_left_padding_matches_unpadded_rows(packed_dir, generator):
    """A padded row's real positions give the logits the row gives alone (mask and positions right)."""
    short = torch.randint(0, BASE["vocab_size"], (1, 5), generator=generator)
    long = torch.randint(0, BASE["vocab_size"], (1, 8), generator=generator)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0] * 3 + [1] * 5, [1] * 8])
    with quantlite.load(packed_dir) as model:
        padded = model(batch, attention_mask=mask)
        alone_short, alone_long = model(short), model(long)
    # float32 rounding of a different reduction length (masked keys) only
    assert (padded[0, 3:] - alone_short[0]).abs().max() <= 1e-4 * alone_short.abs().max()
    assert (padded[1] - alone_long[0]).abs().max() <= 1e-4 * alone_long.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streaming_matches_cpu(packed_dir, generator):
    """The same code path on a GPU: fp16 activations (11-bit mantissa, ~5e-4 per rounding, a few
    dozen roundings deep here), so <= 1e-2 relative against the float32 CPU logits."""
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=generator)
    with quantlite.load(packed_dir) as model:
        expected = model(input_ids)
    with quantlite.load(packed_dir, device="cuda", memory_budget="1GB") as model:
        got = model(input_ids).cpu()
        assert model.generate(input_ids[0, :4].tolist(), max_new_tokens=4).token_ids[0]  # the decode path runs
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-2
