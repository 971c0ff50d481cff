"""The C embedding example (csrc/examples/qmatmul_example.c) builds against the CPU library, reads a
QWeight written by quantlite, runs a qmatmul without Python and checks it: against y computed here in
float64, and against its own float64 decode of the stored fields (its tolerance is explained in
the example)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from quantlite.kernels import native
from quantlite.q8weight import quantize_int8
from quantlite.quantizer import quantize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> Path:
    if native.cpu_status() is not None:
        pytest.fail(f"the CPU library must be built first: {native.cpu_status()}")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("no C compiler (cc / gcc) on PATH; the embedding example needs one")
    binary = tmp_path_factory.mktemp("example") / "qmatmul_example"
    subprocess.run(
        [compiler, "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{ROOT / 'csrc' / 'include'}",
         str(ROOT / "csrc" / "examples" / "qmatmul_example.c"), f"-L{native.NATIVE_DIR}", "-lquantlite_cpu",
         f"-Wl,-rpath,{native.NATIVE_DIR}", "-lm", "-o", str(binary)],
        check=True,
    )
    return binary


def write_case(directory: Path, generator, method: str, n: int, k: int, m: int, corrupt: bool = False,
               outlier_frac: float = 0.01):
    qw = quantize(torch.randn(n, k, generator=generator), method=method, outlier_frac=outlier_frac)
    x = torch.randn(m, k, generator=generator)
    y = torch.nn.functional.linear(x.double(), qw.dequantize(torch.float64)).float()
    if corrupt:
        y[m // 2, n // 2] += 1.0
    qw.save(directory / "weight.safetensors")
    save_file({"x": x, "y": y}, str(directory / "io.safetensors"))
    return directory / "weight.safetensors", directory / "io.safetensors"


@pytest.mark.parametrize("method, n, k, m, outlier_frac", [
    ("quantlite", 97, 320, 1, 0.01), ("nf4", 64, 257, 6, 0.01), ("rtn", 33, 64, 70, 0.01), ("quantlite", 48, 192, 2, 0.0),
])
def test_example_runs_a_qmatmul_without_python(example, tmp_path, generator, method, n, k, m, outlier_frac):
    # quantlite: double-quantized scales; nf4: float32 scales; rtn: float16 scales and int4 levels;
    # outlier_frac 0: a file without the outlier tensors
    weight, io = write_case(tmp_path, generator, method, n, k, m, outlier_frac=outlier_frac)
    result = subprocess.run([str(example), str(weight), str(io)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"M={m} N={n} K={k}" in result.stdout and "OK" in result.stdout
    # the automatic choice is printed, and every instruction set this CPU has was run and checked
    assert f"isa={native.cpu_isa()} (auto)" in result.stdout
    for isa in native.cpu_isas():
        assert f"{isa:<6} ok:" in result.stdout


def write_int8_case(directory: Path, generator, n: int, k: int, m: int, corrupt: bool = False):
    q8 = quantize_int8(torch.randn(n, k, generator=generator))
    x = torch.randn(m, k, generator=generator)
    y = torch.nn.functional.linear(x.double(), q8.dequantize(torch.float64)).float()
    if corrupt:
        y[m // 2, n // 2] += 1.0
    save_file(q8.to_dict(), str(directory / "weight.safetensors"))
    save_file({"x": x, "y": y}, str(directory / "io.safetensors"))
    return directory / "weight.safetensors", directory / "io.safetensors"


@pytest.mark.parametrize("n, k, m", [(97, 320, 1), (33, 257, 6), (16, 64, 70)])
def test_example_runs_an_int8_qmatmul(example, tmp_path, generator, n, k, m):
    weight, io = write_int8_case(tmp_path, generator, n, k, m)
    result = subprocess.run([str(example), str(weight), str(io)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"int8 M={m} N={n} K={k}" in result.stdout and "int8   ok:" in result.stdout and "OK" in result.stdout


def test_example_reports_a_wrong_int8_result(example, tmp_path, generator):
    weight, io = write_int8_case(tmp_path, generator, 40, 128, 3, corrupt=True)
    result = subprocess.run([str(example), str(weight), str(io)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "MISMATCH" in result.stdout


def test_example_reports_a_wrong_result(example, tmp_path, generator):
    weight, io = write_case(tmp_path, generator, "quantlite", 40, 128, 3, corrupt=True)
    result = subprocess.run([str(example), str(weight), str(io)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "MISMATCH" in result.stdout


def test_example_refuses_a_file_that_is_not_safetensors(example, tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\xff" * 64)
    result = subprocess.run([str(example), str(bogus), str(bogus)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "not a safetensors file" in result.stderr
