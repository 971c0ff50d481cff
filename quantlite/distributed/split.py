"""Which decoder layers each pipeline rank owns: contiguous runs, one or more layers per rank.

By bytes (the default): the split that makes the largest rank's share smallest, counting each
layer's bytes in memory (quantlite.runtime.streaming.unit_sizes), the embedding on the first rank
and the final norm and head on the last (they live there). Equal layers and a small embedding and
head give equal counts; a large head moves layers off the last rank. Found exactly by dynamic
programming over (rank, first layer of the next rank): ranks x layers^2 steps, 0.1 s for 126 layers
on 16 ranks.

By count (`--layers-per-rank 10,10,12`): as given, checked against the model and the world size.
"""
from __future__ import annotations

from quantlite.errors import QuantliteError


class SplitError(QuantliteError, ValueError):
    """The layers cannot be split as asked (more ranks than layers, counts that do not add up)."""


def split_by_bytes(layer_bytes: list[int], ranks: int, first_extra: int = 0, last_extra: int = 0) -> list[range]:
    """Contiguous runs of layers, one per rank, minimising the largest rank's bytes; `first_extra`
    is added to rank 0's share (the embedding), `last_extra` to the last rank's (norm and head)."""
    layers = len(layer_bytes)
    if not 1 <= ranks <= layers:
        raise SplitError(f"{ranks} ranks for {layers} decoder layers: every rank needs at least one layer")
    prefix = [0]
    for size in layer_bytes:
        prefix.append(prefix[-1] + size)

    def share(rank: int, start: int, stop: int) -> int:
        return (prefix[stop] - prefix[start] + (first_extra if rank == 0 else 0)
                + (last_extra if rank == ranks - 1 else 0))

    # best[r][j]: the smallest largest share when ranks 0..r own layers 0..j-1; cut[r][j]: rank r's first layer
    infinity = float("inf")
    best = [[infinity] * (layers + 1) for _ in range(ranks)]
    cut = [[0] * (layers + 1) for _ in range(ranks)]
    for stop in range(1, layers + 1):
        best[0][stop] = share(0, 0, stop)
    for rank in range(1, ranks):
        for stop in range(rank + 1, layers + 1):
            for start in range(rank, stop):
                value = max(best[rank - 1][start], share(rank, start, stop))
                if value < best[rank][stop]:
                    best[rank][stop], cut[rank][stop] = value, start
    runs, stop = [], layers
    for rank in range(ranks - 1, -1, -1):
        start = cut[rank][stop] if rank else 0
        runs.append(range(start, stop))
        stop = start
    return runs[::-1]


def split_by_count(counts: list[int], ranks: int, layers: int) -> list[range]:
    """The runs `counts` describes (counts[r] layers for rank r, in order)."""
    if len(counts) != ranks:
        raise SplitError(f"--layers-per-rank gives {len(counts)} counts for {ranks} ranks; give one per rank")
    if any(count < 1 for count in counts):
        raise SplitError(f"--layers-per-rank {','.join(map(str, counts))}: every rank needs at least one layer")
    if sum(counts) != layers:
        raise SplitError(f"--layers-per-rank {','.join(map(str, counts))} adds up to {sum(counts)}; the model has {layers} layers")
    runs, start = [], 0
    for count in counts:
        runs.append(range(start, start + count))
        start += count
    return runs


def parse_counts(text: str) -> list[int]:
    """'10,10,12' -> [10, 10, 12] (the --layers-per-rank syntax)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise SplitError(f"--layers-per-rank {text!r} is not a comma-separated list of layer counts, e.g. 10,10,12") from None
    return counts


def describe(runs: list[range]) -> str:
    """'rank 0: layers 0-9, rank 1: layers 10-19'."""
    return ", ".join(f"rank {rank}: layers {run.start}-{run.stop - 1}" for rank, run in enumerate(runs))
