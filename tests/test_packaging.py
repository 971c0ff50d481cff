"""The build: `pip wheel .` (scikit-build-core running CMakeLists.txt) gives a wheel with the native CPU
library and the C headers, and that wheel, installed into a fresh venv, works from outside the
source tree: `quantlite info` shows the CPU back-end live from the installed library, the native
kernel tests pass against it, and the C example compiles and runs against the installed header and
library (`python -m quantlite.native --cflags --libs`). Also: the sdist carries csrc/ and no built
file, the CUDA compiler launcher's spill check (cmake/nvcc_spill_check.py) on ptxas output, and
`python -m quantlite.native` in this tree.

The wheel is CPU-only (QUANTLITE_CUDA=OFF: the CUDA build costs minutes on 2 cores, and nothing here
can run it). The fresh venv reuses this environment's packages (torch is not downloaded again)
through a .pth line, which adds the folder without running its .pth files, so an editable install of
the source tree cannot shadow the wheel; each check asserts which quantlite it ran.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from quantlite import native

ROOT = Path(__file__).resolve().parents[1]
SPILL_CHECK = ROOT / "cmake" / "nvcc_spill_check.py"


def run(command: list, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


# ---------------------------------------------------------------- python -m quantlite.native here
def test_native_flags_point_at_the_built_header_and_library():
    result = run([sys.executable, "-m", "quantlite.native", "--cflags", "--libs"], cwd=ROOT)
    flags = result.stdout.split()
    assert flags == [f"-I{native.INCLUDE_DIR}", f"-L{native.NATIVE_DIR}", "-lquantlite_cpu",
                     f"-Wl,-rpath,{native.NATIVE_DIR}"]
    assert (native.INCLUDE_DIR / "quantlite.h").is_file() and native.CPU_LIBRARY.is_file()
    listing = run([sys.executable, "-m", "quantlite.native"], cwd=ROOT).stdout
    assert f"cpu library   {native.CPU_LIBRARY}" in listing


def test_native_flags_refuse_cuda_without_libs():
    result = subprocess.run([sys.executable, "-m", "quantlite.native", "--cflags", "--cuda"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "--cuda goes with --libs" in result.stderr


# ---------------------------------------------------------------- the spill check (no nvcc needed)
PTXAS_LOG = """ptxas info    : Compiling entry function '_Z4gemvPf' for 'sm_80'
ptxas info    : Function properties for _Z4gemvPf
    {store} bytes stack frame, {store} bytes spill stores, {load} bytes spill loads
