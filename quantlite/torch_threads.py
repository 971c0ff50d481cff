"""torch's intra-op thread count set for a block of code, then put back.

Why one thread, where quantlite asks for it: a chain of small torch ops (a few thousand values
each) gains nothing from torch's OpenMP team, and on busy cores its threads wait on each other for
a scheduler slice at every op torch splits. Measured on the 2-core machine at load ~5: a SmolLM2
layer's GPTQ column loop 7x slower on two threads than on one (quantlite.gptq); the loads of
SmolLM2's 30 resident layers 5.2-7.4 s on two against 1.1-1.3 s on one (quantlite.runtime.streaming);
SDPA at one query 0.41 ms against 0.02 ms (a decode step, quantlite.runtime.generate).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads of the calling thread set to `count` inside the block, restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
