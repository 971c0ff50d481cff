"""Where the native libraries and their C headers are, and the flags a C/C++ build needs to use them.

The build (CMakeLists.txt: `pip install`, `pip wheel`, `make native`) installs both into
quantlite/_native/: libquantlite_cpu.so, libquantlite_cuda.so (when nvcc was found) and include/
(quantlite.h, the ABI). Python loads the libraries from there (quantlite.kernels.native); a C
program compiles against the same files:

    python -m quantlite.native                        # the paths, and which library is built
    python -m quantlite.native --cflags --libs        # -I<include> -L<dir> -lquantlite_cpu -Wl,-rpath,<dir>
    python -m quantlite.native --libs --cuda          # link libquantlite_cuda instead
    cc $(python -m quantlite.native --cflags) app.c $(python -m quantlite.native --libs) -lm -o app
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

NATIVE_DIR = Path(__file__).resolve().parent / "_native"
INCLUDE_DIR = NATIVE_DIR / "include"
CPU_LIBRARY = NATIVE_DIR / "libquantlite_cpu.so"
CUDA_LIBRARY = NATIVE_DIR / "libquantlite_cuda.so"


def cflags() -> list[str]:
    return [f"-I{INCLUDE_DIR}"]


def libs(cuda: bool = False) -> list[str]:
    """Link flags; the rpath lets the program find the library where it is installed."""
    library = CUDA_LIBRARY if cuda else CPU_LIBRARY
    return [f"-L{NATIVE_DIR}", f"-l{library.stem.removeprefix('lib')}", f"-Wl,-rpath,{NATIVE_DIR}"]


def locations() -> dict[str, str]:
    """{"header": path, "cpu library": path, "cuda library": path}, each path or "not built: ..."."""
    def found(path: Path) -> str:
        return str(path) if path.exists() else f"not built ({path} is missing; run `make native` or `pip install .`)"

    return {"header": found(INCLUDE_DIR / "quantlite.h"), "cpu library": found(CPU_LIBRARY),
            "cuda library": found(CUDA_LIBRARY)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m quantlite.native", description=__doc__.split("\n\n")[0],
        epilog="Without flags, prints where the header and each library are (or why one is missing).")
    parser.add_argument("--cflags", action="store_true", help="print the compiler flags (-I the header folder)")
    parser.add_argument("--libs", action="store_true", help="print the linker flags (-L, -l, -Wl,-rpath)")
    parser.add_argument("--cuda", action="store_true", help="with --libs: link the CUDA library, not the CPU one")
    args = parser.parse_args(argv)
    if args.cuda and not args.libs:
        parser.error("--cuda goes with --libs")
    if not (args.cflags or args.libs):
        for name, path in locations().items():
            print(f"{name:<13} {path}")
        return 0
    wanted = [INCLUDE_DIR / "quantlite.h"] * args.cflags + [CUDA_LIBRARY if args.cuda else CPU_LIBRARY] * args.libs
    missing = [path for path in wanted if not path.exists()]
    if missing:
        print(f"quantlite.native: {missing[0]} is not built (run `make native` or `pip install .`)", file=sys.stderr)
        return 1
    print(" ".join(cflags() * args.cflags + libs(args.cuda) * args.libs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
