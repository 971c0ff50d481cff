"""What the native test files share: the instruction sets to sweep, and a fixture that fails (not
skips) when the CPU library was not built, since `make test` builds it first."""
from __future__ import annotations

import pytest

from quantlite.kernels import native

# Every level the library has, each forced in turn; a level is skipped only where cpuid says this CPU
# lacks it (scalar always runs).
_SUPPORTED = native.cpu_isas() if native.cpu_status() is None else ["scalar"]
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in _SUPPORTED, reason=f"cpuid: this CPU has no {isa}"))
        for isa in ("scalar", "avx2", "avx512")]


@pytest.fixture(scope="module")
def library_built():
    reason = native.cpu_status()
    if reason is not None:
        pytest.fail(f"the CPU library must be built before these tests: {reason}")