ptxas info    : Used 72 registers, 380 bytes cmem[0]
ptxas info    : Compiling entry function '_Z4gemvPf' for 'sm_90'
ptxas info    : Function properties for _Z4gemvPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 70 registers, 380 bytes cmem[0]
"""


def fake_nvcc(tmp_path: Path, log: str, exit_status: int = 0) -> list:
    """A command that prints `log` like nvcc -Xptxas=-v and exits with exit_status; its last argument is a .cu."""
    source = tmp_path / "gemv.cu"
    source.write_text("__global__ void gemv(float *y) {}\n")
    return [sys.executable, "-c", f"import sys; sys.stderr.write({log!r}); sys.exit({exit_status})", "-c", source]


@pytest.mark.parametrize("store, load", [(0, 0), (8, 0), (0, 4)])
def test_spill_check_prints_the_table_and_fails_on_a_spill(tmp_path, store, load):
    command = fake_nvcc(tmp_path, PTXAS_LOG.format(store=store, load=load))
    result = subprocess.run([sys.executable, SPILL_CHECK, *command], capture_output=True, text=True)
    assert "sm_80" in result.stdout and "sm_90" in result.stdout and " 72 " in result.stdout
    assert result.returncode == (1 if store or load else 0), result.stdout + result.stderr
    if store or load:
        assert "1 kernel/arch pairs" in result.stderr
        allowed = subprocess.run([sys.executable, SPILL_CHECK, "--allow-spills", *command], capture_output=True, text=True)
        assert allowed.returncode == 0


def test_spill_check_passes_a_compile_error_through(tmp_path):
    command = fake_nvcc(tmp_path, "gemv.cu(3): error: expected a ';'\n", exit_status=2)
    result = subprocess.run([sys.executable, SPILL_CHECK, *command], capture_output=True, text=True)
    assert result.returncode == 2 and "expected a ';'" in result.stderr


def test_spill_check_fails_without_ptxas_report_for_a_kernel_file(tmp_path):
    result = subprocess.run([sys.executable, SPILL_CHECK, *fake_nvcc(tmp_path, "")], capture_output=True, text=True)
    assert result.returncode == 1 and "printed no resource usage" in result.stderr


# ---------------------------------------------------------------- the wheel, installed in a fresh venv
def build_tools_missing() -> str | None:
    if importlib.util.find_spec("scikit_build_core") is None:
        return "scikit-build-core is not installed (pip install '.[test]')"
    if shutil.which("cmake", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])) is None:
        return "cmake is not installed (pip install '.[test]')"
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        return "no C compiler (cc / gcc) on PATH"
    return None


@pytest.mark.slow
def test_sdist_carries_the_sources_and_no_built_library(tmp_path):
    missing = build_tools_missing()
    if missing:
        pytest.skip(f"cannot build an sdist here: {missing}")
    name = run([sys.executable, "-c", f"from scikit_build_core.build import build_sdist; print(build_sdist({str(tmp_path)!r}))"],
               cwd=ROOT).stdout.split()[-1]
    with tarfile.open(tmp_path / name) as sdist:
        members = {member.split("/", 1)[1] for member in sdist.getnames() if "/" in member}
    for wanted in ("CMakeLists.txt", "cmake/nvcc_spill_check.py", "csrc/include/quantlite.h", "csrc/examples/qmatmul_example.c",
                   *(str(path.relative_to(ROOT)) for path in (ROOT / "csrc").glob("*/*.c*"))):
        assert wanted in members
    assert not [member for member in members if member.endswith(".so") or member.startswith("build/")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """Build the CPU-only wheel, install it into a fresh venv: {"wheel", "python", "bin", "site", "cwd"}."""
    missing = build_tools_missing()
    if missing:
        pytest.skip(f"cannot build a wheel here: {missing}")
    work = tmp_path_factory.mktemp("packaging")
    run([sys.executable, "-m", "pip", "wheel", ROOT, "--no-deps", "--no-build-isolation", "--wheel-dir", work / "dist",
         "-C", "cmake.define.QUANTLITE_CUDA=OFF"], cwd=work)
    (wheel,) = (work / "dist").glob("quantlite-*.whl")
    venv = work / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=work)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=work).stdout.strip())
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=work)
    # after the install, so that pip never sees (nor offers to replace) this environment's quantlite
    reused = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (site / "reuse_test_environment.pth").write_text("".join(f"{path}\n" for path in reused))
    outside = work / "elsewhere"  # not the source tree: `python -m` puts the working folder first on sys.path
    outside.mkdir()
    return {"wheel": wheel, "python": python, "bin": venv / "bin", "site": site, "cwd": outside}


@pytest.mark.slow
def test_wheel_carries_the_cpu_library_and_headers(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "quantlite/_native/libquantlite_cpu.so" in names
    assert "quantlite/_native/include/quantlite.h" in names
    assert "quantlite/_native/libquantlite_cuda.so" not in names  # QUANTLITE_CUDA=OFF, and no stray file from the tree
    assert "quantlite/kernels/native.py" in names and "quantlite/cli/info.py" in names
    assert installed["wheel"].name.endswith("-py3-none-linux_x86_64.whl") or sys.platform != "linux"


@pytest.mark.slow
def test_quantlite_info_shows_the_installed_cpu_backend_live(installed):
    report = json.loads(run([installed["bin"] / "quantlite", "info", "--json"], cwd=installed["cwd"]).stdout)
    installed_native = installed["site"] / "quantlite" / "_native"
    assert report["native"]["cpu library"] == str(installed_native / "libquantlite_cpu.so")
    assert report["native"]["header"] == str(installed_native / "include" / "quantlite.h")
    assert report["native"]["cuda library"].startswith("not built")
    assert report["backends"]["cpu"] is None and report["default_backend"]["cpu"] == "cpu"


@pytest.mark.slow
def test_native_kernel_tests_pass_against_the_installed_library(installed):
    # the same tests as here, run by the fresh venv's python from outside the tree; the first check
    # fails them all if quantlite came from anywhere but the wheel
    (installed["cwd"] / "from_the_wheel.py").write_text(  # a plugin: loaded before the tests are collected
        "import quantlite.kernels.native as native\n"
        f"assert str(native.CPU_LIBRARY).startswith({str(installed['site'])!r}), native.CPU_LIBRARY\n")
    result = run([installed["python"], "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "from_the_wheel",
                  ROOT / "tests" / "test_native.py"], cwd=installed["cwd"])
    assert " passed" in result.stdout  # (run() already asserts exit status 0: nothing failed)


@pytest.mark.slow
def test_c_example_builds_against_the_installed_header_and_library(installed, tmp_path, generator):
    from test_embed_example import write_case

    flags = run([installed["python"], "-m", "quantlite.native", "--cflags", "--libs"], cwd=installed["cwd"]).stdout.split()
    installed_native = installed["site"] / "quantlite" / "_native"
    assert f"-I{installed_native / 'include'}" in flags and f"-L{installed_native}" in flags
    binary = tmp_path / "qmatmul_example"
    compiler = shutil.which("cc") or shutil.which("gcc")
    run([compiler, "-O2", "-std=c11", "-Wall", "-Wextra", "-Werror", ROOT / "csrc" / "examples" / "qmatmul_example.c",
         *flags, "-lm", "-o", binary], cwd=tmp_path)
    weight, io = write_case(tmp_path, generator, "quantlite", 65, 192, 3)
    result = run([binary, weight, io], cwd=tmp_path, timeout=60)
    assert "M=3 N=65 K=192" in result.stdout and "OK" in result.stdout
