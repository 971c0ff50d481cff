"""Streamed units read into reused arenas (quantlite/sources/arena.py), O_DIRECT or through the page cache.

References: the plain reader (SafetensorsFile.read_all) for the bytes, and the all-resident model
for the logits (the same kernels on the same values: equality is exact). No timing is asserted (benchmarks/streaming_405b.py measures it).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.streaming_synthetic import random_qweight, write_synthetic
from quantlite.errors import FormatError
from quantlite.packed import PackedModel
from quantlite.runtime.streaming import READ_AHEAD_BYTES, ArenaPool, StreamingLlama, StreamStats, unit_sizes
from quantlite.sources import arena as arena_module
from quantlite.sources.arena import aligned_buffer, arena_layout, read_into_arena
from quantlite.sources.safetensors_file import SafetensorsFile
from test_runtime_streaming import put_nan_into_a_codebook

SMALL = dict(hidden_size=256, intermediate_size=704, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
             num_hidden_layers=3, tie_word_embeddings=False)


def odd_shard(path, generator) -> SafetensorsFile:
    """A shard whose tensors start at offsets no page boundary matches: two 4-bit weights of odd row
    counts, an int8-style weight, plain tensors of several dtypes and one of zero elements."""
    tensors = {}
    for name, (n, k) in {"a": (37, 192), "b": (301, 320)}.items():
        tensors.update(random_qweight(n, k, generator).to_dict(name + "."))
    tensors.update({"c.meta": torch.zeros(3, dtype=torch.uint8), "c.qs": torch.randint(-128, 128, (17, 64), dtype=torch.int8, generator=generator),
                    "c.scales": torch.rand(17, 2, generator=generator).half(),
                    "norm": torch.randn(129, generator=generator).half(), "ids": torch.randint(0, 9, (7,), generator=generator),
                    "empty": torch.zeros(0, 5)})
    save_file(tensors, str(path))
    return SafetensorsFile(path)


@pytest.mark.parametrize("direct", [True, False])
def test_arena_read_equals_the_plain_reader(tmp_path, generator, monkeypatch, direct):
    """Every tensor equals read_all's, dtype and bytes, read in chunks far smaller than the shard
    (O_DIRECT: several in flight) into an arena no larger than the shard's pages."""
    monkeypatch.setattr(arena_module, "IO_CHUNK_BYTES", 3 * 4096 + 6)
    shard = odd_shard(tmp_path / "s.safetensors", generator)
    layout = arena_layout(shard)
    arena = aligned_buffer(layout.nbytes + 4096)
    arena.fill_(0xAB)  # stale bytes of an earlier unit must not show through
    got = read_into_arena(shard, arena, layout, direct)
    expected = shard.read_all()
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    assert layout.nbytes < shard.file_size + 2 * 4096


def test_an_arena_too_small_or_misaligned_is_refused(tmp_path, generator):
    shard = odd_shard(tmp_path / "s.safetensors", generator)
    layout = arena_layout(shard)
    with pytest.raises(ValueError, match="needs"):
        read_into_arena(shard, aligned_buffer(layout.nbytes - 1), layout, direct=False)
    with pytest.raises(ValueError, match="aligned"):
        read_into_arena(shard, aligned_buffer(layout.nbytes + 4096)[1:], layout, direct=False)


def model_and_resident_logits(tmp_path, generator, config: dict, default_format: bool):
    """A synthetic packed model of `config`'s shapes, a random (2, 5) batch of token ids, its logits
    with every layer resident (the reference), and the units' sizes as the plan counts them."""
    write_synthetic(tmp_path / "m", config, quantized=True, default_format=default_format)
    packed = PackedModel.open(tmp_path / "m")
    input_ids = torch.randint(0, config["vocab_size"], (2, 5), generator=generator)
    with StreamingLlama(packed, memory_budget="1GB") as model:
        expected = model(input_ids)
    return packed, input_ids, expected, unit_sizes(packed, torch.float32)


@pytest.mark.parametrize("direct_io, default_format", [(True, False), (False, False), (True, True)])
def test_streamed_units_in_reused_arenas_change_nothing(tmp_path, generator, direct_io, default_format):
    """Every layer and the head streamed into two arenas, pass after pass: logits bit-identical to
    the all-resident model, no buffer allocated beyond the two slots, and what a streamed layer holds
    in memory (its arena and the kernel layout's tensors) within the slot the budget counts for it.
    default_format: double-quantized scales and outliers; every unit, as its weights hold nothing
    outside the arena, is kept after the first pass (packed.KeptUnit) and rebuilt no more."""
    packed, input_ids, expected, sizes = model_and_resident_logits(tmp_path, generator, SMALL, default_format)
    with StreamingLlama(packed, memory_budget=sizes.norm + 2 * max(sizes.layers + [sizes.head]), direct_io=direct_io) as model:
        assert model.stats.resident_layers == 0 and not model.plan.head_resident
        passes = 4
        for _ in range(passes):
            assert torch.equal(model(input_ids), expected)
        assert model.stats.direct_io is direct_io
        assert model.stats.arenas_allocated == 2
        assert model.stats.layer_loads == passes * SMALL["num_hidden_layers"] and model.stats.head_loads == passes
        if default_format:  # 4 units, 2 arenas: a shard is built at most once per arena, every other read rebuilds nothing
            units = SMALL["num_hidden_layers"] + 1
            assert model.stats.kept_reads >= passes * units - 2 * units, model.stats.kept_reads
        assert all(held <= model.plan.slot_bytes for held in model.stats.layer_bytes), (model.stats.layer_bytes, model.plan)


@pytest.mark.parametrize("direct_io", [True, False])
def test_reads_ahead_fill_every_slot_the_budget_gives(tmp_path, generator, direct_io):
    """Units far smaller than READ_AHEAD_BYTES and a budget with room for the head and the slots the
    plan gives them (4 read O_DIRECT, 2 through the page cache): every layer streams, and each slot
    reads the next unit as soon as it is free (as many units requested ahead at once as slots);
    logits bit-identical to the all-resident model, no buffer allocated beyond the slots, and a shard
    built at most once per arena (the rest kept)."""
    config = {**SMALL, "num_hidden_layers": 6}
    packed, input_ids, expected, sizes = model_and_resident_logits(tmp_path, generator, config, default_format=True)
    assert max(sizes.layers) < READ_AHEAD_BYTES // 4
    slots = 4 if direct_io else 2
    with StreamingLlama(packed, memory_budget=sizes.norm + sizes.head + slots * max(sizes.layers), direct_io=direct_io) as model:
        assert (model.plan.resident_layers, model.plan.head_resident, model.plan.slots) == (0, True, slots)
        passes = 6
        for _ in range(passes):
            assert torch.equal(model(input_ids), expected)
        assert model.stats.most_read_ahead == slots
        assert model.stats.arenas_allocated == slots
        assert model.stats.layer_loads == passes * config["num_hidden_layers"]
        # the reads of the passes (those read ahead for a next pass may still be in flight, and only add)
        assert model.stats.kept_reads >= (passes - slots) * config["num_hidden_layers"], model.stats.kept_reads


def test_an_arena_lent_is_not_handed_out_again():
    stats = StreamStats()
    pool = ArenaPool(nbytes=3 * 4096, count=2, stats=stats)
    first, second = pool.take(), pool.take()
    assert second.buffer.data_ptr() != first.buffer.data_ptr()
    third = pool.take()  # both slots lent: a fresh buffer, counted, not kept
    assert third.buffer.data_ptr() not in (first.buffer.data_ptr(), second.buffer.data_ptr()) and stats.arenas_allocated == 3
    pool.give_back(third)
    pool.give_back(first)
    assert pool.take() is first
    pool.give_back(second)
    assert pool.take() is second and stats.arenas_allocated == 3
    pool.give_back(first)
    pool.give_back(second)
    assert pool.take() is first  # both free: the one taken least recently


def test_an_arena_that_keeps_the_shard_is_preferred():
    pool = ArenaPool(nbytes=4096, count=2, stats=StreamStats())
    first, second = pool.take(), pool.take()
    second.kept["layer-00001.safetensors"] = object()
    pool.give_back(first)
    pool.give_back(second)
    assert pool.take("layer-00001.safetensors") is second  # first is free and taken less recently: not taken
    assert pool.take("layer-00001.safetensors") is first   # the keeper lent: a free one


def test_a_kept_unit_is_not_returned_once_its_shard_changed(tmp_path, generator):
    """A streamed layer whose shard is written on disk (a NaN put into a codebook in place: same size,
    same header) between passes is read and checked in full again, kept weights or not."""
    write_synthetic(tmp_path / "m", SMALL, quantized=True, default_format=True)
    packed = PackedModel.open(tmp_path / "m")
    sizes = unit_sizes(packed, torch.float32)
    input_ids = torch.randint(0, SMALL["vocab_size"], (1, 4), generator=generator)
    with StreamingLlama(packed, memory_budget=sizes.norm + 2 * max(sizes.layers + [sizes.head])) as model:
        expected = model(input_ids)
        assert torch.equal(model(input_ids), expected)
        put_nan_into_a_codebook(tmp_path / "m" / "layer-00002.safetensors")  # not the first streamed unit: prefetched already
        with pytest.raises(FormatError, match="codebook"):
            model(input_ids)
