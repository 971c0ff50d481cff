"""The data-free sweep (issue 16): which part of a data-free 4-bit setting buys what, per tensor type.

    .venv/bin/python -m benchmarks.datafree_sweep --model smollm2 --stats-cache /tmp/smol-stats.pt

Perplexity over 40 windows costs SmolLM2 10-20 minutes a setting on the 2-core machine, so the sweep
scores each setting by the relative error of every layer's OUTPUT instead, per tensor type:

    err(W) = tr(dW H dW^T) / tr(W H W^T),   dW = dequantize(quantize(W)) - W,   H = E[x x^T]

with H the layer input's second moment over --stats-windows windows of 512 tokens from the END of the
evaluation file (the windows benchmarks/accuracy.py evaluates are the first ones). The statistics
only score the settings; every setting quantizes without them (data-free). The table's last column
is the mean over all scored tensors; docs/accuracy.md checks the ranking against perplexity rows.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.accuracy import open_model
from benchmarks.rotation import rotated_quantizer
from quantlite.quantizer import quantize

TENSOR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION, MLP = TENSOR_TYPES[:4], TENSOR_TYPES[4:]

# (key, description, quantize options, rotated tensor types: () none, None all)
SETTINGS = [
    ("nf4", "plain NF4, g64", {"method": "nf4"}, ()),
    ("datafree", "the data-free default (<= 1 % outliers within 4.5 bits, scale search, DQ)", {}, ()),
    ("no-search", "the data-free default without scale search", {"scale_search": False}, ()),
    ("of-0", "the data-free default, 0 % outliers", {"outlier_frac": 0.0}, ()),
    ("of-0.5", "the data-free default, 0.5 % outliers", {"outlier_frac": 0.005}, ()),
    ("of-2", "the data-free default, 2 % outliers (no bit cap)", {"outlier_frac": 0.02}, ()),
    ("bs-32", "the data-free default, block 32 (within 4.5 bits)", {"block_size": 32}, ()),
    ("bs-128", "the data-free default, block 128 (within 4.5 bits)", {"block_size": 128}, ()),
    ("refine", "the data-free default + least-squares scale refinement", {"refine_scales": True}, ()),
    ("fit", "the data-free default with a fitted per-tensor codebook", {"fit_codebook": True}, ()),
    ("fit-refine", "fitted codebook + least-squares scale refinement", {"fit_codebook": True, "refine_scales": True}, ()),
    ("fit-refine-32", "fitted codebook + scale refinement, block 32 (within 4.5 bits)",
     {"fit_codebook": True, "refine_scales": True, "block_size": 32}, ()),
    ("qkv-32", "the data-free default, q/k/v_proj at block 32", {"block_size": {"q_proj": 32, "k_proj": 32, "v_proj": 32}}, ()),
    ("rot-nf4", "plain NF4, Hadamard-rotated (block 64), all tensors", {"method": "nf4"}, None),
    ("rot-all", "the data-free default, Hadamard-rotated, all tensors", {}, None),
    ("rot-attn", "the data-free default, Hadamard-rotated q/k/v/o only", {}, ATTENTION),
    ("rot-mlp", "the data-free default, Hadamard-rotated gate/up/down only", {}, MLP),
    ("rot-0", "the data-free default, Hadamard-rotated, all tensors, 0 % outliers", {"outlier_frac": 0.0}, None),
]


def input_stats(model, tokenizer, subject, windows: int, cache: Path | None) -> dict[str, torch.Tensor]:
    """E[x x^T] of every Linear input over the last `windows` windows of 512 tokens of the file."""
    from quantlite.calibration import collect_input_stats

    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=True)
    ids = tokenizer(subject.data.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    stats = collect_input_stats(model, ids[-windows * 512:], ctx=512, max_windows=windows, full=True)
    if cache is not None:
        torch.save(stats, cache)
    return stats


def options_for(options: dict, name: str) -> dict:
    """quantize()'s options for tensor `name`: a dict-valued block_size is per tensor type (default 64)."""
    if isinstance(options.get("block_size"), dict):
        return {**options, "block_size": options["block_size"].get(next(t for t in TENSOR_TYPES if t in name), 64)}
    return options


def output_error(w: torch.Tensor, w_hat: torch.Tensor, second_moment: torch.Tensor) -> float:
    """tr(dW H dW^T) / tr(W H W^T) in float64."""
    w, dw, h = w.double(), (w_hat - w).double(), second_moment.double()
    return float(torch.einsum("nk,kl,nl->", dw, h, dw) / torch.einsum("nk,kl,nl->", w, h, w))


def sweep(weights: dict[str, torch.Tensor], stats: dict[str, torch.Tensor], keys: list[str]) -> list[dict]:
    rows = []
    for key, label, options, rotated in SETTINGS:
        if keys and key not in keys:
            continue
        began = time.perf_counter()
        plain = lambda w, name, options=options: quantize(w, name=name, **options_for(options, name))  # noqa: E731
        quantize_one = plain if rotated == () else rotated_quantizer(plain, 64, rotated)
        errors = {t: [] for t in TENSOR_TYPES}
        stored = count = 0
        for name, w in weights.items():
            qw = quantize_one(w, name)
            errors[next(t for t in TENSOR_TYPES if t in name)].append(output_error(w, qw.dequantize(torch.float32), stats[name]))
            stored, count = stored + qw.nbytes, count + w.numel()
        means = {t: sum(e) / len(e) for t, e in errors.items() if e}
        every = [e for per_type in errors.values() for e in per_type]
        rows.append({"key": key, "label": label, "bits": 8 * stored / count, "per_type": means, "mean": sum(every) / len(every)})
        print(f"{key:10s} bits {rows[-1]['bits']:.3f} mean {1e3 * rows[-1]['mean']:.3f}e-3 ({time.perf_counter() - began:.0f} s)", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    types = [t for t in TENSOR_TYPES if t in rows[0]["per_type"]]
    lines = ["| setting | bits/weight | " + " | ".join(types) + " | mean |", "| --- | ---: |" + " ---: |" * (len(types) + 1)]
    for r in rows:
        cells = " | ".join(f"{1e3 * r['per_type'][t]:.2f}" for t in types)
        lines.append(f"| {r['label']} | {r['bits']:.3f} | {cells} | **{1e3 * r['mean']:.2f}** |")
    return "\n".join(lines) + "\n\n(relative output error x 1e-3, mean over the scored layers)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "stories260k"))
    parser.add_argument("--settings", default="", help="comma-separated keys (default: all): " + ", ".join(s[0] for s in SETTINGS))
    parser.add_argument("--layer-stride", type=int, default=3, help="score every Nth decoder layer (default 3: 10 of SmolLM2's 30)")
    parser.add_argument("--stats-windows", type=int, default=8, help="windows of 512 tokens for E[x x^T] (default 8)")
    parser.add_argument("--stats-cache", type=Path, default=None, help="keep E[x x^T] in this file and reuse it")
    args = parser.parse_args()
    from quantlite.eval.fake_quant import linear_weights

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, subject = open_model(args.model, Path(tmp))
    stats = input_stats(model, tokenizer, subject, args.stats_windows, args.stats_cache)
    weights = {name: linear.weight.data.float() for name, linear in linear_weights(model).items()
               if int(name.split(".")[2]) % args.layer_stride == 0}
    keys = [k for k in args.settings.split(",") if k]
    print(f"{args.model}: {len(weights)} tensors of every {args.layer_stride}th layer; E[x x^T] over {args.stats_windows} windows")
    print(table(sweep(weights, stats, keys)))


if __name__ == "__main__":
    main()
