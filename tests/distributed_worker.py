"""Run by tests/test_distributed.py on every rank of a torchrun launch (or of a hand-made one):

    python tests/distributed_worker.py pipeline PACKED INPUTS OUT [--layers-per-rank 2,1,2]
    python tests/distributed_worker.py die PACKED RANK_THAT_DIES

pipeline: the logits of INPUTS' ids (one micro-batch, then cut in micro-batches), greedy generation
from INPUTS' prompts and a perplexity, through quantlite.load(..., distributed=True); each rank saves
what it got to OUT.<rank> (torch.save: the tests read it back).
die: the named rank ends its process after loading; the others start a generation and must end
with DistributedError (the test reads their output).
"""
from __future__ import annotations

import os
import sys

import torch

import quantlite
from quantlite.distributed.group import DistributedError


def pipeline(packed: str, inputs: str, out: str, layers_per_rank: str | None) -> None:
    data = torch.load(inputs)
    with quantlite.load(packed, distributed=True, layers_per_rank=layers_per_rank, micro_batches=1, timeout=60) as model:
        whole = model(data["ids"])
        model.micro_batches = data["micro_batches"]
        cut = model(data["ids"])
        result = model.generate(data["prompts"], max_new_tokens=data["new_tokens"])
        ppl = model.perplexity(data["stream"], ctx=data["ctx"], batch_size=data["windows"], progress=False)
        reports = model.stage_reports()
        torch.save({"whole": whole, "cut": cut, "tokens": result.token_ids, "ppl": ppl.ppl, "reports": reports,
                    "driver": model.is_driver}, f"{out}.{model.rank}")


def die(packed: str, rank_that_dies: int) -> None:
    with quantlite.load(packed, distributed=True, timeout=20) as model:
        if model.rank == rank_that_dies:
            os._exit(17)
        try:
            model.generate([[1, 2, 3]], max_new_tokens=4)
        except DistributedError as error:
            print(f"DistributedError: {error}", flush=True)
            os._exit(2)
    print("no error", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[6] if len(sys.argv) > 6 else None)
    else:
        die(sys.argv[2], int(sys.argv[3]))
