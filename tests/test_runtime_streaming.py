"""Where the weights live: residency under a memory budget, bytes read per pass, the loader thread.

The reference for the logits here is the same packed model with every layer resident: streaming
must not change a single bit (the same kernels run on the same tensors), so equality is exact.
No timing is asserted here (benchmarks/streaming_*.py measure speed).
"""
from __future__ import annotations

import json
import shutil
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import quantlite
from benchmarks.streaming_synthetic import run_child, write_synthetic
from quantlite.errors import FormatError
from quantlite.packed import PackedModel
from quantlite.q8weight import Q8Weight, quantize_int8
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize
from quantlite.runtime.streaming import (MAX_SLOTS, READ_AHEAD_BYTES, MemoryBudgetError, StreamingLlama, parse_size, plan_residency,
                                        read_ahead_slots)
from quantlite.sources.checksum import sha256_file
from quantlite.sources.safetensors_file import SafetensorsFile
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
    """A PackedModel that records which thread read each layer, and with how many torch threads."""

    def __init__(self, packed: PackedModel):
        self.packed = packed
        self.reads: list[tuple[int, str]] = []
        self.torch_threads: list[int] = []

    def __getattr__(self, name):
        return getattr(self.packed, name)

    def load_layer(self, index, **read):
        self.reads.append((index, threading.current_thread().name))
        self.torch_threads.append(torch.get_num_threads())
        return self.packed.load_layer(index, **read)


def shard_bytes(packed_dir, layers) -> int:
    packed = PackedModel.open(packed_dir)
    return sum(packed.layer_nbytes(i) for i in layers)


@pytest.mark.parametrize("prefetch", [True, False])
def test_every_read_runs_torch_on_one_thread(packed_dir, generator, prefetch):
    """Resident layers read on the computing thread, and streamed ones inline (prefetch off) or on the
    loader, all run torch on one thread; the caller's setting is back afterwards."""
    input_ids = torch.randint(0, BASE["vocab_size"], (1, 4), generator=generator)
    norm, layers, head = unit_sizes(packed_dir)
    recording = RecordingPacked(PackedModel.open(packed_dir))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        budget = norm + head + layers[0] + (2 if prefetch else 1) * max(layers)  # layer 0 resident, the rest stream
        with StreamingLlama(recording, memory_budget=budget, prefetch=prefetch) as model:
            model(input_ids)
            assert model.stats.resident_layers == 1 and model.stats.streamed_layers == LAYERS - 1
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
    assert {index for index, _ in recording.reads} == set(range(LAYERS))  # (with prefetch, layer 1 again: the next pass's)
    assert set(recording.torch_threads) == {1}


def test_everything_resident_when_it_fits_and_second_pass_reads_nothing(packed_dir, generator):
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=generator)
    with quantlite.load(packed_dir, memory_budget="1GB") as model:
        first = model(input_ids)
        read_after_first = model.stats.bytes_read
        second = model(input_ids)
        assert model.stats.resident_layers == LAYERS and model.stats.streamed_layers == 0
        assert model.stats.head_resident and model.stats.embedding_resident
        assert model.stats.layer_loads == LAYERS and model.stats.embedding_rows_read == 0
        assert model.stats.bytes_read == read_after_first  # nothing read on the second pass
        assert torch.equal(first, second)


def unit_sizes(packed_dir) -> tuple[int, list[int], int]:
    """(final norm, [layer], head) bytes as the runtime plans them (from the shard headers)."""
    with quantlite.load(packed_dir, memory_budget="1GB") as model:
        return model.sizes.norm, model.sizes.layers, model.sizes.head


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("head_streams", [False, True])
def test_small_budget_streams_and_changes_nothing(packed_dir, generator, prefetch, head_streams):
    """Logits bit-identical to the all-resident model; each pass reads exactly the streamed layers
    (and the head when it streams) and the embedding rows of its tokens, as the counters say."""
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 9), generator=generator)
    with quantlite.load(packed_dir, memory_budget="1GB") as model:
        expected = model(input_ids)
    norm, layers, head = unit_sizes(packed_dir)
    slots = 2 if prefetch else 1
    assert min(layers) > head  # the fixture's layers are larger than its head, which the budgets below use
    if head_streams:  # one byte short of keeping the head next to the slots: everything streams
        budget = norm + slots * max(layers) + head - 1
    else:  # the head and one layer resident, the rest streamed
        budget = norm + head + layers[0] + slots * max(layers)
    recording = RecordingPacked(PackedModel.open(packed_dir))
    with StreamingLlama(recording, memory_budget=budget, prefetch=prefetch) as model:
        assert model.plan.head_resident is not head_streams
        assert not model.stats.embedding_resident
        streamed = LAYERS - model.stats.resident_layers
        assert streamed >= LAYERS - 1
        assert torch.equal(model(input_ids), expected)
        before = model.decode_reads()
        assert torch.equal(model(input_ids), expected)
        after = model.decode_reads()
        assert after["layers"] - before["layers"] == streamed
        assert after["heads"] - before["heads"] == (1 if head_streams else 0)
        assert after["embedding_rows"] - before["embedding_rows"] == len(torch.unique(input_ids))
        head_file = "final.safetensors" if not model.config.tie_word_embeddings else "embedding.safetensors"
        expected_bytes = (shard_bytes(packed_dir, range(LAYERS - streamed, LAYERS))
                          + (model.packed.manifest["files"][head_file]["size"] if head_streams else 0)
                          + after["embedding_bytes"] - before["embedding_bytes"])
        assert after["bytes"] - before["bytes"] == expected_bytes
        loaders = {thread for index, thread in recording.reads if index >= LAYERS - streamed}
    main = threading.main_thread().name
    assert (loaders == {main}) if not prefetch else (main not in loaders)


def test_generation_streamed_equals_resident(packed_dir, generator):
    """Greedy decoding with a KV cache: the same tokens whether every unit streams or none does."""
    prompt = torch.randint(0, BASE["vocab_size"], (7,), generator=generator).tolist()
    with quantlite.load(packed_dir, memory_budget="1GB") as model:
        expected = model.generate([prompt], max_new_tokens=6).token_ids
    norm, layers, head = unit_sizes(packed_dir)
    with quantlite.load(packed_dir, memory_budget=norm + 2 * max(layers + [head])) as model:
        assert model.stats.resident_layers == 0 and not model.plan.head_resident
        assert model.generate([prompt], max_new_tokens=6).token_ids == expected


def test_embedding_rows_on_demand_equal_the_table(packed_dir, tmp_path, generator):
    """load_embedding_rows reads only the rows asked for, and they equal those of the whole table:
    a plain table (the fixture's), and a 4-bit one with double-quantized scales and outliers."""
    packed = PackedModel.open(packed_dir)
    rows = torch.unique(torch.randint(0, BASE["vocab_size"], (9,), generator=generator))
    table = packed.load_embedding()
    plain = table if isinstance(table, torch.Tensor) else table.dequantize()
    got = packed.load_embedding_rows(rows)
    assert torch.equal(got if isinstance(got, torch.Tensor) else got.dequantize(), plain[rows])

    quantized = quantize(plain.float(), method="quantlite", outlier_frac=0.02, double_quant=True)
    assert quantized.n_outliers and quantized.double_quant
    folder = copy_with_embedding(packed_dir, tmp_path / "q", quantized)
    got = PackedModel.open(folder).load_embedding_rows(rows)
    assert got.n_outliers == int(sum(quantized.outlier_row_ptr[r + 1] - quantized.outlier_row_ptr[r] for r in rows.tolist()))
    assert torch.equal(got.dequantize(), quantized.dequantize()[rows])

    int8 = quantize_int8(plain.float())  # the converter's default for the embedding
    got = PackedModel.open(copy_with_embedding(packed_dir, tmp_path / "q8", int8)).load_embedding_rows(rows)
    assert isinstance(got, Q8Weight) and torch.equal(got.dequantize(), int8.dequantize()[rows])


def copy_with_embedding(source, destination, table: QWeight | Q8Weight):
    """A copy of a packed directory whose embedding.safetensors holds `table` (manifest updated)."""
    shutil.copytree(source, destination)
    path = destination / "embedding.safetensors"
    save_file({k: v.contiguous() for k, v in table.to_dict("model.embed_tokens.weight.").items()}, str(path))
    manifest = json.loads((destination / "quantlite.json").read_text())
    manifest["files"]["embedding.safetensors"] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    (destination / "quantlite.json").write_text(json.dumps(manifest))
    return destination


@pytest.mark.parametrize("prefetch", [True, False])
def test_plan_residency(prefetch):
    """Units as large as READ_AHEAD_BYTES: two slots (one without prefetch), as many resident as fit."""
    slots = 2 if prefetch else 1
    unit = READ_AHEAD_BYTES
    layers, head, embedding = [unit] * 4, unit * 7 // 10, 3 * unit
    assert plan_residency(10**12, 1, layers, head, embedding, False, prefetch, True).embedding_resident
    # room for the head, one layer and the slots: the head stays, the embedding goes to disk
    plan = plan_residency(1 + head + unit + slots * unit, 1, layers, head, embedding, False, prefetch, True)
    assert (plan.resident_layers, plan.head_resident, plan.embedding_resident, plan.slots) == (1, True, False, slots)
    # a tied head that stays serves the embedding rows
    assert plan_residency(1 + head + unit + slots * unit, 1, layers, head, head, True, prefetch, True).embedding_resident
    # just the slots: everything streams, the head too
    plan = plan_residency(1 + slots * unit, 1, layers, head, embedding, False, prefetch, True)
    assert (plan.resident_layers, plan.head_resident, plan.slot_bytes, plan.slots) == (0, False, unit, slots)
    with pytest.raises(MemoryBudgetError, match="streaming needs"):
        plan_residency(slots * unit, 1, layers, head, embedding, False, prefetch, True)


