"""The GPU script of issue 5, for one call on an H100/H200: run the kernel tests on the GPU, then time
qmatmul on Llama-3-8B and -70B layer shapes against torch bf16 F.linear (cuBLAS) and bitsandbytes NF4
(when installed), and print GB/s against the card's measured copy bandwidth.

    .venv/bin/python -m benchmarks.gpu_kernels                        # tests, then every shape and M
    .venv/bin/python -m benchmarks.gpu_kernels --skip-tests --models 8b --m 1 16
    .venv/bin/python -m benchmarks.gpu_kernels --backends triton --markdown docs/kernels_h100.md
    .venv/bin/python -m benchmarks.gpu_kernels --sweep --models 8b --skip-tests   # also time other tiles
    .venv/bin/python -m benchmarks.gpu_kernels --compile-only             # no GPU needed: sm_90 registers

Goals (issue 5), as time ratios against bf16 F.linear on the same card in the same process:
    decode  M = 1:  >= 3x faster (>= 75% of copy bandwidth);  M = 16: >= 2.5x faster
    prefill M = 512, 2048: at most 1.3x slower
Weights are synthetic (random codes, positive scales, CSR outliers at --outlier-frac): the kernels'
speed depends on sizes and the outlier count, not on the values, and quantizing a 70B layer on the
CPU would take longer than the timings. Each timed call reads a different copy of the weight, with
enough copies to overflow L2, so decode figures are DRAM bandwidth, not cache hits.
"""
from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from benchmarks.machine import describe
from quantlite.codebook import nf4_codebook, zero_code
from quantlite.qweight import QWeight

# (hidden, kv_dim, intermediate) -> the five distinct Linear shapes (N, K) of one decoder layer.
MODELS = {"8b": (4096, 1024, 14336), "70b": (8192, 1024, 28672)}
DECODE_M = (1, 4, 16)
PREFILL_M = (512, 2048)
GOALS = {1: 3.0, 16: 2.5}          # decode: minimum speedup over bf16
PREFILL_MAX_SLOWDOWN = 1.3         # prefill: maximum time ratio ours / bf16
L2_FLUSH_BYTES = 256 * 2**20       # rotate weight copies until this many bytes: well past an H100/H200 L2
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Meta-parameter overrides tried by --sweep (quantlite.kernels.triton_qmatmul._tile_config is the default)
DECODE_SWEEP = [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w) for bn in (4, 8, 16) for bk in (256, 512) for w in (4, 8)]
SPLIT_SWEEP = (1, 2, 4, 8)
PREFILL_SWEEP = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=w)
                 for bm, bn, bk, w in ((64, 64, 128, 4), (64, 128, 64, 4), (128, 64, 64, 8), (128, 128, 64, 8))]
TEST_FILES = ("tests/test_triton_qmatmul.py", "tests/test_dispatch.py", "tests/test_qlinear.py")


def layer_shapes(model: str) -> dict[str, tuple[int, int]]:
    hidden, kv, inter = MODELS[model]
    return {"q/o_proj": (hidden, hidden), "k/v_proj": (kv, hidden), "gate/up_proj": (inter, hidden),
            "down_proj": (hidden, inter)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--m", nargs="+", type=int, default=[*DECODE_M, *PREFILL_M], help="rows of x (tokens)")
    parser.add_argument("--backends", nargs="+", choices=("triton", "cuda"), default=["triton", "cuda"],
                        help="quantlite back-ends to time (a dead one is reported and skipped)")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--outlier-frac", type=float, default=0.005, help="fraction of weights in the CSR table")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per measurement (median reported)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the kernel tests on the GPU first")
    parser.add_argument("--markdown", metavar="PATH", help="also write the results table to this Markdown file")
    parser.add_argument("--sweep", action="store_true",
                        help="also time the Triton kernel with each tile of DECODE_SWEEP / PREFILL_SWEEP "
                             "and, for M <= 16, each K split of SPLIT_SWEEP")
    parser.add_argument("--compile-only", action="store_true",
                        help="no GPU needed: compile the Triton kernel for sm_90 for each --m and --dtypes, "
                             "print registers, spills and shared memory, and exit")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16"],
                        help="x dtypes for --compile-only (the timings use bf16)")
    args = parser.parse_args(argv)
    if any(m < 1 for m in args.m):
        parser.error(f"--m values must be positive, got {args.m}")
    if not 0.0 <= args.outlier_frac <= 0.25:
        parser.error(f"--outlier-frac must be in [0, 0.25], got {args.outlier_frac}")
    if args.block_size % 16 or not 32 <= args.block_size <= 256:
        parser.error(f"--block-size must be a multiple of 16 in [32, 256], got {args.block_size}")
    if args.iters < 1:
        parser.error(f"--iters must be positive, got {args.iters}")
    return args


