"""Peak memory of `quantlite convert` on a multi-GB synthetic Llama checkpoint.

Goal (issue 3): peak RSS <= 3 x the largest tensor + 500 MB, whatever the checkpoint's size.
The checkpoint is written tensor by tensor into a temporary folder (default: under /tmp, never the
repo), then converted in a child process that reports its own peak RSS (getrusage ru_maxrss). The
baseline is the same child doing only its imports (torch, quantlite), so "ours - baseline" is what the
conversion itself holds; the checkpoint size is what loading it whole would need.

    .venv/bin/python -m benchmarks.convert_memory                      # ~2.2 GB fp16 checkpoint, method rtn
    .venv/bin/python -m benchmarks.convert_memory --layers 4 --method quantlite
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A 1B-class Llama shape (TinyLlama-1.1B's sizes); --layers sets the checkpoint's size.
CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4,
    "vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}

# Each step runs in a fresh child: Linux carries ru_maxrss across fork+exec, so the parent stays small
# (no torch import here) and the checkpoint is written by a child of its own.
WRITE_CHECKPOINT = """
import json, sys, torch
from quantlite.sources.synthetic import write_random_llama
write_random_llama(sys.argv[1], json.loads(sys.argv[2]), dtype=torch.float16, max_shard_bytes=1 << 29)
"""
CHILD = """
import json, resource, sys, time
mode, src, out, method, workers = sys.argv[1:6]
import torch, quantlite.converter
started = time.perf_counter()
if mode == "convert":
    quantlite.converter.convert(src, out, method=method, workers=int(workers), progress=False)
self_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
worker_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker process, if any
print(json.dumps({"peak_bytes": self_kib * 1024, "worker_peak_bytes": worker_kib * 1024,
                  "seconds": time.perf_counter() - started}))
"""


def run_child(mode: str, src: Path, out: Path, method: str, workers: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(src), str(out), method, str(workers)],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=24, help="decoder layers (24: ~2.2 GB in fp16)")
    parser.add_argument("--method", default="rtn", help="quantization method (rtn is the fastest; memory is chunk-bounded for all)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()), help="where the checkpoint is written")
    args = parser.parse_args()

    from quantlite.model_config import all_shapes, read_model_config  # no torch: see WRITE_CHECKPOINT

    config = {**CONFIG, "num_hidden_layers": args.layers}
    shapes = all_shapes(read_model_config(config, ValueError))
    largest = max(math.prod(s) for s in shapes.values()) * 2  # fp16
    folder = Path(tempfile.mkdtemp(prefix="quantlite-convert-memory-", dir=args.scratch))
    try:
        started = time.perf_counter()
        src = folder / "hf"
        subprocess.run([sys.executable, "-c", WRITE_CHECKPOINT, str(src), json.dumps(config)], check=True)
        checkpoint = sum(p.stat().st_size for p in src.glob("*.safetensors"))
        print(f"wrote a {checkpoint / 1e9:.2f} GB checkpoint in {time.perf_counter() - started:.0f} s ({folder})")
        baseline = run_child("imports", src, folder / "out", args.method, args.workers)
        ours = run_child("convert", src, folder / "out", args.method, args.workers)
        goal = 3 * largest + 500e6
        print(f"machine      {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.system()}")
        print(f"checkpoint   {checkpoint / 1e6:8.0f} MB fp16, largest tensor {largest / 1e6:.0f} MB, "
              f"method {args.method}, workers {args.workers}")
        print(f"baseline     {baseline['peak_bytes'] / 1e6:8.0f} MB peak RSS (imports only)")
        print(f"ours         {ours['peak_bytes'] / 1e6:8.0f} MB peak RSS converting, {ours['seconds']:.0f} s"
              + (f" (+ {args.workers} workers of up to {ours['worker_peak_bytes'] / 1e6:.0f} MB each)" if args.workers > 1 else ""))
        print(f"goal         {goal / 1e6:8.0f} MB = 3 x largest tensor + 500 MB")
        print(f"ratio        ours / goal = {ours['peak_bytes'] / goal:.2f}; ours / checkpoint = "
              f"{ours['peak_bytes'] / checkpoint:.2f}; conversion's own share (ours - baseline) = "
              f"{(ours['peak_bytes'] - baseline['peak_bytes']) / 1e6:.0f} MB")
        print("goal met" if ours["peak_bytes"] <= goal else "GOAL MISSED")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
