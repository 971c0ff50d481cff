"""Quantization throughput of each method against bitsandbytes' CPU quantize_4bit, on the same tensors
in the same run, and the SQNR of each method on Gaussian and heavy-tailed (Student-t) weights.

    .venv/bin/python -m benchmarks.quantize_throughput [--repeats 3]

Goals (issue 2): the default method at >= 1x bitsandbytes' throughput, plain NF4 at >= 2x.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.machine import describe
from quantlite.eval.metrics import sqnr_db
from quantlite.quantizer import METHODS, quantize

SHAPES = [(4096, 4096), (11008, 4096)]


def best_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: first-touch page faults and lazy initialisation are not throughput
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def student_t(shape, dof: int, generator) -> torch.Tensor:
    z = torch.randn(shape, generator=generator)
    chi2 = torch.randn((dof, *shape), generator=generator).square().sum(0)
    return z / (chi2 / dof).sqrt()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import bitsandbytes.functional as bnb

    print(f"machine: {describe()}")
    generator = torch.Generator().manual_seed(0)
    print(f"\n{'shape':>12} {'method':>10} {'Mparams/s':>10} {'bnb Mparams/s':>14} {'ratio':>6} {'bits/w':>7}")
    for shape in SHAPES:
        w = torch.randn(shape, generator=generator) * 0.02
        params = w.numel() / 1e6
        baseline = params / best_seconds(lambda: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4"), args.repeats)
        for method in METHODS:
            ours = params / best_seconds(lambda: quantize(w, method=method), args.repeats)
            bits = quantize(w, method=method).bits_per_weight
            print(f"{'x'.join(map(str, shape)):>12} {method:>10} {ours:10.1f} {baseline:14.1f} {ours / baseline:6.2f} {bits:7.3f}")

    print(f"\nSQNR (dB, higher is better) on 4096x4096")
    print(f"{'weights':>12} " + " ".join(f"{m:>10}" for m in METHODS) + f" {'bnb nf4':>10}")
    for label, w in [("gaussian", torch.randn(4096, 4096, generator=generator)),
                     ("student-t3", student_t((4096, 4096), 3, generator))]:
        row = [sqnr_db(w, quantize(w, method=m).dequantize()) for m in METHODS]
        packed, state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4")
        row.append(sqnr_db(w, bnb.dequantize_4bit(packed, state)))
        print(f"{label:>12} " + " ".join(f"{v:10.2f}" for v in row))


if __name__ == "__main__":
    main()
