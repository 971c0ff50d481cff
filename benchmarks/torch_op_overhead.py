"""What the custom op torch.ops.quantlite.qmatmul (QLinear's call) costs over calling the dispatcher.

    .venv/bin/python -m benchmarks.torch_op_overhead

Baseline: quantlite.kernels.dispatch.qmatmul(x, qw), the streaming runtime's call. Ours: the same
product through torch_op.qmatmul (the torch.library op: op dispatch, then finding the QWeight its
tensors came from). Both on the back-end the dispatcher picks here, alternated in one process; the
figures are medians of 7 repeats of 50 calls, and the ratio is ours / baseline (1.0 = free).
"""
import statistics
import time

import torch

from benchmarks.machine import describe
from quantlite import quantize
from quantlite.kernels import torch_op
from quantlite.kernels.dispatch import default_backend, qmatmul

N = K = 4096
REPEATS, CALLS = 7, 50


def main() -> None:
    print(describe())
    qw = torch_op.remember(quantize(torch.randn(N, K)))  # (N, K) 4-bit; remembered as QLinear does
    print(f"weight {N} x {K}, back-end {default_backend('cpu')!r}")
    candidates = {"dispatch.qmatmul": qmatmul, "torch.ops.quantlite.qmatmul": torch_op.qmatmul}
    for m in (1, 8):
        x = torch.randn(m, K)  # (M, K) float32
        times: dict[str, list[float]] = {name: [] for name in candidates}
        with torch.no_grad():
            for call in candidates.values():
                call(x, qw)  # warm-up: the compute layout is built on the first call
            for _ in range(REPEATS):
                for name, call in candidates.items():
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        call(x, qw)
                    times[name].append((time.perf_counter() - start) / CALLS * 1e6)
        base, ours = (statistics.median(times[name]) for name in candidates)
        print(f"M={m}: baseline {base:.0f} us, op {ours:.0f} us, ratio {ours / base:.3f}")


if __name__ == "__main__":
    main()
