"""Benchmark 3 (issues 4, 11): SmolLM2-135M-Instruct with every decoder layer streamed, quantlite against
transformers + accelerate disk offload (what users pick today to run a model larger than memory).

    .venv/bin/python -m benchmarks.streaming_vs_accelerate

Baseline: the GGUF loaded by transformers, saved as a bf16 safetensors folder, then loaded in bf16 with
an explicit device_map that puts every decoder layer on "disk" (accelerate's offload folder, read back
on every forward) and the embedding, final norm and tied head in memory.
Ours: the 4-bit packed model (`quantlite demo --calibration none`'s conversion) with the smallest budget
that keeps the tied embedding/head and the two streaming slots: 0 of 30 layers resident, so every
decoder layer is read from its shard on every token (from the page cache: the files are warm).
Both print how many decoder layers were read per decoded token, counted (accelerate: forwards of the
disk-offloaded layers, which each load that layer's weights from the offload folder; quantlite: its
layer-load counter). Each runs in its own child process, greedy, after one warm-up generate; decode
time per token = (time of generate(1 + N) - time of generate(1)) / N for both. Goal: >= 5x the
baseline's decode speed.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.machine import describe
from benchmarks.streaming_synthetic import run_child

PROMPT = "Explain in two sentences why the sky is blue."


def decode_seconds_per_token(generate, new_tokens: int, layer_reads) -> tuple[float, float, float]:
    """(decode seconds per token, time to first token, decoder layers read per decoded token) from
    two timed greedy generations; layer_reads() is the side's running count of layer reads."""
    generate(2)  # warm-up: first touches, lazy initialisation
    reads, start = layer_reads(), time.perf_counter()
    generate(1)
    first, prefill_reads = time.perf_counter() - start, layer_reads() - reads
    reads, start = layer_reads(), time.perf_counter()
    generate(1 + new_tokens)
    elapsed, total_reads = time.perf_counter() - start, layer_reads() - reads
    return (elapsed - first) / new_tokens, first, (total_reads - prefill_reads) / new_tokens


def run_accelerate(hf_dir: str, offload_dir: str, new_tokens: int) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from quantlite.runtime.streaming import peak_rss_bytes

    baseline = peak_rss_bytes()
    layers = AutoConfig.from_pretrained(hf_dir).num_hidden_layers
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
                  **{f"model.layers.{i}": "disk" for i in range(layers)}}
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map=device_map,
                                                 offload_folder=offload_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    calls = [0]
    on_disk = [m for name, m in model.named_modules() if model.hf_device_map.get(name) == "disk"]
    for module in on_disk:
        module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))

    def generate(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    per_token, first, reads = decode_seconds_per_token(generate, new_tokens, lambda: calls[0])
    return {"per_token": per_token, "first": first, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
            "layers_read_per_token": reads,
            "where": f"bf16, {len(on_disk)} of {layers} decoder layers on disk (offload folder), embedding/norm/head in memory"}


def run_quantlite(packed_dir: str, new_tokens: int) -> dict:
    import torch

    import quantlite
    from quantlite.runtime.streaming import format_size, peak_rss_bytes, unit_sizes

    baseline = peak_rss_bytes()
    sizes = unit_sizes(quantlite.PackedModel.open(packed_dir), torch.float32)  # from the shard headers: nothing loaded
    # the tied embedding/head, the final norm and two streaming slots (computing + being read); one
    # byte short of one more layer, so no decoder layer is resident
    budget = sizes.norm + sizes.head + 2 * max(sizes.layers) + min(sizes.layers) - 1
    model = quantlite.load(packed_dir, memory_budget=budget)

    def generate(n):
        return model.generate(PROMPT, max_new_tokens=n, chat=True)

    per_token, first, reads = decode_seconds_per_token(generate, new_tokens, lambda: model.decode_reads()["layers"])
    return {"per_token": per_token, "first": first, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline,
            "layers_read_per_token": reads,
            "where": f"4-bit, {model.stats.resident_layers} of {model.config.num_layers} decoder layers resident "
                     f"(budget {format_size(budget)}), tied embedding/head {'resident' if model.plan.head_resident else 'streamed'}"}


def prepare_baseline_checkpoint(gguf: Path, hf_dir: Path) -> None:
    """The GGUF as a bf16 HF safetensors folder (what accelerate offloads from)."""
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
    plain = plain.to(torch.bfloat16)
    plain.save_pretrained(hf_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(hf_dir)


def main() -> None:
    from quantlite.cli.demo import packed_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ql-bench-smollm2"))
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side, alternating; medians are reported")
    parser.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF file (default: quantlite.fetch.smollm2_gguf())")
    args = parser.parse_args()
    print(describe())
    if args.gguf is None:
        from quantlite.fetch import smollm2_gguf

        args.gguf = smollm2_gguf()
    prepare_baseline_checkpoint(args.gguf, args.work / "hf-bf16")
    packed = packed_model(args.work / "packed-4bit", "none")

    runs: dict[str, list[dict]] = {"base": [], "ours": []}
    for _ in range(args.repeats):  # alternating, so both see the same load on a shared machine
        runs["base"].append(run_child("benchmarks.streaming_vs_accelerate:run_accelerate", hf_dir=args.work / "hf-bf16",
                                      offload_dir=args.work / "offload", new_tokens=args.new_tokens))
        runs["ours"].append(run_child("benchmarks.streaming_vs_accelerate:run_quantlite", packed_dir=packed,
                                      new_tokens=args.new_tokens))
    median = {side: sorted(r["per_token"] for r in rs)[len(rs) // 2] for side, rs in runs.items()}
    for side, label in (("base", "baseline: transformers + accelerate disk offload"), ("ours", "ours: quantlite streaming")):
        run = runs[side][-1]
        rates = ", ".join(f"{1 / r['per_token']:.2f}" for r in runs[side])
        print(f"{label}: {1 / median[side]:.2f} tokens/s decode (median of {args.repeats}: {rates}), first token {run['first']:.2f} s, "
              f"peak RSS {run['peak_rss'] / 2**20:.0f} MiB (interpreter baseline {run['baseline_rss'] / 2**20:.0f} MiB)")
        print(f"    {run['where']}; decoder layers read per decoded token: {run['layers_read_per_token']:.1f}")
    print(f"ratio: {median['base'] / median['ours']:.2f}x decode speed (goal >= 5x), "
          f"peak RSS {runs['ours'][-1]['peak_rss'] / runs['base'][-1]['peak_rss']:.2f}x the baseline's, {args.new_tokens} new tokens")


if __name__ == "__main__":
    main()
