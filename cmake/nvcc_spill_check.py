"""The CUDA compiler launcher of CMakeLists.txt: run one nvcc command (compiled with -Xptxas=-v),
print ptxas's registers and spill bytes per kernel and arch as a table, and fail when a kernel
spills: a spill is a bug to explain or fix.

    python nvcc_spill_check.py [--allow-spills] NVCC ARGS...

--allow-spills (CMake: -DQUANTLITE_ALLOW_SPILLS=ON) prints the table and accepts spills while
investigating. A compile error fails with nvcc's own exit status and output.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys


def resource_table(ptxas_log: str) -> list[tuple[str, str, int, int, int]]:
    """(kernel, arch, registers, spill store bytes, spill load bytes) from `-Xptxas -v` output."""
    rows = []
    kernel = arch = None
    spill_store = spill_load = 0
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


def demangle(names: list[str]) -> dict[str, str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return {name: name for name in names}
    result = subprocess.run([tool], input="\n".join(names), text=True, capture_output=True)
    readable = result.stdout.splitlines()
    return dict(zip(names, readable)) if len(readable) == len(names) else {name: name for name in names}


def main(argv: list[str]) -> int:
    allow_spills = bool(argv) and argv[0] == "--allow-spills"
    command = argv[1:] if allow_spills else argv
    if not command:
        sys.exit("usage: nvcc_spill_check.py [--allow-spills] NVCC ARGS...")
    result = subprocess.run(command, text=True, capture_output=True)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        sys.stderr.write(log)
        return result.returncode
    table = resource_table(log)
    source = next((arg for arg in reversed(command) if arg.endswith(".cu")), "?")
    if not table:
        if "__global__" not in open(source, encoding="utf-8", errors="replace").read():
            return 0  # a file without kernels: nothing for ptxas to report
        sys.exit(f"nvcc_spill_check: ptxas printed no resource usage for {source}; cannot check for spills")
    names = demangle(sorted({row[0] for row in table}))
    print(f"{source}:")
    print(f"  {'kernel':<90} {'arch':<6} {'regs':>4} {'spill st':>8} {'spill ld':>8}")
    for kernel, arch, registers, spill_store, spill_load in sorted(table, key=lambda r: (names[r[0]], r[1])):
        print(f"  {names[kernel][:90]:<90} {arch:<6} {registers:>4} {spill_store:>8} {spill_load:>8}")
    spilled = [row for row in table if row[3] or row[4]]
    if spilled and not allow_spills:
        sys.exit(f"nvcc_spill_check: {len(spilled)} kernel/arch pairs in {source} spill registers (table above); "
                 "a spill is a bug to explain or fix (-DQUANTLITE_ALLOW_SPILLS=ON or QUANTLITE_ALLOW_SPILLS=1 "
                 "accepts it while investigating)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
