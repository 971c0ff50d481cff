"""Packaging lives in pyproject.toml; this file adds `build_native`, which compiles csrc/ into
quantlite/_native/ (the CPU library with the system compiler, the CUDA library when nvcc exists).

    python setup.py build_native        # what `make native` runs

CPU: every csrc/cpu/*.c with the system C compiler ($CC, default cc); files named *_avx2.c get
-mavx2 -mfma and are only called after a run-time cpuid check, so the library runs on any x86-64
(no -march=native). CUDA: csrc/cuda/*.cu for sm_80, sm_86, sm_89 and sm_90, compiled in parallel
(nvcc --threads); ptxas reports registers and spills per kernel, printed as a table, and a spill
fails the build (set QUANTLITE_ALLOW_SPILLS=1 to accept it while investigating). Without nvcc, or
with QUANTLITE_CUDA=0, the CUDA library is skipped with a notice. A compile error fails the build.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Command, setup

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
OUT_DIR = ROOT / "quantlite" / "_native"
BUILD_DIR = ROOT / "build" / "native"
CUDA_ARCHS = ("80", "86", "89", "90")
C_FLAGS = ["-O3", "-std=c11", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-Wall", "-Wextra"]
ISA_FLAGS = {"_avx2": ["-mavx2", "-mfma"], "_avx512": ["-mavx2", "-mfma", "-mavx512f"]}  # by file-name suffix


def _run(command: list[str], capture: bool = False) -> str:
    print(" ".join(command), flush=True)
    result = subprocess.run(command, cwd=ROOT, text=True, capture_output=capture)
    if result.returncode != 0:
        if capture:
            sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"build_native: command failed with exit status {result.returncode}: {command[0]}")
    return (result.stdout + result.stderr) if capture else ""


def _install(built: Path, library: Path) -> Path:
    """Move a freshly linked library into place with a rename: a process that has the old one
    loaded keeps its (unlinked) file, where writing over it in place could crash that process."""
    os.replace(built, library)
    return library


def build_cpu() -> Path:
    compiler = os.environ.get("CC", "cc")
    objects = []
    obj_dir = BUILD_DIR / "cpu"
    obj_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted((CSRC / "cpu").glob("*.c")):
        obj = obj_dir / (source.stem + ".o")
        extra = next((flags for suffix, flags in ISA_FLAGS.items() if source.stem.endswith(suffix)), [])
        _run([compiler, *C_FLAGS, *extra, f"-I{CSRC / 'include'}", "-c", str(source), "-o", str(obj)])
        objects.append(str(obj))
    built = obj_dir / "libquantlite_cpu.so"
    _run([compiler, "-shared", "-pthread", *objects, "-o", str(built), "-lm"])
    return _install(built, OUT_DIR / "libquantlite_cpu.so")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _resource_table(ptxas_log: str) -> list[tuple[str, str, int, int, int]]:
    """(kernel, arch, registers, spill store bytes, spill load bytes) from `-Xptxas -v` output."""
    rows = []
    kernel = arch = None
    for line in ptxas_log.splitlines():
        entry = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+)'", line)
        if entry:
            kernel, arch = entry.groups()
            spill_store = spill_load = 0
            continue
        spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if spills and kernel:
            spill_store, spill_load = int(spills.group(1)), int(spills.group(2))
        registers = re.search(r"Used (\d+) registers", line)
        if registers and kernel:
            rows.append((kernel, arch, int(registers.group(1)), spill_store, spill_load))
            kernel = None
    return rows


def _demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {name: name for name in names}
    result = subprocess.run([tool], input="\n".join(names), text=True, capture_output=True)
    readable = result.stdout.splitlines()
    return dict(zip(names, readable)) if len(readable) == len(names) else {name: name for name in names}


def build_cuda(nvcc: str) -> Path:
    sources = [str(path) for path in sorted((CSRC / "cuda").glob("*.cu"))]
    (BUILD_DIR / "cuda").mkdir(parents=True, exist_ok=True)
    built = BUILD_DIR / "cuda" / "libquantlite_cuda.so"
    gencode = [flag for arch in CUDA_ARCHS for flag in ("-gencode", f"arch=compute_{arch},code=sm_{arch}")]
    log = _run(
        [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC,-fvisibility=hidden", "-Xptxas", "-v",
         "--threads", "0", f"-I{CSRC / 'include'}", *gencode, *sources, "-o", str(built)],
        capture=True,
    )
    table = _resource_table(log)
    names = _demangle(sorted({row[0] for row in table}))
    print(f"{'kernel':<90} {'arch':<6} {'regs':>4} {'spill st':>8} {'spill ld':>8}")
    for kernel, arch, registers, spill_store, spill_load in sorted(table, key=lambda r: (names[r[0]], r[1])):
        print(f"{names[kernel][:90]:<90} {arch:<6} {registers:>4} {spill_store:>8} {spill_load:>8}")
    spilled = [row for row in table if row[3] or row[4]]
    if not table:
        raise SystemExit("build_native: ptxas printed no resource usage; cannot check for spills")
    if spilled and os.environ.get("QUANTLITE_ALLOW_SPILLS") != "1":
        raise SystemExit(
            f"build_native: {len(spilled)} kernel/arch pairs spill registers (table above); a spill is a bug to "
            "explain or fix (QUANTLITE_ALLOW_SPILLS=1 accepts it while investigating)"
        )
    return _install(built, OUT_DIR / "libquantlite_cuda.so")


class BuildNative(Command):
    description = "compile csrc/ into quantlite/_native/"
    user_options: list = []

    def initialize_options(self):
        pass

    def finalize_options(self):
        pass

    def run(self):
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        print(f"build_native: CPU library -> {build_cpu()}")
        if os.environ.get("QUANTLITE_CUDA") == "0":
            print("build_native: notice: QUANTLITE_CUDA=0, skipping the CUDA library")
            return
        nvcc = find_nvcc()
        if nvcc is None:
            print("build_native: notice: nvcc not found (PATH, $CUDA_HOME, /usr/local/cuda); "
                  "skipping the CUDA library, the CPU library is complete")
            return
        print(f"build_native: CUDA library -> {build_cuda(nvcc)}")


setup(cmdclass={"build_native": BuildNative})