def synthetic_qweight(n: int, k: int, block_size: int, outlier_frac: float, device: str) -> QWeight:
    """A valid QWeight of shape (N, K): random codes and scales, round(outlier_frac * K) outliers per
    row, and the zero level's code under each outlier and in the padding (docs/FORMAT.md)."""
    n_blocks = -(-k // block_size)
    per_row = round(outlier_frac * k)
    # one random column in each of per_row equal strides of K: distinct and ascending by construction
    stride = k // max(per_row, 1)
    cols = torch.arange(per_row, device=device) * stride + torch.randint(0, stride, (n, per_row), device=device)
    codebook = nf4_codebook().to(device)
    codes = torch.randint(0, 16, (n, n_blocks * block_size), dtype=torch.uint8, device=device)  # (N, Kp)
    codes[:, k:] = zero_code(codebook)
    codes.scatter_(1, cols, zero_code(codebook))
    return QWeight(
        shape=(n, k), block_size=block_size, method="nf4", codebook=codebook,
        codes=codes[:, 0::2] | (codes[:, 1::2] << 4),  # (N, Kp // 2), low nibble = even column
        outlier_row_ptr=(torch.arange(n + 1, device=device) * per_row).to(torch.int32),
        outlier_cols=cols.reshape(-1).to(torch.int32).to(torch.uint16 if k <= 65536 else torch.int32),
        outlier_vals=torch.randn(n * per_row, device=device).to(torch.float16),
        scales=(torch.rand(n, n_blocks, device=device) * 0.02 + 1e-3).to(torch.float16),
    )


def compute_bytes(qw: QWeight) -> int:
    """Bytes a kernel must read for the weight in its compute layout (float32 scales, int32 CSR)."""
    n, _ = qw.shape
    return qw.codes.numel() + 4 * qw.scales.numel() + 4 * (n + 1) + 8 * qw.n_outliers


def median_ms(fn, copies: list, iters: int) -> float:
    """Median over `iters` calls of fn(copy), cycling through copies; CUDA events around each call."""
    for c in copies:
        fn(c)  # warm-up: compilation, lazy library loads, and each weight's compute layout (prepare)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(copies[i % len(copies)])
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: read + write bytes per second, the card's practical ceiling."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), [None], 20)
    return 2 * src.numel() / ms / 1e6


def bnb_linear():
    """(quantize(w) -> state, run(x, state) -> y) for bitsandbytes NF4, or None when not importable."""
    try:
        import bitsandbytes.functional as bnbf
        from bitsandbytes import matmul_4bit
    except ImportError:
        return None
    def quantize(w):
        return bnbf.quantize_4bit(w, quant_type="nf4", blocksize=64)
    def run(x, state):
        return matmul_4bit(x, state[0].t(), quant_state=state[1])
    return quantize, run


def compile_report(specs: list[tuple[int, str, int]]) -> list[str]:
    """For each (M, dtype name, block size): ptxas' registers, stack (spills) and shared memory of the
    specialisation qmatmul_triton launches, compiled for sm_90."""
    import triton

    from quantlite.kernels.triton_qmatmul import DECODE_MAX_M, compile_for_gpu

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    lines = []
    for m, dtype, block_size in specs:
        split = m <= 16  # narrow outputs split K on a big GPU (quantlite.kernels.triton_qmatmul._default_split)
        kernel = compile_for_gpu(m, DTYPES[dtype], block_size, split)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
            cubin.write(kernel.asm["cubin"])
            cubin.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                   text=True, check=True).stdout
        resources = next(line.split("Resource usage:")[-1].strip() for line in usage.splitlines() if "REG:" in line)
        kind = "decode" if m <= DECODE_MAX_M else "prefill"
        lines.append(f"sm_90 {kind:<7} M={m:<5} {dtype} B={block_size} split={split!s:<5} {resources} "
                     f"(Triton's shared memory: {kernel.metadata.shared} bytes)")
    return lines