def test_prefetch_depth_is_chosen_by_the_budget():
    """Read O_DIRECT, units smaller than READ_AHEAD_BYTES get the slots whose reads ahead cover it,
    before resident layers; fewer only when nothing resident leaves room for them; never more than the
    units can use. Read through the page cache, two."""
    layer = READ_AHEAD_BYTES * 3 // 4  # two units ahead cover it: 3 slots
    layers, head = [layer] * 40, layer // 2
    assert read_ahead_slots(layer, 40, True, True) == 3 and read_ahead_slots(READ_AHEAD_BYTES, 40, True, True) == 2
    assert read_ahead_slots(1, 40, True, True) == MAX_SLOTS and read_ahead_slots(1, 40, False, True) == 1
    assert read_ahead_slots(1, 1, True, True) == 2  # one streamed unit: computing, and read for the next pass
    assert read_ahead_slots(1, 40, True, False) == 2  # through the page cache: one unit read ahead
    # room for the head and 9 layers: 6 resident and 3 slots, not 7 and 2
    plan = plan_residency(head + 9 * layer, 0, layers, head, head, True, True, True)
    assert (plan.resident_layers, plan.head_resident, plan.slots, plan.slot_bytes) == (6, True, 3, layer)
    # read through the page cache the same budget keeps 7 resident and 2 slots
    plan = plan_residency(head + 9 * layer, 0, layers, head, head, True, True, False)
    assert (plan.resident_layers, plan.head_resident, plan.slots, plan.slot_bytes) == (7, True, 2, layer)
    # room for 2 layers only (the head streams, no smaller than half a layer): 2 slots rather than none
    plan = plan_residency(2 * layer, 0, layers, head, head, True, True, True)
    assert (plan.resident_layers, plan.head_resident, plan.slots) == (0, False, 2)


def test_budget_below_the_streaming_slots_is_refused(packed_dir):
    with pytest.raises(MemoryBudgetError, match="streaming needs"):
        quantlite.load(packed_dir, memory_budget=1000)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_peak_rss_stays_within_a_budget_below_embedding_plus_head(tmp_path):
    """A model whose float embedding (64 MiB in memory) and 4-bit head (8.5 MiB) together exceed the
    budget: the embedding stays on disk (its rows read on demand), and the process's peak RSS grows
    by no more than the budget plus 24 MiB (KV cache, activations, logits, allocator slack)."""
    config = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
                  vocab_size=32768, num_hidden_layers=3, tie_word_embeddings=False)
    write_synthetic(tmp_path / "m", config, quantized=True, quantized_embedding=False)
    norm, layers, head = unit_sizes(tmp_path / "m")
    budget = norm + 2 * max(layers + [head]) + 2**20
    result = run_child("benchmarks.streaming_synthetic:measure_peak_growth", path=tmp_path / "m", budget=budget, steps=3)
    assert budget < result["fixed"]
    assert not result["embedding_resident"]
    assert result["growth"] <= budget + 24 * 2**20, (result, budget)


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


def test_a_shard_changed_on_disk_is_checked_in_full_again(packed_dir, tmp_path):
    """A re-read of an unchanged shard checks its structure only; once the file is written (a NaN
    put into a codebook in place: same size, same header), the next read checks every value again."""
    folder = shutil.copytree(packed_dir, tmp_path / "p")
    packed = PackedModel.open(folder)
    packed.load_layer(0)
    packed.load_layer(0)  # unchanged: structure only
    put_nan_into_a_codebook(folder / "layer-00000.safetensors")
    with pytest.raises(FormatError, match="codebook"):
        packed.load_layer(0)


def put_nan_into_a_codebook(path: Path) -> None:
    """Write a NaN over the first level of a codebook of the shard, in place: same size, same header."""
    shard = SafetensorsFile(path)
    entry = next(e for name, e in shard.entries.items() if name.endswith(".codebook"))
    with open(path, "r+b") as handle:
        handle.seek(shard.data_start + entry.begin)
        handle.write(struct.pack("<f", float("nan")))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
def test_peak_rss_stays_within_a_budget_that_reads_ahead(tmp_path):
    """The same model, 8 layers, a budget with room for the head and 4 layers: every layer streams
    through 4 slots (reads ahead, O_DIRECT where the file system allows it, on two loader threads),
    and the peak RSS grows by no more than the budget plus 24 MiB, as above."""
    config = dict(hidden_size=512, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=8,
                  vocab_size=32768, num_hidden_layers=8, tie_word_embeddings=False)
    write_synthetic(tmp_path / "m", config, quantized=True, quantized_embedding=False)
    norm, layers, head = unit_sizes(tmp_path / "m")
    budget = norm + head + 4 * max(layers)
    result = run_child("benchmarks.streaming_synthetic:measure_peak_growth", path=tmp_path / "m", budget=budget, steps=3,
                       direct_io=True)
    assert (result["resident_layers"], result["head_resident"], result["slots"]) == (0, True, 4)
    assert result["growth"] <= budget + 24 * 2**20, (result, budget)
