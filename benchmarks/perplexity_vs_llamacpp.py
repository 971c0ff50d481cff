"""Prefill and perplexity speed, quantlite against llama.cpp on the same windows (issue 11, goal 4).

    .venv/bin/python -m benchmarks.perplexity_vs_llamacpp [--windows 40] [--ctx 512] [--threads 2]

The same model files as benchmarks/decode_vs_llamacpp.py (llama.cpp: the SmolLM2-135M-Instruct Q4_1
GGUF; quantlite: its conversion with the embedding and tied head quantized too), the same token ids:
the WikiText-2 test file (--data) tokenized once by the model's tokenizer, cut into --windows
non-overlapping windows of --ctx tokens, every token after the first scored (`quantlite ppl`'s
default "gptq" protocol, what `quantlite ppl --ctx 512 --max-windows 40` runs).
  quantlite: torch.set_num_threads(T); quantlite.eval.ppl.perplexity over quantlite.load(packed), one
             window per forward (the whole window is one M = ctx pass through each qmatmul).
  llama.cpp: Llama(n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=T, n_threads_batch=T,
             logits_all=True); per window reset() + eval(window), then the same log-softmax NLL.
             Extra buffer types off where its AMX path traps (as in benchmarks/decode_vs_llamacpp.py).
Each runs in its own process after one warm-up window. Tokens/s = windows * ctx / seconds (every
token goes through the model). Goal: quantlite >= 0.5x llama.cpp's tokens/s.
"""
from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

from benchmarks.decode_vs_llamacpp import default_packed, describe_peer, llama_cpp_extra_bufts_run, llama_cpp_model, packed_model
from benchmarks.machine import describe
from benchmarks.streaming_synthetic import run_child

GOAL_RATIO = 0.5


def window_nll(logits, window) -> tuple[float, int]:
    """(summed NLL in nats, tokens scored) of one window: logits (ctx, vocab) predict window[1:]."""
    import torch

    log_probs = torch.as_tensor(logits[:-1]).float().log_softmax(dim=-1)
    targets = torch.as_tensor(window[1:]).long()
    return float(-log_probs.gather(-1, targets[:, None]).double().sum()), len(window) - 1


def run_quantlite(packed: str, windows: list[list[int]], threads: int) -> dict:
    import torch

    import quantlite
    from quantlite.eval.ppl import perplexity

    torch.set_num_threads(threads)
    model = quantlite.load(packed)
    ids = torch.tensor([t for w in windows for t in w])
    perplexity(model, ids[: len(windows[0])], ctx=len(windows[0]), progress=False)  # warm-up window
    result = perplexity(model, ids, ctx=len(windows[0]), progress=False)
    return {"seconds": result.seconds, "ppl": result.ppl}


def run_llamacpp(gguf: str, windows: list[list[int]], threads: int, extra_bufts: bool) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(threads)  # window_nll's log-softmax is timed too: on the same threads as quantlite's

    ctx = len(windows[0])
    llm = llama_cpp_model(gguf, extra_bufts, n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                          n_threads_batch=threads, logits_all=True)

    def evaluate(window: list[int]) -> tuple[float, int]:
        llm.reset()
        llm.eval(window)
        return window_nll(np.asarray(llm.scores[:ctx]), window)

    evaluate(windows[0])  # warm-up window
    start = time.perf_counter()
    total, scored = 0.0, 0
    for window in windows:
        nll, n = evaluate(window)
        total, scored = total + nll, scored + n
    return {"seconds": time.perf_counter() - start, "ppl": math.exp(total / scored)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the GGUF (default: SmolLM2-135M-Instruct Q4_1 from quantlite.fetch)")
    parser.add_argument("--packed", type=Path, help="quantlite's conversion of it (made once; default under $QUANTLITE_CACHE)")
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/wiki.test.raw")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from quantlite.fetch import smollm2_gguf
    from quantlite.runtime.generate import Tokenizer

    if not args.data.is_file():
        raise SystemExit(f"--data {args.data} does not exist (WikiText-2's wiki.test.raw)")
    gguf = args.gguf or smollm2_gguf()
    packed = packed_model(gguf, args.packed or default_packed())
    ids = Tokenizer(packed / "tokenizer").encode(args.data.read_text(encoding="utf-8"))
    if len(ids) < args.windows * args.ctx:
        raise SystemExit(f"{args.data} has {len(ids)} tokens, fewer than {args.windows} x {args.ctx}")
    windows = [ids[i * args.ctx:(i + 1) * args.ctx] for i in range(args.windows)]
    extra_bufts = llama_cpp_extra_bufts_run(gguf)
    import torch

    torch.set_num_threads(args.threads)  # what describe() reports; the timed work runs in the children
    print(describe())
    print(describe_peer(extra_bufts))
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} threads each; {args.windows} windows x {args.ctx} tokens "
          f"of {args.data.name}, every token after a window's first scored")
    results = {
        "llama.cpp": run_child("benchmarks.perplexity_vs_llamacpp:run_llamacpp", gguf=gguf, windows=windows,
                               threads=args.threads, extra_bufts=extra_bufts),
        "quantlite": run_child("benchmarks.perplexity_vs_llamacpp:run_quantlite", packed=packed, windows=windows, threads=args.threads),
    }
    tokens = args.windows * args.ctx
    print("               tokens/s    seconds    perplexity")
    for name, r in results.items():
        print(f"  {name:<12} {tokens / r['seconds']:>8.0f} {r['seconds']:>10.1f} {r['ppl']:>13.3f}")
    ratio = results["llama.cpp"]["seconds"] / results["quantlite"]["seconds"]
    print(f"  ratio quantlite / llama.cpp tokens/s: {ratio:.2f}x (goal >= {GOAL_RATIO}x: {'met' if ratio >= GOAL_RATIO else 'NOT met'})")


if __name__ == "__main__":
    main()
