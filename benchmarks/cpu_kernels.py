"""The native CPU kernels against their baselines, in one run on this machine, as ratios.

    .venv/bin/python -m benchmarks.cpu_kernels                 # qmatmul + encode_codes
    .venv/bin/python -m benchmarks.cpu_kernels --runtime       # + SmolLM2 decode tokens/s
    .venv/bin/python -m benchmarks.cpu_kernels --threads 1 --cpu-time   # steadiest on a shared machine
    .venv/bin/python -m benchmarks.cpu_kernels --m 1,4,8,16 --no-bnb-matmul   # other batch sizes
    .venv/bin/python -m benchmarks.cpu_kernels --only bandwidth              # the issue 12 goal alone
    .venv/bin/python -m benchmarks.cpu_kernels --only bandwidth --isa avx2   # int8 / float32 as on an AVX2-only CPU
    .venv/bin/python -m benchmarks.cpu_kernels --only decode --packed DIR    # SmolLM2's per-layer calls
    .venv/bin/python -m benchmarks.cpu_kernels --only qmatmul --isa avx2     # as on an AVX2-only CPU
    .venv/bin/python -m benchmarks.cpu_kernels --only qmatmul --back-to-back # the method before: no settling

0. Bandwidth (issue 12): M = 1 on 4096 x 4096 and 11008 x 4096, all threads: the bytes the kernel
   reads per call (codes, scales as stored and the CSR outliers of the compute layout) over its time,
   as a fraction of this machine's DRAM read bandwidth, measured in the same process and
   interleaved with it: torch.sum over a float32 buffer of max(1 GiB, 3 x L3). The kernel cycles
   through copies of the weight that together also exceed 2 x L3, so every call reads from DRAM as
   in a model (one weight called over and over sits in L3: printed as "hot" for comparison). Goal:
   >= 0.70 of the DRAM bandwidth: the fraction is the median over rounds of each round's kernel
   rate over that round's DRAM rate, printed with its range. Each shape has two rows: the default
   float32 path and the int8-activation opt-in (activations="int8", ql_cpu_qmatmul_q8act), timed in
   the same rounds against the same DRAM reading. Then the int8 kernel on one thread at M = 1..64
   against the float32 kernel of the same instruction set and against the portable C rule (the int8
   path of a CPU without AVX2): --isa avx2 times the AVX2 int8 kernel as an AVX2-only CPU runs it.
1. qmatmul, M = 1, 8, 16 and 128 (--m; 128 = prefill), on 4096 x 4096, 11008 x 4096 and
   4096 x 11008 (NF4, block 64, 0.5 % outliers): native `qmatmul_cpu` (the ISA cpuid picks, and
   forced to AVX2 for comparison; with AVX-512 from M = 16 on that is the library's prefill GEMM,
   csrc/cpu/gemm_avx512.c) against torch fp32 `F.linear` on the dequantized weight and against
   bitsandbytes' CPU `matmul_4bit` on the same weights. Goals: issue 6 (M = 1 >= 2.5x
   torch fp32, >= 10x bitsandbytes; M = 8 >= 2x torch fp32, >= 10x bitsandbytes) and issue 12
   (prefill not slower than torch fp32). --isa avx2 runs the machine as an AVX2-only CPU would: the
   native calls forced to AVX2 (from M = 16 on its prefill GEMM, csrc/cpu/gemm_avx2.c) and torch's
   BLAS restricted to AVX2 too (MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2,
   ATEN_CPU_CAPABILITY=avx2, set before torch loads: the benchmark starts itself again with them),
   so the baseline is torch's fp32 F.linear as it runs on such a CPU; the instruction set MKL
   reports is printed. Where the CPU runs AVX-512, an 'int8' column times the int8-activation opt-in
   (activations="int8") in the same rounds, with its ratios to the float path and to torch fp32 (issue
   12, eighth round: from M = 24 on its VNNI GEMM, csrc/cpu/gemm_q8act_avx512.c; goal: at M >= 64 at
   least as fast as the float GEMM).
2. encode_codes (the quantizer's code step) against bitsandbytes' `quantize_4bit` (which also
   computes the absmax scales) and against the torch path of quantlite/quantizer.py. Goal: >= 2x
   bitsandbytes.
3. decode (issues 11 and 12: the decode step's small calls): M = 1 on the 4 weights of one decoder layer
   of a converted SmolLM2 (--packed, default the benchmark cache's) as the runtime holds them
   (compute_ready), 1 and 2 threads, and their sum per layer; the fixed cost of one call (a 32 x 64
   weight, through dispatch.qmatmul and through native.qmatmul_cpu); and the cost of an outlier
   (random weights quantized with 0 and 1 % outliers, every vector ISA: the time difference over the
   outlier count). Times are the minimum over rounds (wall clock; --cpu-time with --threads 1 for the
   calling thread's CPU time), the steadiest figure on a shared machine. Run it on two builds (e.g.
   main and a branch) to compare them: the two libraries cannot share one process.
4. --runtime: SmolLM2-135M-Instruct (converted to 4-bit with `quantlite convert`) decoding on the
   CPU with the dispatch's choice (the native library) against the torch reference back-end.
Times are medians of interleaved repeats (a baseline and ours alternate, so a noisy neighbour hits
both; each baseline is paired with ours on its own), and ratios the median of each round's pair with
its range; every timed call follows a 50 ms sleep (torch's OpenMP threads spin for milliseconds after
each call and would take the core our second thread needs) and, but in the bandwidth section, one
untimed call of its own, so each library is timed in its steady state. All use torch's thread count
(--threads sets it, default all cores; 1 is the steadiest on a shared machine).
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import cpu_flags, describe
from quantlite.codebook import nf4_codebook
from quantlite.kernels import native
from quantlite.kernels.prepared import prepare
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N, K) = (out, in)


# Wall time by default. With one thread, every baseline and our kernel run on the calling thread,
# and --cpu-time measures that thread's CPU time instead: on a machine shared with other jobs the
# wall clock mostly measures the neighbours (here: 1.6 ms of CPU took 6.4 ms of wall time).
CLOCK = time.perf_counter


# Before each timed call the benchmark sleeps this long: longer than torch's OpenMP workers spin after
# a call (libgomp's default, 300,000 pauses: a native two-thread call made right after a torch call
# got its second thread 5-15 ms late, loaded machine; 50 ms after it, at once). Without it every
# native call timed right after a torch one ran its first milliseconds on one core, while torch's
# calls after ours lost at most our pool's 0.3 ms spin: a bias against whichever side runs second.
SETTLE_SECONDS = 0.05
SETTLE = True  # --back-to-back: no sleep and no lead-in call (the method before; to see what they change)


def interleaved_samples(functions: dict, repeats: int, lead_in: bool = True) -> dict[str, list[float]]:
    """{name: seconds of each round}: every round runs each function in turn, timed after SETTLE_SECONDS
    of sleep (nobody's threads spinning) and, with lead_in, one untimed call of its own (its threads
    awake and spinning, as in a run of calls: each library timed in its own steady state). Rounds
    alternate the functions, so a noisy neighbour hits all of them; a warm-up call of each first."""
    for fn in functions.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            if SETTLE:
                time.sleep(SETTLE_SECONDS)
            if lead_in and SETTLE:
                fn()
            start = CLOCK()
            fn()
            samples[name].append(CLOCK() - start)
    return samples


def interleaved_medians(functions: dict, repeats: int) -> dict[str, float]:
    """{name: median seconds} of interleaved_samples."""
    return {name: statistics.median(times) for name, times in interleaved_samples(functions, repeats).items()}


def paired_ratios(samples: dict[str, list[float]], baseline: str, ours: str) -> tuple[float, float, float]:
    """Median, min and max over rounds of baseline time / our time, each round's pair on its own."""
    ratios = [b / o for b, o in zip(samples[baseline], samples[ours])]
    return statistics.median(ratios), min(ratios), max(ratios)


