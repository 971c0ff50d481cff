"""Issue 17: one process streaming a model larger than its budget vs two ranks holding it between them.

    .venv/bin/python -m benchmarks.distributed --out /tmp/ql-dist-synth

1. Writes (once) a synthetic packed model of random 4-bit weights with Llama-2-7B layer shapes,
   >= 2 GB on disk (benchmarks/streaming_synthetic.write_synthetic).
2. "1 process": quantlite.load with a 1 GB budget, so most layers stream; every shard leaves the
   page cache right after it is read (ColdPackedModel), so a streamed layer really comes from disk.
   "2 ranks": torchrun --nproc-per-node 2 on this machine, each rank (its shards cold too) with the
   smallest budget that holds its half resident (printed; on disk 2 GB is ~2.25 GB in memory, the
   kernels' float32 scales, so 2 x 1 GB cannot hold it all), then with 1 GB each (a few layers
   stream). Both sides use the 2 cores: 2 threads in the process, 1 per rank (torchrun's default).
   Each side: decode tokens/s (1 prompt, greedy), prefill tokens/s (a batch of prompts, one new
   token: the 2 ranks cut it in 2 micro-batches), median of --repeats, and the decoder layers read
   from disk per decode step on each rank.
3. Conversion time of a real checkpoint (SmolLM2-135M GGUF, default method): 1 process, 1 process
   with --workers 2, and torchrun with 2 ranks (wall time, interpreter start included).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.machine import describe
from benchmarks.streaming_synthetic import LLAMA2_7B, ColdPackedModel, drop_from_page_cache, write_synthetic
from quantlite.packed import PackedModel, layer_file

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ one side (a child process, or every rank)
def measure(model, reports, prompt_len: int, batch: int, new_tokens: int, repeats: int) -> dict:
    """Decode and prefill figures of `model` (a StreamingLlama or this rank's PipelineLlama; call on
    every rank). reports() -> [per-rank counters] (one entry for a single process)."""
    generator = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt_len), generator=generator).tolist()
    model.generate(prompts[:1], max_new_tokens=2)  # warm-up: resident layers read, kernels' layouts built
    decode, prefill, per_step = [], [], []
    for _ in range(repeats):
        before = reports()
        result = model.generate(prompts[:1], max_new_tokens=new_tokens)
        after = reports()
        decode.append(result.stats.decode_tokens_per_second)
        # layers read per forward pass on each rank (a decode step is one pass on every rank)
        per_step.append([(a["layer_loads"] - b["layer_loads"]) / max(a["passes"] - b["passes"], 1) for a, b in zip(after, before)])
        result = model.generate(prompts, max_new_tokens=1)
        prefill.append(result.stats.prompt_tokens / result.stats.time_to_first_token)
    return {"decode": statistics.median(decode), "decode_all": decode, "prefill": statistics.median(prefill),
            "prefill_all": prefill, "layers_per_step": per_step[-1], "ranks": reports(), "threads": torch.get_num_threads()}


def single(path: str, budget: str, **figures) -> dict:
    from quantlite.runtime.streaming import StreamingLlama

    packed = PackedModel.open(path)
    for index in range(packed.num_layers):
        drop_from_page_cache(packed.path / layer_file(index))
    with StreamingLlama(ColdPackedModel(packed), memory_budget=budget) as model:
        def reports():
            s = model.stats
            return [{"layer_loads": s.layer_loads, "passes": s.passes, "resident_layers": s.resident_layers,
                     "streamed_layers": s.streamed_layers, "budget": model.memory_budget}]
        return measure(model, reports, **figures)


def ranks(path: str, budget: str, **figures) -> dict | None:
    """This rank's stage, as quantlite.load(path, distributed=True) builds it, over a ColdPackedModel
    (a streamed layer comes from disk, as in `single`)."""
    from quantlite.distributed import group as groups
    from quantlite.distributed.pipeline import PipelineLlama
    from quantlite.distributed.split import split_by_bytes
    from quantlite.runtime.streaming import unit_sizes

    group = groups.join(torch.device("cpu"))
    packed = PackedModel.open(path)
    for index in range(packed.num_layers):
        drop_from_page_cache(packed.path / layer_file(index))
    sizes = unit_sizes(packed, torch.float32)
    runs = split_by_bytes(sizes.layers, group.world, sizes.embedding, sizes.norm + sizes.head)
    with PipelineLlama(ColdPackedModel(packed), group, runs, memory_budget=budget) as model:
        result = measure(model, model.stage_reports, **figures)
        return result if model.is_driver else None


def rank_budget(path: str, world: int) -> str:
    """The smallest budget that holds every rank's share resident (the split by bytes), rounded up to 10 MB."""
    from quantlite.distributed.split import split_by_bytes
    from quantlite.runtime.streaming import unit_sizes

    sizes = unit_sizes(PackedModel.open(path), torch.float32)
    runs = split_by_bytes(sizes.layers, world, sizes.embedding, sizes.norm + sizes.head)
    shares = [sum(sizes.layers[r.start:r.stop]) for r in runs]
    shares[0] += sizes.embedding
    shares[-1] += sizes.norm + sizes.head
    return f"{-(-max(shares) // 10**7) / 100:.2f}GB"


