"""Benchmark 2 (issue 4): 4-bit streaming against fp16 streaming of the same model, same budget.

    .venv/bin/python -m benchmarks.streaming_4bit_vs_fp16 --budget 600MB

Two packed models of random weights with TinyLlama-1.1B shapes (hidden 2048, 22 layers, 32 heads,
4 KV heads, MLP 5632, vocab 32000): one fp16 (~2.1 GB), one 4-bit (~0.6 GB). Each runs the same decode
steps in its own child process with the same memory budget and prefetch on, the page cache dropped
after every shard read (cold disk), and the decode tokens/s are compared. Goal: >= 3x for 4-bit. A second round gives each model
the smallest budget that streams ("stream-all": two slots of its largest unit), so that every decoder
layer streams in both.
(AirLLM turns prefetch off in its 4-bit mode and ends up slower than fp16; here the loader thread
reads 4-bit shards like any other.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.machine import describe
from benchmarks.streaming_synthetic import describe_bandwidth, gib, read_bandwidth, run_child, write_synthetic

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
                 vocab_size=32000, num_hidden_layers=22, tie_word_embeddings=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ql-tinyllama"))
    parser.add_argument("--budget", default="600MB", help="the fp16 embedding + head alone take 524 MB in float32")
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    print(describe())
    models = {label: write_synthetic(args.out.with_name(f"{args.out.name}-{label}"), TINYLLAMA, quantized=quantized)
              for label, quantized in (("fp16", False), ("4-bit", True))}
    print(describe_bandwidth("cold read", read_bandwidth(models["fp16"])))
    for budget in (args.budget, "stream-all"):
        runs = {}
        for label, packed in models.items():
            size = sum(f["size"] for f in packed.manifest["files"].values())
            run = run_child(path=packed.path, budget=budget, steps=args.steps, cold=True)
            run["tokens_per_second"] = 1 / min(run["step_seconds"])
            runs[label] = run
            print(f"  {label:>5}, budget {budget}: {gib(size)} on disk, {run['resident_layers']} of {run['layers']} "
                  f"layers resident, {run['step_reads'][-1]['layers']} layers and {run['step_reads'][-1]['heads']} head read per step "
                  f"({'O_DIRECT' if run['direct_io'] else 'page cache'}), {gib(max(run['step_bytes']))} read per step, {run['tokens_per_second']:.2f} tokens/s "
                  f"(steps {', '.join(f'{t:.2f}' for t in run['step_seconds'])} s), peak RSS {gib(run['peak_rss'])}")
        ratio = runs["4-bit"]["tokens_per_second"] / runs["fp16"]["tokens_per_second"]
        print(f"budget {budget}: baseline fp16 {runs['fp16']['tokens_per_second']:.2f} tokens/s, ours 4-bit "
              f"{runs['4-bit']['tokens_per_second']:.2f} tokens/s, ratio {ratio:.2f}x (goal >= 3x)")


if __name__ == "__main__":
    main()