def run_tests() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not the interpreter
    files = [f for f in TEST_FILES + tuple(sorted(_native_test_files())) if os.path.exists(f)]
    print(f"$ pytest -q {' '.join(files)}  (on the GPU)", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", "-q", *files], env=env)


def _native_test_files():
    return (os.path.join("tests", f) for f in os.listdir("tests") if f.startswith("test_native"))


def benchmark(args: argparse.Namespace) -> list[dict]:
    from quantlite.kernels.dispatch import available_backends, qmatmul

    status = available_backends()
    backends = [b for b in args.backends if status[b] is None]
    for dead in sorted(set(args.backends) - set(backends)):
        print(f"back-end {dead!r} skipped: {status[dead]}")
    bnb = bnb_linear()
    if bnb is None:
        print("bitsandbytes is not installed: its column stays empty")
    rows = []
    for model in args.models:
        for layer, (n, k) in layer_shapes(model).items():
            dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            qweight = synthetic_qweight(n, k, args.block_size, args.outlier_frac, "cuda")
            q_copies = [qweight] + [synthetic_qweight(n, k, args.block_size, args.outlier_frac, "cuda")
                                    for _ in range(math.ceil(L2_FLUSH_BYTES / compute_bytes(qweight)) - 1)]
            d_copies = [dense] + [dense.clone() for _ in range(math.ceil(L2_FLUSH_BYTES / (2 * n * k)) - 1)]
            b_copies = [bnb[0](d) for d in d_copies] if bnb else []
            for m in args.m:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"model": model, "layer": layer, "N": n, "K": k, "M": m,
                       "bf16_ms": median_ms(lambda w: F.linear(x, w), d_copies, args.iters),
                       "weight_bytes": compute_bytes(qweight)}
                if b_copies:
                    row["bnb_ms"] = median_ms(lambda s: bnb[1](x, s), b_copies, args.iters)
                for backend in backends:
                    row[f"{backend}_ms"] = median_ms(lambda w: qmatmul(x, w, backend=backend), q_copies, args.iters)
                rows.append(row)
                print(format_row(row, backends, args.copy_gbs), flush=True)
                if args.sweep:
                    print_sweep(x, q_copies, row, args)
            del dense, qweight, q_copies, d_copies, b_copies
            torch.cuda.empty_cache()
    return rows


def print_sweep(x: torch.Tensor, copies: list, row: dict, args: argparse.Namespace) -> None:
    """Time the Triton kernel with each tile of DECODE_SWEEP or PREFILL_SWEEP on this shape: the data
    _tile_config's choices should come from."""
    from quantlite.kernels.prepared import prepare
    from quantlite.kernels.triton_qmatmul import DECODE_MAX_M, qmatmul_triton

    for tile in DECODE_SWEEP if x.shape[0] <= DECODE_MAX_M else PREFILL_SWEEP:
        ms = median_ms(lambda w: qmatmul_triton(x, prepare(w, x.device), tile=tile), copies, args.iters)
        print(f"    sweep {tile}: {ms:8.3f} ms ({row['bf16_ms'] / ms:.2f}x bf16)", flush=True)
    for split in SPLIT_SWEEP if x.shape[0] <= 16 else ():
        ms = median_ms(lambda w: qmatmul_triton(x, prepare(w, x.device), split_k=split), copies, args.iters)
        print(f"    sweep split_k={split} (default tile): {ms:8.3f} ms ({row['bf16_ms'] / ms:.2f}x bf16)", flush=True)


