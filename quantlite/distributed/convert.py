"""Parallel conversion over torch.distributed: the ranks share the output files of one conversion.

    torchrun --nproc-per-node N -m quantlite convert SRC OUT        (OUT on a filesystem all ranks see)

Rank 0 runs quantlite.converter.convert as one process would: it takes OUT's lock, checks or resumes
what OUT holds, writes the tokenizer, and at the end writes quantlite.json, after every shard is
done. Only who converts the files differs (convert's `run_jobs`): the files left to do are dealt
out in rounds of N, file i of a round to rank i; each rank writes its file (quantlite.converter.
write_shard, a pure function of source and settings: the same bytes whoever writes it), then the
ranks exchange their manifest entries (all_gather) and rank 0 records them in OUT's partial state.
So the result is byte-identical to a single process's, and an interrupted run loses at most the
round in flight: rerun the same command (with any number of ranks, or none) to resume.

Calibrated conversion (--calibration, and convert's default random calibration) is sequential in the layers: layer i's statistics come from
the calibration windows leaving the quantized layers before it. Rank 0 then converts everything
alone, exactly as one process would, and the other ranks end at once (docs/convert.md).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from quantlite.distributed import group as groups
from quantlite.errors import ConversionError, QuantliteError


def convert(src: str | Path, out: str | Path, timeout: float = groups.DEFAULT_TIMEOUT_SECONDS, **options):
    """quantlite.convert(src, out, **options) shared among the ranks of a torchrun launch (call it on
    every rank). Returns the ConversionSummary on rank 0, None on the others."""
    group = groups.join(torch.device("cpu"), timeout)
    summary = _convert_on_rank(group, src, out, options)
    groups.leave()  # every rank, after a run that ended well: a gloo group left to the interpreter's exit can abort it
    return summary


def _convert_on_rank(group, src: str | Path, out: str | Path, options: dict):
    from quantlite import converter

    if options.get("workers", 1) != 1:
        raise ConversionError("under torchrun the ranks share the files: start one rank per core "
                              "(--nproc-per-node) instead of --workers")
    groups.same_everywhere(group, "the conversion (source, output, options)",
                           (str(Path(src).resolve()), str(Path(out).resolve()), sorted(options.items(), key=str)))
    from quantlite.sources import open_source

    if converter.calibration_to_run(options.get("calibration"), open_source(src), options.get("method", converter.DEFAULT_METHOD),
                                    options.get("no_quantize", False)) is not None:
        if group.rank != 0:
            print(f"rank {group.rank}: a calibrated conversion runs on rank 0 alone (its layers are sequential); "
                  "nothing to do here", file=sys.stderr)
            return None
        return converter.convert(src, out, **options)
    if group.rank != 0:
        _serve(group, src)
        return None
    started = []  # set once the other ranks have their job list
    try:
        summary = converter.convert(src, out, run_jobs=lambda *job: _share(group, started, *job), **options)
    except QuantliteError as error:
        if not started:  # the others wait for a job list: tell them there is none
            groups.broadcast(group, ("error", str(error)), 0)
        raise
    if not started:
        groups.broadcast(group, ("done", None), 0)
    return summary


def _share(group, started: list, source, out: Path, settings, todo: list, workers: int):
    """Rank 0's run_jobs: send the job list to the others, then convert and yield in rounds."""
    groups.broadcast(group, ("jobs", (settings, todo, str(out))), 0)
    started.append(True)
    yield from _rounds(group, source, out, settings, todo)


def _serve(group, src) -> None:
    """A rank other than 0: wait for the job list, convert this rank's share, round by round."""
    from quantlite.sources import open_source

    kind, payload = groups.broadcast(group, None, 0)
    if kind == "error":
        raise ConversionError(f"rank 0 stopped before any layer was shared: {payload}")
    if kind == "jobs":
        settings, todo, out = payload
        for _ in _rounds(group, open_source(src), Path(out), settings, todo):
            pass


def _rounds(group, source, out: Path, settings, todo: list):
    """Each rank writes file `rank` of each round of `world` files; every rank learns every entry
    (all_gather), and yields them in the plan's order. A rank that fails sends its error instead, so
    that every rank stops with it; the files of finished rounds stay recorded (rank 0) for a resume."""
    import torch.distributed as dist

    from quantlite.converter import write_shard

    for first in range(0, len(todo), group.world):
        batch = todo[first:first + group.world]
        mine = None
        if group.rank < len(batch):
            file, names = batch[group.rank]
            try:
                mine = ("ok", file, write_shard(source, out, settings, file, names))
            except QuantliteError as error:
                mine = ("error", file, str(error))
        gathered: list = [None] * group.world
        with groups.bounded(group, f"exchanging the round of {batch[0][0]}"):
            dist.all_gather_object(gathered, mine)
        for rank, result in enumerate(gathered[:len(batch)]):
            if result[0] == "error":
                raise ConversionError(f"rank {rank} could not write {result[1]}: {result[2]}")
        for _, file, entry in gathered[:len(batch)]:
            yield file, entry
