"""Benchmark 3 (issue 4): SmolLM2-135M-Instruct, quantlite streaming against transformers + accelerate
disk offload (what users pick today to run a model larger than memory), same prompt, same budget.

    .venv/bin/python -m benchmarks.streaming_vs_accelerate --budget 200MB

Baseline: the model loaded from the GGUF by transformers in float32, saved as a safetensors folder,
then loaded with `device_map="auto", max_memory={"cpu": BUDGET}, offload_folder=...` so accelerate
keeps what fits in memory and offloads the rest to disk (read back on every forward).
Ours: the 4-bit packed model (`quantlite demo`'s conversion) with memory_budget=BUDGET.
Each runs in its own child process, greedy, after one warm-up generate. Baseline decode time per
token = (time of generate(1 + N) - time of generate(1)) / N; ours: the runtime's own step timer. Goal: >= 5x the baseline's decode speed at a
lower peak RSS.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.machine import describe
from benchmarks.streaming_synthetic import run_child

PROMPT = "Explain in two sentences why the sky is blue."


def decode_seconds_per_token(generate, new_tokens: int) -> tuple[float, float]:
    """(decode seconds per token, time to first token) from two timed greedy generations."""
    generate(2)  # warm-up: first touches, lazy initialisation
    start = time.perf_counter()
    generate(1)
    first = time.perf_counter() - start
    start = time.perf_counter()
    generate(1 + new_tokens)
    return (time.perf_counter() - start - first) / new_tokens, first


def run_accelerate(hf_dir: str, offload_dir: str, budget: str, new_tokens: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlite.runtime.streaming import parse_size, peak_rss_bytes

    baseline = peak_rss_bytes()
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, device_map="auto", max_memory={"cpu": parse_size(budget)}, offload_folder=offload_dir
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]

    def generate(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    per_token, first = decode_seconds_per_token(generate, new_tokens)
    placement = getattr(model, "hf_device_map", {})
    on_disk = sum(1 for where in placement.values() if where == "disk")
    return {"per_token": per_token, "first": first, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
            "where": f"{on_disk} of {len(placement)} modules offloaded to disk"}


def run_quantlite(packed_dir: str, budget: str, new_tokens: int) -> dict:
    import quantlite
    from quantlite.runtime.streaming import peak_rss_bytes

    baseline = peak_rss_bytes()
    model = quantlite.load(packed_dir, memory_budget=budget)

    model.generate(PROMPT, max_new_tokens=2, chat=True)  # warm-up, as for the baseline
    # the runtime times its own steps (an early EOS shortens the run, not the per-step figure)
    stats = model.generate(PROMPT, max_new_tokens=1 + new_tokens, chat=True).stats
    per_token, first = stats.decode_seconds / stats.decode_steps, stats.time_to_first_token
    return {"per_token": per_token, "first": first, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
            "where": f"{model.stats.resident_layers} of {model.config.num_layers} layers resident"}


def prepare_baseline_checkpoint(gguf: Path, hf_dir: Path) -> None:
    """The GGUF in float32 as an HF safetensors folder (what accelerate offloads from)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (hf_dir / "config.json").is_file():
        return
    from transformers import LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model as such: copy its weights into a plain one
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(hf_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf_dir)


def main() -> None:
    from quantlite.cli.demo import packed_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ql-bench-smollm2"))
    parser.add_argument("--budget", default="200MB")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF file (default: quantlite.fetch.smollm2_gguf())")
    args = parser.parse_args()
    print(describe())
    if args.gguf is None:
        from quantlite.fetch import smollm2_gguf

        args.gguf = smollm2_gguf()
    gguf = args.gguf
    prepare_baseline_checkpoint(gguf, args.work / "hf-fp32")
    packed = packed_model(args.work / "packed-4bit")

    base = run_child("benchmarks.streaming_vs_accelerate:run_accelerate", hf_dir=args.work / "hf-fp32",
                     offload_dir=args.work / "offload", budget=args.budget, new_tokens=args.new_tokens)
    ours = run_child("benchmarks.streaming_vs_accelerate:run_quantlite", packed_dir=packed, budget=args.budget,
                     new_tokens=args.new_tokens)
    for label, run in (("baseline: transformers + accelerate disk offload (fp32)", base), ("ours: quantlite 4-bit streaming", ours)):
        print(f"{label}: {1 / run['per_token']:.2f} tokens/s decode, first token {run['first']:.2f} s, "
              f"peak RSS {run['peak_rss'] / 2**20:.0f} MiB (interpreter baseline {run['baseline_rss'] / 2**20:.0f} MiB), {run['where']}")
    print(f"ratio: {base['per_token'] / ours['per_token']:.2f}x decode speed (goal >= 5x), "
          f"peak RSS {ours['peak_rss'] / base['peak_rss']:.2f}x the baseline's (goal < 1), budget {args.budget}")


if __name__ == "__main__":
    main()