def format_row(row: dict, backends: list[str], copy_gbs: float) -> str:
    parts = [f"{row['model']:>4} {row['layer']:<13} N={row['N']:<6} K={row['K']:<6} M={row['M']:<5}",
             f"bf16 {row['bf16_ms']:8.3f} ms"]
    if "bnb_ms" in row:
        parts.append(f"bnb {row['bnb_ms']:8.3f} ms ({row['bf16_ms'] / row['bnb_ms']:.2f}x)")
    for backend in backends:
        ms = row[f"{backend}_ms"]
        gbs = (row["weight_bytes"] + 2 * row["M"] * (row["K"] + row["N"])) / ms / 1e6
        parts.append(f"{backend} {ms:8.3f} ms ({row['bf16_ms'] / ms:.2f}x, {gbs:6.0f} GB/s = {gbs / copy_gbs:4.0%})")
    return " | ".join(parts)


def goal_report(rows: list[dict], backends: list[str]) -> list[str]:
    lines = []
    for backend in backends:
        for m in sorted({r["M"] for r in rows}):
            picked = [r for r in rows if r["M"] == m]
            # the whole layer: q, k, v, o, gate, up, down; the shape table lists each distinct shape once
            counts = {"q/o_proj": 2, "k/v_proj": 2, "gate/up_proj": 2, "down_proj": 1}
            for model in sorted({r["model"] for r in picked}):
                mine = [r for r in picked if r["model"] == model]
                ours = sum(counts[r["layer"]] * r[f"{backend}_ms"] for r in mine)
                base = sum(counts[r["layer"]] * r["bf16_ms"] for r in mine)
                if m in GOALS:
                    verdict = f"goal >= {GOALS[m]}x: {'met' if base / ours >= GOALS[m] else 'NOT met'}"
                elif m >= PREFILL_M[0]:
                    verdict = f"goal <= {PREFILL_MAX_SLOWDOWN}x slower: {'met' if ours / base <= PREFILL_MAX_SLOWDOWN else 'NOT met'}"
                else:
                    verdict = "no goal"
                lines.append(f"{backend:>6} {model:>4} layer M={m:<5} bf16 {base:8.3f} ms  ours {ours:8.3f} ms  "
                             f"speedup {base / ours:5.2f}x  ({verdict})")
    return lines


def write_markdown(path: str, rows: list[dict], backends: list[str], summary: list[str], header: str) -> None:
    columns = ["model", "layer", "N", "K", "M", "bf16_ms", *(["bnb_ms"] if rows and "bnb_ms" in rows[0] else []),
               *(f"{b}_ms" for b in backends)]
    with open(path, "w") as out:
        out.write(f"{header}\n\nCommand: `{' '.join(sys.argv)}`\n\n| {' | '.join(columns)} |\n"
                  f"|{'---|' * len(columns)}\n")
        for row in rows:
            out.write("| " + " | ".join(f"{row[c]:.4f}" if c.endswith("_ms") else str(row[c]) for c in columns) + " |\n")
        out.write("\nWhole layer (q, k, v, o, gate, up, down):\n\n```\n" + "\n".join(summary) + "\n```\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compile_only:
        print("\n".join(compile_report([(m, dtype, args.block_size) for dtype in args.dtypes for m in args.m])))
        return 0
    if not torch.cuda.is_available():
        print(f"benchmarks.gpu_kernels needs a CUDA GPU, and torch {torch.__version__} sees none "
              f"(CUDA build: {torch.version.cuda or 'none'}). Run it on an H100/H200; on this machine the "
              f"kernels are tested with `TRITON_INTERPRET=1 pytest tests/test_triton_qmatmul.py`.", file=sys.stderr)
        return 2
    header = f"machine: {describe()}"
    print(header)
    if not args.skip_tests and run_tests() != 0:
        print("kernel tests failed on the GPU: timings skipped", file=sys.stderr)
        return 1
    args.copy_gbs = copy_bandwidth_gbs()
    print(f"copy bandwidth (1 GiB device-to-device, read + write): {args.copy_gbs:.0f} GB/s")
    rows = benchmark(args)
    from quantlite.kernels.dispatch import available_backends

    backends = [b for b in args.backends if available_backends()[b] is None]
    summary = goal_report(rows, backends)
    print("\n".join(summary))
    if args.markdown:
        write_markdown(args.markdown, rows, backends, summary, f"{header}; copy bandwidth {args.copy_gbs:.0f} GB/s")
        print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