def l3_bytes() -> int:
    """The last-level cache of CPU 0 (sysfs), or 256 MiB when sysfs does not say."""
    try:
        size = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[size[-1]]
    except (OSError, ValueError, KeyError, IndexError):
        return 256 << 20


def weight_copy(qw: QWeight) -> QWeight:
    """The same weight in fresh memory (every tensor cloned), so its compute layout is fresh too."""
    return QWeight(**{name: value.clone() if isinstance(value, torch.Tensor) else value
                      for name, value in qw.__dict__.items()})


def bytes_read(qw: QWeight) -> int:
    """Bytes of the compute layout (the stored tensors) one M = 1 call reads: codes, scales as stored
    (with double quantization's group min / step), CSR row_ptr / cols / vals."""
    layout = prepare(qw, "cpu")
    tensors = (layout.codes, layout.scales, layout.row_ptr, layout.cols, layout.vals, layout.scale_group_min,
               layout.scale_group_step)
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def int8_kernel(isa: str) -> str:
    """Which ql_cpu_qmatmul_q8act kernel a call forced to `isa` runs here (api.c's choice)."""
    ran = native.cpu_isa() if isa == "auto" else isa
    if ran == "avx512" and {"avx512bw", "avx512_vnni"} <= cpu_flags():
        return "the AVX-512 VNNI kernel"
    return "the AVX2 kernel" if ran in ("avx2", "avx512") else "the portable C rule"


