"""What the native test files share: the instruction sets to sweep, and a fixture that fails (not
skips) when the CPU library was not built, since `make test` builds it first."""
from __future__ import annotations

import pytest

from quantlite.kernels import native

ISAS = ["scalar", "avx2"] if native.cpu_status() is None and native.cpu_isa() == "avx2" else ["scalar"]


@pytest.fixture(scope="module")
def library_built():
    reason = native.cpu_status()
    if reason is not None:
        pytest.fail(f"the CPU library must be built before these tests: {reason}")
