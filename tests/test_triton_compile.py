"""The Triton kernel compiles for the GPU (sm_90: H100/H200) on this GPU-less machine.

The interpreter that runs tests/test_triton_qmatmul.py on the CPU accepts programs the compiler
rejects (layouts, dot shapes, constexpr types), so each specialisation is also compiled to a cubin
with Triton's bundled ptxas. It runs in a subprocess because `make test` sets TRITON_INTERPRET=1,
under which the kernel in this process is the interpreter's.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (pip install triton)")
def test_every_specialisation_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"TRITON_DEFAULT_FP_FUSION": "1"}
    # decode (M=1 fp16), decode split-K (M=3 bf16), prefill tl.dot (M=16 bf16, M=64 fp32 "ieee"),
    # and a block size that is not a power of two (48)
    specs = [(1, "fp16", 64), (3, "bf16", 64), (16, "bf16", 64), (64, "fp32", 48)]
    script = f"from benchmarks.gpu_kernels import compile_report; print('\\n'.join(compile_report({specs!r})))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("sm_90")]
    print("\n".join(lines))
    assert len(lines) == len(specs)
    for line in lines:
        # a spill to local memory ("STACK" above 0) turns a bandwidth-bound kernel into a slow one
        assert "REG:" in line and " STACK:0 " in line, line
