"""Run by tests/test_distributed.py on every rank of a torchrun launch (or of a hand-made one):

    python tests/distributed_worker.py pipeline PACKED INPUTS OUT LAYERS_PER_RANK BUDGET     (- for the default)
    python tests/distributed_worker.py fault PACKED (die|hang) RANK TIMEOUT

pipeline: the logits of INPUTS' ids (one micro-batch, then cut in micro-batches), greedy generation
from INPUTS' prompts and a perplexity, through quantlite.load(..., distributed=True); each rank saves
what it got to OUT.<rank> (torch.save: the tests read it back).
fault: RANK ends its process (die) or stops answering (hang) after loading; the others start a
generation and must end with DistributedError within TIMEOUT (the test reads their output). A load
that fails (the ranks disagree) ends the same way.
"""
from __future__ import annotations

import os
import sys
import time

import torch

import quantlite
from quantlite.distributed.group import DistributedError


def pipeline(packed: str, inputs: str, out: str, layers_per_rank: str | None, budget: str | None) -> None:
    data = torch.load(inputs)
    with quantlite.load(packed, distributed=True, memory_budget=budget, layers_per_rank=layers_per_rank, micro_batches=1,
                        timeout=60) as model:
        whole = model(data["ids"])
        model.micro_batches = data["micro_batches"]
        cut = model(data["ids"])
        result = model.generate(data["prompts"], max_new_tokens=data["new_tokens"])
        ppl = model.perplexity(data["stream"], ctx=data["ctx"], batch_size=data["windows"], progress=False)
        reports = model.stage_reports()
        torch.save({"whole": whole, "cut": cut, "tokens": result.token_ids, "ppl": ppl.ppl, "reports": reports,
                    "driver": model.is_driver}, f"{out}.{model.rank}")


def fault(packed: str, kind: str, faulty_rank: int, timeout: float) -> None:
    try:
        with quantlite.load(packed, distributed=True, timeout=timeout) as model:
            if model.rank == faulty_rank:
                if kind == "die":
                    os._exit(17)
                time.sleep(10 * timeout)  # alive, never answering
                os._exit(18)
            model.generate([[1, 2, 3]], max_new_tokens=4)
    except DistributedError as error:
        print(f"DistributedError: {error}", flush=True)
        os._exit(2)  # not waiting for the process group's threads, which may wait on the faulty rank
    print("no error", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "pipeline":
        pipeline(*sys.argv[2:5], *[None if arg == "-" else arg for arg in sys.argv[5:7]])
    else:
        fault(sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
