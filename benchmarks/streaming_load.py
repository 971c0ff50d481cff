"""Benchmark 5 (issue 11): one streamed layer load from the page cache against the floor.

    .venv/bin/python -m benchmarks.streaming_load [--packed DIR]

The layer load the runtime's loader thread does on every token for a streamed layer (read the shard
into an arena, check it, build its weights or take those kept from its last read into that arena:
`StreamingLlama._read_unit`, run on the loader thread itself, with its one intra-op thread; the two
arenas taken in turn as in a pass), timed on SmolLM2's 30 shards of 2.0 MB while they sit in the
page cache, against the page cache's own read bandwidth measured in the same run (plain `readinto`
of the same shards into one preallocated buffer).
Goal: a load <= 2 x (shard bytes / bandwidth) + 0.2 ms. Also printed: the first read of a shard
(every value checked), and the CPU time of a load (thread time: on a loaded machine wall time also
counts waiting for a core).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.machine import describe


def page_cache_bandwidth(paths: list[Path], repeats: int) -> float:
    """Bytes/s of reading the (cached) shards into one reused buffer, median of `repeats` passes."""
    size = max(p.stat().st_size for p in paths)
    buffer = bytearray(size)
    rates = []
    for _ in range(repeats):
        total, start = 0, time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as handle:
                total += handle.readinto(buffer)
        rates.append(total / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    import torch

    from quantlite.packed import PackedModel, layer_file
    from quantlite.runtime.streaming import StreamingLlama, unit_sizes

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--packed", type=Path, help="a packed SmolLM2 (default: quantlite demo --calibration none's)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(describe())
    if args.packed is None:
        from quantlite.cli.demo import default_out, packed_model

        args.packed = packed_model(default_out("none"), "none")
    packed = PackedModel.open(args.packed)
    paths = [packed.path / layer_file(i) for i in range(packed.num_layers)]
    shard = statistics.mean(p.stat().st_size for p in paths)
    sizes = unit_sizes(packed, torch.float32)
    model = StreamingLlama(packed, memory_budget=sizes.norm + sizes.head + 2 * max(sizes.layers), prefetch=True)

    computing = []  # the arena of the unit "computing" while the next is read, as in a pass with prefetch

    def timed_load(index: int) -> tuple[float, float]:
        """(wall, CPU) seconds of one load on the runtime's loader thread."""
        start, start_cpu = time.perf_counter(), time.thread_time()
        _, arena = model._read_unit(index)
        seconds = time.perf_counter() - start, time.thread_time() - start_cpu
        for done in computing:  # the previous unit has computed: its arena takes the next read
            model._arenas.give_back(done)
        computing[:] = [arena]
        return seconds

    def on_loader(index: int) -> tuple[float, float]:
        return model._loader.submit(timed_load, index).result()

    first_wall = [on_loader(index)[0] for index in range(packed.num_layers)]  # first reads: every value checked
    bandwidth = page_cache_bandwidth(paths, args.repeats)
    wall, cpu = [], []
    for _ in range(args.repeats):
        for index in range(packed.num_layers):
            seconds, cpu_seconds = on_loader(index)
            wall.append(seconds)
            cpu.append(cpu_seconds)
    model.close()
    floor = shard / bandwidth
    goal = 2 * floor + 0.2e-3
    load, load_cpu = statistics.median(wall), statistics.median(cpu)
    print(f"shards           : {packed.num_layers} x {shard / 1e6:.2f} MB ({args.packed}), in the page cache; "
          f"{model.plan.resident_layers} of {packed.num_layers} layers resident (the rest timed as streamed units), "
          f"read {'O_DIRECT' if model.stats.direct_io else 'through the page cache'}")
    print(f"page cache       : {bandwidth / 1e9:.1f} GB/s (median of {args.repeats} passes) -> {floor * 1e3:.3f} ms per shard")
    print(f"layer load       : median {load * 1e3:.2f} ms wall, {load_cpu * 1e3:.2f} ms CPU (first read, every value checked: "
          f"{statistics.median(first_wall) * 1e3:.2f} ms); {model.stats.kept_reads} of {len(wall) + len(first_wall)} reads "
          f"rebuilt nothing (the weights of the shard's last read into that arena, packed.KeptUnit)")
    print(f"goal             : <= 2 x {floor * 1e3:.3f} + 0.2 = {goal * 1e3:.2f} ms: "
          f"{'met' if load <= goal else 'not met'} ({load / goal:.2f}x the goal wall, {load_cpu / goal:.2f}x CPU)")


if __name__ == "__main__":
    main()
