"""Convert a Hugging Face Llama checkpoint folder or a llama GGUF file into a packed 4-bit directory.

SRC is a folder with config.json and model.safetensors (or sharded *.safetensors with
model.safetensors.index.json) plus tokenizer files, or a .gguf file. OUT receives quantlite.json,
one safetensors file per decoder layer, the embedding and final files, and tokenizer/ (docs/FORMAT.md).

Decoder Linear weights are quantized (NF4 codes, block scales, fp16 outliers); norms stay as they are;
the embedding and lm_head only with their flags. An interrupted conversion resumes when rerun with the
same arguments, and yields the same bytes as an uninterrupted one.

examples:
  quantlite convert ./SmolLM2-135M ./smol-q4                      # default method "quantlite"
  quantlite convert model.Q4_1.gguf ./smol-q4 --workers 2          # GGUF input, two processes
  quantlite convert ./llama ./llama-nf4 --method nf4 --block-size 128
  quantlite convert ./llama ./llama-q4 --outlier-frac 0.02 --max-bits-per-weight 4.6 --quantize-lm-head
  quantlite convert ./llama ./llama-ref --no-quantize               # same layout, original weights
  quantlite convert ./llama ./llama-q4 --calibration calib.txt      # calibrated (GPTQ) default method
  quantlite convert ./llama ./llama-q4 --calibration self           # calibrated on the model's own samples
"""
from __future__ import annotations

import argparse
from pathlib import Path

from quantlite.cli import arguments

SUMMARY = "convert an HF Llama folder or a .gguf file into packed 4-bit per-layer shards"
METHOD_NAMES = ("quantlite", "nf4", "rtn")  # quantlite.quantizer.METHODS, without importing torch for --help


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="Hugging Face checkpoint folder or .gguf file")
    parser.add_argument("out", type=Path, help="packed output folder (created; resumed if interrupted)")
    parser.add_argument("--method", choices=METHOD_NAMES, default="quantlite",
                        help="quantlite: NF4 + outliers + scale search + 8-bit scales (default); "
                             "nf4: plain NF4 as bitsandbytes; rtn: int4 round-to-nearest")
    parser.add_argument("--block-size", type=int, default=64, help="weights per scale along the input dimension (default 64)")
    parser.add_argument("--outlier-frac", type=float, default=None,
                        help="fraction of weights kept exactly in fp16 (default: the method's; for quantlite up to "
                             "0.01, as many as fit 4.5 bits/weight per tensor)")
    parser.add_argument("--max-bits-per-weight", type=float, default=None, metavar="BITS",
                        help="cap each tensor's outlier table so the tensor stays within BITS bits/weight all-in "
                             "(default: 4.5 for quantlite when --outlier-frac is not given, else no cap)")
    parser.add_argument("--quantize-embedding", action="store_true", help="also quantize model.embed_tokens")
    parser.add_argument("--quantize-lm-head", action="store_true", help="also quantize lm_head (untied models)")
    parser.add_argument("--no-quantize", action="store_true", help="write the same layout with the original weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete conversion already in OUT")
    parser.add_argument("--workers", type=arguments.count(256), default=1, help="processes converting layers in parallel (default 1)")
    parser.add_argument("--calibration", default=None, metavar="TEXT_FILE|self",
                        help="calibrate on this text (GPTQ error feedback, docs/accuracy.md): layers are "
                             "converted in order, each on the text as it leaves the quantized layers before it; "
                             "must not overlap text you evaluate on. 'self': on text the model samples itself "
                             "(no data needed; a file named self is ./self)")
    parser.add_argument("--calibration-windows", type=arguments.count(1 << 16), default=16, help="windows of calibration text (default 16)")
    parser.add_argument("--calibration-ctx", type=arguments.count(1 << 20), default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from quantlite.converter import convert

    summary = convert(
        args.src, args.out, method=args.method, block_size=args.block_size, outlier_frac=args.outlier_frac,
        max_bits_per_weight=args.max_bits_per_weight, quantize_embedding=args.quantize_embedding, quantize_lm_head=args.quantize_lm_head,
        no_quantize=args.no_quantize, overwrite=args.overwrite, workers=args.workers, progress=not args.quiet,
        calibration=args.calibration, calibration_windows=args.calibration_windows,
        calibration_ctx=args.calibration_ctx,
    )
    totals = summary.manifest["totals"]
    resumed = f", {summary.files_resumed} resumed" if summary.files_resumed else ""
    print(f"wrote {summary.path} ({summary.files_written} files{resumed}) in {summary.seconds:.1f} s, "
          f"{summary.params_per_second / 1e6:.2f} M params/s")
    print(format_totals(totals))
    return 0


def format_totals(totals: dict) -> str:
    """The summary lines shared by `convert` and `inspect`."""
    lines = [
        f"parameters  {totals['params']:,} ({totals['quantized_params']:,} quantized)",
        f"size        {totals['bytes'] / 2**20:.1f} MiB = {totals['bytes'] / totals['fp16_bytes']:.1%} of fp16 "
        f"({totals['fp16_bytes'] / 2**20:.1f} MiB); {totals['bits_per_weight']:.3f} bits/weight overall",
    ]
    if totals["quantized_bits_per_weight"] is not None:
        lines.append(f"quantized   {totals['quantized_bits_per_weight']:.3f} bits/weight, {totals['outliers']:,} outliers")
    if totals["sqnr_db_by_type"]:
        lines.append("SQNR (dB, mean over layers; higher is better):")
        lines.extend(f"  {kind:<18} {value:6.2f}" for kind, value in totals["sqnr_db_by_type"].items())
    return "\n".join(lines)