def child(module_function: str, launcher: list[str], **kwargs) -> dict:
    code = (f"import json, sys; from benchmarks.distributed import {module_function}; "
            f"r = {module_function}(**json.loads(sys.argv[1])); r is None or print('RESULT ' + json.dumps(r))")
    folder = Path(tempfile.mkdtemp())
    (folder / "child.py").write_text(code)
    done = subprocess.run([*launcher, str(folder / "child.py"), json.dumps(kwargs)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    shutil.rmtree(folder)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{module_function} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")


# ------------------------------------------------------------------------------ conversion
def conversion_seconds(src: Path, launcher: list[str], extra: list[str]) -> float:
    out = Path(tempfile.mkdtemp(prefix="ql-dist-convert-")) / "out"
    start = time.perf_counter()
    subprocess.run([*launcher, "-m", "quantlite", "convert", str(src), str(out), "--quiet", *extra], check=True,
                   capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    shutil.rmtree(out.parent)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ql-dist-synth"))
    parser.add_argument("--layers", type=int, default=18, help="decoder layers (18 of Llama-2-7B's shape: 2.0 GB)")
    parser.add_argument("--budget", default="1GB", help="the single process's budget")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="prompts in the prefill batch")
    parser.add_argument("--new-tokens", type=int, default=6, help="tokens per decode run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-budget", action="append", default=None,
                        help="a budget per rank (repeatable); default: the smallest holding every rank's share, and 1GB")
    parser.add_argument("--skip-convert", action="store_true")
    args = parser.parse_args()
    print(describe())
    packed = write_synthetic(args.out, {**LLAMA2_7B, "num_hidden_layers": args.layers}, quantized=True)
    total = sum(f["size"] for f in packed.manifest["files"].values())
    print(f"packed model: {total / 1e9:.2f} GB on disk, {packed.num_layers} layers of {packed.layer_nbytes(0) / 1e6:.0f} MB")
    figures = dict(prompt_len=args.prompt_len, batch=args.batch, new_tokens=args.new_tokens, repeats=args.repeats)
    python = [sys.executable]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    budgets = args.rank_budget or [rank_budget(str(args.out), 2), "1GB"]
    one = child("single", python, path=str(args.out), budget=args.budget, **figures)
    r = one["ranks"][0]
    print(f"1 process ({one['threads']} torch threads), budget {args.budget}: {r['resident_layers']} layers resident, {r['streamed_layers']} streamed from disk; "
          f"decoder layers read per decode step: {one['layers_per_step'][0]:.0f}")
    for budget in budgets:
        two = child("ranks", torchrun, path=str(args.out), budget=budget, **figures)
        print(f"2 ranks (the driver rank's torch threads: {two['threads']}), budget {budget} each: " + "; ".join(
            f"rank {x['rank']} {x['layers']}: {x['resident_layers']} resident, {x['streamed_layers']} streamed, "
            f"{n:.0f} read per decode step" for x, n in zip(two["ranks"], two["layers_per_step"])))
        for name, key in (("decode tokens/s (1 sequence)", "decode"), (f"prefill tokens/s ({args.batch} x {args.prompt_len})", "prefill")):
            print(f"  {name:<30} 1 process {one[key]:8.2f}   2 ranks {two[key]:8.2f}   ratio {two[key] / one[key]:6.2f}x   "
                  f"(runs: {', '.join(f'{v:.2f}' for v in one[key + '_all'])} | {', '.join(f'{v:.2f}' for v in two[key + '_all'])})")
    if args.skip_convert:
        return
    from quantlite.fetch import smollm2_gguf

    src = smollm2_gguf()
    plain = conversion_seconds(src, python, [])
    pool = conversion_seconds(src, python, ["--workers", "2"])
    shared = conversion_seconds(src, torchrun, [])
    print(f"convert {src.name}: 1 process {plain:.1f} s, --workers 2 {pool:.1f} s, 2 ranks (torchrun) {shared:.1f} s; "
          f"2 ranks vs 1 process {plain / shared:.2f}x, vs --workers 2 {pool / shared:.2f}x")


if __name__ == "__main__":
    main()
