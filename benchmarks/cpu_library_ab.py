"""Two builds of the CPU library in one process, interleaved: a baseline (e.g. main's) against this
checkout's, on the same weights and x, through ctypes only (no Python hop in either).

    .venv/bin/python -m benchmarks.cpu_library_ab /work/main/quantlite/_native/libquantlite_cpu.so

The baseline gets the layout its ABI version takes: version 3, the widened one (float32 scales,
int32 outlier columns, float32 values: what its prepare built), versions 4..native.ABI_VERSION the stored
one. Cases: M = 1 on the 4 weights of one SmolLM2 decoder layer as the runtime holds them
(--packed, default the benchmark cache's) and their sum, then random 4096 x 4096 and 11008 x 4096
weights with 0 and 1 % outliers; 1 thread (CPU time of the calling thread) and 2 (wall clock).
Each figure is the minimum over rounds in which the two libraries take turns, the steadiest
figure on a shared machine; the ratio is baseline / this checkout.
"""
from __future__ import annotations

import argparse
import ctypes
import time
from pathlib import Path

import torch

from benchmarks.machine import describe
from quantlite.kernels import native
from quantlite.kernels.prepared import prepare
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize


class WeightV3(ctypes.Structure):
    """ql_weight of ABI version 3: the widened layout."""

    _fields_ = [("n", ctypes.c_int64), ("k", ctypes.c_int64), ("block_size", ctypes.c_int64)] + \
               [(name, ctypes.c_void_p) for name in ("codes", "scales", "codebook", "row_ptr", "cols", "vals")] + \
               [("nnz", ctypes.c_int64)]


# ABI versions whose ql_weight is this checkout's (4: the stored layout; later versions added functions)
STORED_LAYOUT_VERSIONS = range(4, native.ABI_VERSION + 1)

_MATMUL_ARGS = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
                ctypes.c_int, ctypes.c_int, ctypes.c_int]


def load_library(path: Path) -> tuple[ctypes.CDLL, int]:
    library = ctypes.CDLL(str(path))
    library.ql_cpu_qmatmul.argtypes = _MATMUL_ARGS
    version = library.ql_abi_version()
    if version != 3 and version not in STORED_LAYOUT_VERSIONS:
        raise SystemExit(f"{path}: ABI version {version}; this benchmark builds structs for 3 and "
                         f"{STORED_LAYOUT_VERSIONS.start}..{native.ABI_VERSION}")
    return library, version


def weight_struct(qw: QWeight, version: int, keep: list) -> int:
    """The address of qw's ql_weight for a library of ABI `version` (its tensors kept alive in `keep`)."""
    if version in STORED_LAYOUT_VERSIONS:
        struct = native._struct(prepare(qw, "cpu"))
    else:
        wide = prepare(qw, "cpu", widened=True)
        struct = WeightV3(n=wide.n, k=wide.k, block_size=wide.block_size, codes=wide.codes.data_ptr(),
                          scales=wide.scales.data_ptr(), codebook=wide.codebook.data_ptr(),
                          row_ptr=wide.row_ptr.data_ptr(), cols=wide.cols.data_ptr() if wide.n_outliers else None,
                          vals=wide.vals.data_ptr() if wide.n_outliers else None, nnz=wide.n_outliers)
        keep.append(wide)
    keep.append(struct)
    return ctypes.addressof(struct)


def compare(label: str, qw: QWeight, libraries: list, threads: int, calls: int, rounds: int) -> list[float]:
    """[baseline, ours] microseconds per M = 1 call, each the minimum over interleaved rounds."""
    n, k = qw.shape
    x, y = torch.randn(k), torch.empty(n)  # (K,), (N,) float32
    keep: list = []
    structs = [weight_struct(qw, version, keep) for _, version in libraries]
    clock = time.thread_time if threads == 1 else time.perf_counter
    best = [float("inf")] * len(libraries)
    for round_index in range(rounds + 1):  # round 0 warms up
        for i, ((library, _), struct) in enumerate(zip(libraries, structs)):
            start = clock()
            for _ in range(calls):
                library.ql_cpu_qmatmul(struct, x.data_ptr(), 1, k, y.data_ptr(), n, 0, 0, threads)
            if round_index:
                best[i] = min(best[i], (clock() - start) / calls * 1e6)
    print(f"{label:<30} {n:>6} x {k:<5} {threads}t: baseline {best[0]:8.1f} us, this {best[1]:8.1f} us, "
          f"{best[0] / best[1]:5.2f}x", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline", type=Path, help="the baseline build's libquantlite_cpu.so")
    parser.add_argument("--packed", type=Path, default=Path.home() / ".cache" / "quantlite" / "bench-smollm2-default",
                        help="a converted SmolLM2 directory (its decoder layer 3 is timed)")
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    from quantlite.runtime.streaming import load

    libraries = [load_library(args.baseline), load_library(native.CPU_LIBRARY)]  # own handles: their own argtypes
    print(f"machine: {describe()}; baseline {args.baseline} (ABI {libraries[0][1]}), this checkout "
          f"{native.CPU_LIBRARY} (ABI {native.ABI_VERSION}); isa {native.cpu_isa()}")
    with load(args.packed) as model:
        model.generate("hi", max_new_tokens=2)  # every layer resident, its weights as the runtime holds them
        layer = list(model._resident.values())[3]
        weights = {name: value for name, value in layer.items() if isinstance(value, QWeight)}
        for threads in (1, 2):
            totals = [0.0, 0.0]
            for name, qw in weights.items():
                totals = [a + b for a, b in zip(totals, compare(name, qw, libraries, threads, 100, args.rounds))]
            print(f"{'one layer, 4 calls':<44} {threads}t: baseline {totals[0]:8.1f} us, this {totals[1]:8.1f} us, "
                  f"{totals[0] / totals[1]:5.2f}x", flush=True)
    generator = torch.Generator().manual_seed(0)
    for shape in [(4096, 4096), (11008, 4096)]:
        w = torch.randn(shape, generator=generator)
        for fraction in (0.0, 0.01):
            qw = quantize(w, outlier_frac=fraction)
            for threads in (1, 2):
                compare(f"random, {fraction:.0%} outliers", qw, libraries, threads, 5, max(5, args.rounds // 2))


if __name__ == "__main__":
    main()