def bench_bandwidth(repeats: int, isa: str) -> None:
    l3 = l3_bytes()
    buffer = torch.ones(max(1 << 30, 3 * l3) // 4)  # float32
    read_dram = lambda: buffer.sum()  # noqa: E731
    print(f"\n== M = 1 against DRAM read bandwidth ({torch.get_num_threads()} threads; torch.sum over "
          f"{buffer.numel() * 4 / 2**30:.2f} GiB, L3 {l3 / 2**20:.0f} MiB)")
    print("(fraction: the median over rounds of the kernel's GB/s over the DRAM GB/s of the same round; range: "
          "its lowest and highest; path: the default float32 activations, and the int8-activation opt-in)")
    print(f"(native calls at isa={isa}: float32 rows {native.cpu_isa() if isa == 'auto' else isa}, int8 rows "
          f"{int8_kernel(isa)})")
    print(f"{'N x K':>13} {'path':>8} {'MB/call':>8} {'copies':>6} {'DRAM GB/s':>9} {'native ms':>9} {'GB/s':>6} "
          f"{'fraction':>8} {'range':>9} {'hot ms':>7} {'hot GB/s':>8}")
    for n, k in SHAPES[:2]:
        qw = quantize(torch.randn(n, k), method="nf4", outlier_frac=0.005)
        per_call = bytes_read(qw)
        copies = [qw] + [weight_copy(qw) for _ in range(math.ceil(2 * l3 / per_call))]
        x = torch.randn(1, k)
        for copy in copies:
            native.qmatmul_cpu(x, copy)  # prepares every copy's layout before timing

        def cold(activations: str):
            def run() -> None:
                for copy in copies:
                    native.qmatmul_cpu(x, copy, activations=activations, isa=isa)
            return run

        # no lead-in call: it would leave a copy in L3; the settling sleep still lets torch's threads stop
        paths = ("float32", "int8")
        functions = {"dram": read_dram}
        for path in paths:
            functions[f"cold {path}"] = cold(path)
            functions[f"hot {path}"] = functools.partial(native.qmatmul_cpu, x, qw, activations=path, isa=isa)
        samples = interleaved_samples(functions, repeats, lead_in=False)
        for name in samples:
            samples[name] = [seconds / (len(copies) if name.startswith("cold") else 1) for seconds in samples[name]]
        t = {name: statistics.median(times) for name, times in samples.items()}
        bandwidth = buffer.numel() * 4 / t["dram"]
        for path in paths:
            cold_seconds, hot_seconds = t[f"cold {path}"], t[f"hot {path}"]
            fraction, low, high = paired_ratios({"kernel": [per_call / s for s in samples[f"cold {path}"]],
                                                 "dram": [buffer.numel() * 4 / s for s in samples["dram"]]}, "kernel", "dram")
            print(f"{n:>6} x {k:<5} {path:>8} {per_call / 1e6:8.2f} {len(copies):>6} {bandwidth / 1e9:9.1f} "
                  f"{cold_seconds * 1e3:9.3f} {per_call / cold_seconds / 1e9:6.1f} {fraction:8.2f} "
                  f"{f'{low:.2f}-{high:.2f}':>9} {hot_seconds * 1e3:7.3f} {per_call / hot_seconds / 1e9:8.1f}")
        del copies
    del buffer


INT8_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


def bench_int8_kernels(repeats: int, isa: str) -> None:
    """The int8-activation kernel at `isa` against the float32 kernel at the same isa (from M = 16 on its
    prefill GEMM) and against the portable rule (isa="scalar", the int8 path of a CPU without AVX2),
    one thread, one weight called over and over (from L3 at these sizes), M = 1..64."""
    ran = native.cpu_isa() if isa == "auto" else isa
    print(f"\n== int8 activations, one thread: ms per call (median over rounds; 'x' = the median over rounds "
          f"of the other's time / int8's, range = its lowest and highest); int8 = {int8_kernel(isa)}, "
          f"float32 = the {ran} float kernel, rule = the portable C rule (int8, isa=scalar)")
    print(f"{'N x K':>13} {'M':>3} {'float32':>9} {'int8':>9} {'rule':>9} {'vs float32':>10} {'range':>9} "
          f"{'vs rule':>8} {'range':>11}")
    for n, k in SHAPES[:2]:
        qw = quantize(torch.randn(n, k), method="nf4", outlier_frac=0.005)
        for m in INT8_BATCH_SIZES:
            x = torch.randn(m, k)
            timed = {name: functools.partial(native.qmatmul_cpu, x, qw, isa=call_isa, activations=activations, n_threads=1)
                     for name, call_isa, activations in (("float32", isa, "float32"), ("int8", isa, "int8"),
                                                         ("rule", "scalar", "int8"))}
            samples = interleaved_samples(timed, repeats)
            t = {name: statistics.median(times) for name, times in samples.items()}
            vs_float, float_low, float_high = paired_ratios(samples, "float32", "int8")
            vs_rule, rule_low, rule_high = paired_ratios(samples, "rule", "int8")
            print(f"{n:>6} x {k:<5} {m:>3} {t['float32'] * 1e3:9.2f} {t['int8'] * 1e3:9.2f} {t['rule'] * 1e3:9.2f} "
                  f"{vs_float:9.2f}x {f'{float_low:.2f}-{float_high:.2f}':>9} {vs_rule:7.1f}x "
                  f"{f'{rule_low:.1f}-{rule_high:.1f}':>11}")


# What makes torch run as on a CPU with AVX2 and no AVX-512 (read when torch and its BLAS load).
AVX2_ONLY_ENVIRONMENT = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def mkl_instruction_set() -> str:
    """The instruction set MKL's sgemm runs with in this process ("AVX2", "AVX-512"), from the banner
    of its verbose mode (written to file descriptor 1), or "unknown"."""
    sys.stdout.flush()
    with tempfile.TemporaryFile(mode="w+") as log:
        saved = os.dup(1)
        os.dup2(log.fileno(), 1)
        try:
            with torch.backends.mkl.verbose(torch.backends.mkl.VERBOSE_ON):
                torch.nn.functional.linear(torch.ones(4, 64), torch.ones(64, 64))
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        found = re.search(r"\(Intel\(R\) (AVX[^)]*)\)", log.read())
    return found.group(1) if found else "unknown"


def bench_qmatmul(repeats: int, with_bnb: bool, batch_sizes: list[int], isa: str) -> None:
    import bitsandbytes
    import bitsandbytes.functional as bnb_functional

    # Each ratio comes from its own interleaved pair: bitsandbytes' OpenMP threads keep spinning for a
    # while after each of its calls and slow whatever runs next on the other core, so a native call
    # timed right after one would be charged for bitsandbytes' threads (at 2 threads, M = 1 measured
    # 1.68 ms for 4096 x 4096 after bitsandbytes calls, 1.25 ms after torch's).
    ran = native.cpu_isa() if isa == "auto" else isa
    also_avx2 = ran != "avx2"
    forced = "" if isa == "auto" else ", forced"
    avx2_column = "; 'avx2' = the same call forced to AVX2" if also_avx2 else ""
    # the opt-in's VNNI kernels and GEMM (the AVX2 int8 kernel, which has no GEMM, is timed in --only bandwidth)
    with_int8 = int8_kernel(isa) == "the AVX-512 VNNI kernel"
    int8_column = ("; 'int8' = the int8-activation opt-in (activations=\"int8\"; from M = 24 its VNNI GEMM), in the "
                   "same rounds, 'int8 vs' = the median over rounds of native / int8 and of torch / int8") if with_int8 else ""
    print(f"\n== qmatmul: ms per call (median over rounds; vs fp32 = the median over rounds of torch / native {ran}{forced}"
          f" within each round, range = its lowest and highest; each group timed on its own{avx2_column}{int8_column}); "
          f"torch's MKL runs {mkl_instruction_set()}")
    print(f"{'N x K':>13} {'M':>3} {'torch fp32':>11} {'native':>8} " + (f"{'avx2':>8} " if also_avx2 else "")
          + f"{'vs fp32':>8} {'range':>9} " + (f"{'int8':>8} {'int8 vs native':>14} {'int8 vs fp32':>12} " if with_int8 else "")
          + f"{'bnb 4bit':>10} {'native':>8} {'vs bnb':>8}")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        qw = quantize(w, method="nf4", outlier_frac=0.005)
        dense = qw.dequantize()  # (N, K) float32, what the fp32 baseline multiplies by
        packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
        for m in batch_sizes:
            x = torch.randn(m, k)
            ours = lambda: native.qmatmul_cpu(x, qw, isa=isa)  # noqa: E731
            timed = {"torch": lambda: torch.nn.functional.linear(x, dense), "native": ours}
            if also_avx2:
                timed["avx2"] = lambda: native.qmatmul_cpu(x, qw, isa="avx2")
            if with_int8:
                timed["int8"] = lambda: native.qmatmul_cpu(x, qw, isa=isa, activations="int8")
            samples = interleaved_samples(timed, repeats)
            fp32 = {name: statistics.median(times) for name, times in samples.items()}
            ratio, low, high = paired_ratios(samples, "torch", "native")
            row = (f"{n:>6} x {k:<5} {m:>3} {fp32['torch'] * 1e3:11.2f} {fp32['native'] * 1e3:8.2f} "
                   + (f"{fp32['avx2'] * 1e3:8.2f} " if also_avx2 else "") + f"{ratio:7.2f}x {f'{low:.2f}-{high:.2f}':>9}")
            if with_int8:
                row += (f" {fp32['int8'] * 1e3:8.2f} {paired_ratios(samples, 'native', 'int8')[0]:13.2f}x"
                        f" {paired_ratios(samples, 'torch', 'int8')[0]:11.2f}x")
            if with_bnb:
                bnb = interleaved_medians({"bnb": lambda: bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state),
                                           "native": ours}, repeats)
                row += f" {bnb['bnb'] * 1e3:10.2f} {bnb['native'] * 1e3:8.2f} {bnb['bnb'] / bnb['native']:7.1f}x"
            print(row)


