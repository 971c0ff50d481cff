"""Beyond one machine: a layer pipeline and parallel conversion over torch.distributed.

Launched with torchrun (gloo on the CPU, NCCL on GPUs), one process per rank:

    torchrun --nproc-per-node 2 -m quantlite generate ./packed --prompt "Hello"
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 1 --master-addr HOST --master-port 29500 \\
        -m quantlite ppl ./packed --data wiki.test.raw --batch-size 4
    torchrun --nproc-per-node 2 -m quantlite convert ./hf-llama ./packed

  group.py     the process group: started with a timeout, every wait bounded, the packed
               directories compared across ranks (manifest sha256) before any work
  split.py     which contiguous decoder layers each rank owns (balanced by bytes, or as given)
  pipeline.py  PipelineLlama: rank r runs its layers (a StreamingLlama over them, under its own
               memory budget) and passes the hidden states on; the last rank computes the logits
  convert.py   parallel conversion: rank 0 plans and writes the manifest, every rank writes shards

docs/distributed.md has the design, the measurements and the expected scaling. This module imports
nothing heavy: the command line asks `launched_by_torchrun()` before it loads torch.
"""
from __future__ import annotations

import os

DEFAULT_TIMEOUT_SECONDS = 600.0  # the bound on every wait on another rank (--dist-timeout)


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a torchrun launch (torchrun sets WORLD_SIZE and RANK).
    A launch of one process (WORLD_SIZE=1) runs as without torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ
