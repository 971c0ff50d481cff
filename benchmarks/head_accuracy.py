"""What storing the output head / embedding in 4 or 8 bits, and the other floats in bfloat16, costs in
perplexity (docs/accuracy.md, "The head, the embedding and the floats"). Fake quantization in
transformers' float32 model, as benchmarks/accuracy.py does for the layers: each row replaces the
embedding (and an untied head) by its quantize-dequantize round trip, and the norms by their
bfloat16 rounding; the decoder layers stay float32 ("float") or take the data-free 4-bit default ("q4").

    .venv/bin/python -m benchmarks.head_accuracy stories260k --windows 64 --results /tmp/heads-stories.json
    .venv/bin/python -m benchmarks.head_accuracy smollm2 --windows 40 --results /tmp/heads-smol.json \\
        --rows float/float/float32,float/q4/float32,float/q8/bfloat16

A row is LAYERS/HEAD/FLOATS: LAYERS float|q4, HEAD float|q4|q8 (the embedding and the head, as
`convert --head/--embedding`), FLOATS float32|bfloat16 (the norms). Results are kept per row in
--results, so a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.accuracy import open_model

ROWS = ("float/float/float32", "float/q4/float32", "float/q8/float32", "float/q8/bfloat16",
        "q4/float/float32", "q4/q4/bfloat16", "q4/q8/bfloat16")


def round_trip(width: str, w: torch.Tensor) -> torch.Tensor:
    """w as convert stores it at `width`, back in float32."""
    from quantlite.q8weight import quantize_int8
    from quantlite.quantizer import quantize

    if width == "q4":
        return quantize(w.float()).dequantize()
    if width == "q8":
        return quantize_int8(w.float()).dequantize()
    return w


def main() -> None:
    from quantlite.eval import fake_quantized, perplexity
    from quantlite.quantizer import quantize

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=("smollm2", "stories260k"))
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--results", type=Path, required=True)
    args = parser.parse_args()

    results = json.loads(args.results.read_text()) if args.results.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, subject = open_model(args.model, Path(tmp))
    ids = tokenizer(subject.data.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    forward = lambda batch: model(batch, use_cache=False).logits  # noqa: E731
    embedding, head = model.model.embed_tokens.weight, model.lm_head.weight
    tied = embedding.data_ptr() == head.data_ptr()
    norms = {name: p for name, p in model.named_parameters() if name.endswith("norm.weight")}
    originals = {"embedding": embedding.data.clone(), "head": head.data.clone(),
                 **{name: p.data.clone() for name, p in norms.items()}}
    for row in args.rows.split(","):
        if row in results:
            print(f"{args.model} {row:24s} ppl {results[row]['ppl']:.4f} (kept)")
            continue
        layers, width, floats = row.split("/")
        began = time.perf_counter()
        embedding.data = round_trip(width, originals["embedding"])
        if not tied:
            head.data = round_trip(width, originals["head"])
        for name, p in norms.items():
            p.data = originals[name].to(getattr(torch, floats)).float()
        if layers == "q4":
            with fake_quantized(model, lambda w, name, _stats: quantize(w, name=name), progress=False):
                result = perplexity(forward, ids, ctx=args.ctx, max_windows=args.windows, progress=False)
        else:
            result = perplexity(forward, ids, ctx=args.ctx, max_windows=args.windows, progress=False)
        results[row] = {"ppl": result.ppl, "tokens": result.tokens, "windows": args.windows, "ctx": args.ctx,
                        "tied": tied, "seconds": time.perf_counter() - began}
        args.results.write_text(json.dumps(results, indent=1))
        print(f"{args.model} {row:24s} ppl {result.ppl:.4f} ({time.perf_counter() - began:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
