"""The command-line options of a distributed run, shared by generate, ppl and convert (no torch
import: --help stays fast)."""
from __future__ import annotations

import argparse

from quantlite.cli.arguments import count
from quantlite.distributed import DEFAULT_TIMEOUT_SECONDS, launched_by_torchrun
from quantlite.errors import QuantliteError

PIPELINE_HELP = """\
Under torchrun the ranks run one pipeline: each holds a contiguous run of decoder layers within its
own --memory-budget and passes hidden states on; the last rank computes the logits (docs/distributed.md):
  torchrun --nproc-per-node 2 -m quantlite {command} ./packed {example} --layers-per-rank 16,14"""


def add_pipeline_arguments(parser: argparse.ArgumentParser, command: str, example: str) -> None:
    group = parser.add_argument_group("distributed (under torchrun)", PIPELINE_HELP.format(command=command, example=example))
    group.add_argument("--layers-per-rank", metavar="N,N,...",
                       help="decoder layers of each rank, in rank order, e.g. 16,14 (default: balanced by bytes)")
    group.add_argument("--micro-batches", type=count(4096), default=None, metavar="M",
                       help="split each multi-token batch into up to M runs of rows so ranks overlap (default: one per rank)")
    add_timeout_argument(group)


def add_timeout_argument(parser) -> None:
    parser.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_SECONDS, metavar="SECONDS",
                        help=f"longest wait on another rank before this one gives up with an error (default {DEFAULT_TIMEOUT_SECONDS:g})")


def pipeline_options(args) -> dict:
    """load() keywords for a pipeline under torchrun; {} otherwise (a plain single-process load)."""
    if not launched_by_torchrun():
        if args.layers_per_rank is not None or args.micro_batches is not None:
            raise QuantliteError("--layers-per-rank and --micro-batches split a pipeline over ranks: start the command with torchrun")
        return {}
    return {"distributed": True, "layers_per_rank": args.layers_per_rank, "micro_batches": args.micro_batches,
            "timeout": args.dist_timeout}