def torch_codes(blocks: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """The torch computation encode_codes replaces (quantlite/quantizer.py: multiply, bucketize, pack)."""
    reciprocal = torch.where(scales > 0, 1.0 / scales.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    codes = torch.bucketize(blocks * reciprocal.unsqueeze(2), (codebook[1:] + codebook[:-1]) / 2)
    codes = codes.to(torch.uint8).reshape(blocks.shape[0], -1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def bench_encode(repeats: int) -> None:
    import bitsandbytes.functional as bnb_functional

    print("\n== encode_codes, 4096 x 4096 float32, block 64: M params/s (ratio = native / baseline)")
    w = torch.randn(4096, 4096)
    codebook = nf4_codebook()
    blocks = w.view(4096, -1, 64)
    scales = blocks.abs().amax(dim=2)
    assert torch.equal(native.encode_codes(blocks, scales, codebook, 64), torch_codes(blocks, scales, codebook))
    t = interleaved_medians({
        "bnb quantize_4bit": lambda: bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4"),
        "torch bucketize path": lambda: torch_codes(blocks, scales, codebook),
        "native encode_codes": lambda: native.encode_codes(blocks, scales, codebook, 64),
        "native + absmax scales": lambda: native.encode_codes(blocks, blocks.abs().amax(dim=2), codebook, 64),
    }, repeats)
    for name, seconds in t.items():
        print(f"{name:>24}: {w.numel() / seconds / 1e6:8.0f} M params/s "
              f"({t['bnb quantize_4bit'] / seconds:5.1f}x bnb, {t['torch bucketize path'] / seconds:5.1f}x torch)")


def minimum_seconds(functions: list, calls: int, rounds: int) -> list[float]:
    """Per function, the fastest of `rounds` rounds of `calls` calls, per call; the functions take
    turns within each round (after a warm-up round), so a noisy neighbour hits all of them."""
    best = [math.inf] * len(functions)
    for round_index in range(rounds + 1):
        for i, fn in enumerate(functions):
            start = CLOCK()
            for _ in range(calls):
                fn()
            if round_index:
                best[i] = min(best[i], (CLOCK() - start) / calls)
    return best


def bench_decode(packed: Path | None, rounds: int) -> None:
    from quantlite.kernels.dispatch import qmatmul
    from quantlite.runtime.streaming import load

    packed = packed or Path.home() / ".cache" / "quantlite" / "bench-smollm2-default"
    threads = [1] if CLOCK is time.thread_time else [1, 2]
    print(f"\n== decode-sized calls, M = 1: microseconds per call, minimum of {rounds} rounds")
    with load(packed) as model:
        model.generate("hi", max_new_tokens=2)  # every layer resident, its weights as the runtime holds them
        layer = next(iter(model._resident.values()))
        weights = {name: value for name, value in layer.items() if isinstance(value, QWeight)}
        totals = dict.fromkeys(threads, 0.0)
        for name, qw in weights.items():
            x = torch.randn(qw.shape[1])
            scales = "double-quantized" if qw.double_quant else str(qw.scales.dtype).replace("torch.", "")
            row = f"{name:<28} {qw.shape[0]:>5} x {qw.shape[1]:<5} {scales:>16} {qw.n_outliers:>6} outliers"
            per_thread_count = minimum_seconds([lambda t=t: native.qmatmul_cpu(x, qw, n_threads=t) for t in threads],
                                               100, rounds)
            for n_threads, seconds in zip(threads, per_thread_count):
                totals[n_threads] += seconds
                row += f" {n_threads}t {seconds * 1e6:7.1f}"
            print(row)
        print(f"{'one layer, all 4 calls':<77}" + "".join(f" {t}t {totals[t] * 1e6:7.1f}" for t in threads))
    tiny = quantize(torch.randn(32, 64), outlier_frac=0.0)
    x = torch.randn(64)
    hop = minimum_seconds([lambda: qmatmul(x, tiny), lambda: native.qmatmul_cpu(x, tiny)], 1000, rounds)
    print(f"fixed cost of a call (32 x 64): dispatch.qmatmul {hop[0] * 1e6:.2f} us, native.qmatmul_cpu {hop[1] * 1e6:.2f} us")
    print("cost of an outlier, one thread: (time with 1 % outliers - time without) / outliers")
    for n, k in [(4096, 4096), (3072, 576), (576, 1536), (576, 576)]:
        w = torch.randn(n, k)
        without, with_outliers = quantize(w, outlier_frac=0.0), quantize(w, outlier_frac=0.01)
        x = torch.randn(k)
        for isa in native.cpu_isas()[1:]:
            times = minimum_seconds([lambda qw=qw: native.qmatmul_cpu(x, qw, isa=isa, n_threads=1)
                                     for qw in (without, with_outliers)], 10 if n * k > 4e6 else 100, rounds)
            print(f"{n:>6} x {k:<5} {isa:>7}: {times[0] * 1e6:8.1f} us without, {times[1] * 1e6:8.1f} us with "
                  f"{with_outliers.n_outliers} -> {(times[1] - times[0]) * 1e9 / with_outliers.n_outliers:5.2f} ns per outlier")


def bench_runtime(tokens: int, packed: Path | None) -> None:
    import quantlite.runtime.llama as llama
    from quantlite.converter import convert
    from quantlite.fetch import smollm2_gguf
    from quantlite.kernels.dispatch import qmatmul
    from quantlite.runtime.streaming import load

    print(f"\n== SmolLM2-135M-Instruct decode on the CPU, {tokens} new tokens, greedy")
    if packed is None:
        packed = Path(tempfile.mkdtemp(prefix="quantlite-bench-")) / "smollm2"
        convert(smollm2_gguf(), packed, progress=False)
    results = {}
    # the runtime calls llama.qmatmul; swapping it for the reference back-end is the baseline
    for label, kernel in (("torch reference", lambda x, qw: qmatmul(x, qw, backend="torch")), ("native cpu", qmatmul)):
        llama.qmatmul = kernel
        with load(packed) as model:
            model.generate("Once upon a time", max_new_tokens=2)  # warm-up: layers resident, weights prepared
            result = model.generate("Once upon a time", max_new_tokens=tokens)
        results[label] = result
        print(f"{label:>16}: {result.stats.decode_tokens_per_second:6.1f} tokens/s "
              f"({result.stats.decode_steps} decode steps): {result.texts[0][:60]!r}")
    llama.qmatmul = qmatmul
    native_rate = results["native cpu"].stats.decode_tokens_per_second
    print(f"{'ratio':>16}: {native_rate / results['torch reference'].stats.decode_tokens_per_second:6.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--m", default="1,8,16,128", help="comma-separated batch sizes M for qmatmul (default 1,8,16,128)")
    parser.add_argument("--only", choices=["bandwidth", "qmatmul", "encode", "decode"], help="run one section")
    parser.add_argument("--no-bnb-matmul", action="store_true", help="skip bitsandbytes matmul_4bit (slow: ~0.1-0.5 s a call)")
    parser.add_argument("--runtime", action="store_true", help="also time SmolLM2 decoding (converts it first)")
    parser.add_argument("--packed", type=Path, help="an already converted SmolLM2 directory for --runtime and the decode section")
    parser.add_argument("--rounds", type=int, default=30, help="rounds of the decode section (its minimum is printed)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (the native calls use the same count)")
    parser.add_argument("--cpu-time", action="store_true", help="with --threads 1: time the calling thread's CPU time, not the wall clock")
    parser.add_argument("--isa", choices=["auto", "avx2", "avx512"], default="auto",
                        help="qmatmul and bandwidth sections: force the native calls to this instruction set (default: "
                             "cpuid's best; avx2 runs the AVX2 int8 kernel too); avx2 also restricts torch's BLAS to "
                             "AVX2, as on an AVX2-only CPU")
    parser.add_argument("--back-to-back", action="store_true",
                        help="time each call right after the previous one (no settling sleep, no lead-in call): "
                             "shows what torch's spinning OpenMP threads cost the call timed after them")
    args = parser.parse_args()
    if args.back_to_back:
        global SETTLE
        SETTLE = False
    if args.isa == "avx2" and any(os.environ.get(name) != value for name, value in AVX2_ONLY_ENVIRONMENT.items()):
        os.environ.update(AVX2_ONLY_ENVIRONMENT)  # read only when torch loads: start again with them
        os.execv(sys.executable, sys.orig_argv)
    if args.isa != "auto" and args.isa not in native.cpu_isas():
        raise SystemExit(f"--isa {args.isa}: this CPU has only {', '.join(native.cpu_isas())}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            raise SystemExit("--cpu-time needs --threads 1 (other threads' CPU time would not be counted)")
        global CLOCK
        CLOCK = time.thread_time
    if native.cpu_status():
        raise SystemExit(f"native CPU library not usable: {native.cpu_status()}")
    print(f"machine: {describe()}; native isa: {native.cpu_isa()}"
          f"{'' if args.isa == 'auto' else f' (qmatmul forced to {args.isa})'}; "
          f"clock: {'CPU time of the calling thread' if args.cpu_time else 'wall'}")
    if args.only in (None, "bandwidth"):
        bench_bandwidth(args.repeats, args.isa)
        bench_int8_kernels(args.repeats, args.isa)
    if args.only in (None, "qmatmul"):
        bench_qmatmul(args.repeats, not args.no_bnb_matmul, [int(m) for m in args.m.split(",")], args.isa)
    if args.only in (None, "encode"):
        bench_encode(args.repeats)
    if args.only in (None, "decode"):
        bench_decode(args.packed, args.rounds)
    if args.runtime:
        bench_runtime(args.tokens, args.packed)


if __name__ == "__main__":
    main()
