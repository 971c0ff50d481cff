"""Convert a Hugging Face checkpoint folder or a GGUF file into a packed 4-bit directory.

Models: the Llama family, as transformers' LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM
(Qwen2 and Qwen2.5) and Qwen3ForCausalLM run them (GGUF architectures llama, qwen2, qwen3). A config
the runtime cannot run exactly is refused before anything is written.

SRC is a folder with config.json and model.safetensors (or sharded *.safetensors with
model.safetensors.index.json) plus tokenizer files, or a .gguf file. OUT receives quantlite.json,
one safetensors file per decoder layer, the embedding and final files, and tokenizer/ (docs/FORMAT.md).

Decoder Linear weights are quantized (NF4 codes, block scales, fp16 outliers), the codes chosen by
GPTQ on random token ids by default (--calibration); the output head and the embedding to
block-scaled int8 (--head, --embedding; a 4-bit head costs over 1 % perplexity, int8 about 0.1 %:
docs/accuracy.md); norms and other unquantized tensors in 16 bits (the source's 16-bit dtype,
bfloat16 for a float32 source), computed in float32 at run time. An interrupted conversion resumes when rerun with the
same arguments, and yields the same bytes as an uninterrupted one.

examples:
  quantlite convert ./SmolLM2-135M ./smol-q4                      # default: calibrated on random token ids
  quantlite convert ./SmolLM2-135M ./smol-q4 --calibration none   # data-free: faster, less accurate
  quantlite convert model.Q4_1.gguf ./smol-q4 --calibration none --workers 2   # GGUF, data-free, two processes
  quantlite convert ./llama ./llama-nf4 --method nf4 --block-size 128
  quantlite convert ./llama ./llama-q4 --outlier-frac 0.02 --max-bits-per-weight 4.6 --head q4 --embedding q4
  quantlite convert ./llama ./llama-q4 --keep-head-float --float-dtype float32   # head and floats as version 1
  quantlite convert ./llama ./llama-ref --no-quantize               # same layout, original weights
  quantlite convert ./llama ./llama-q4 --calibration calib.txt      # calibrated (GPTQ) default method
  quantlite convert ./llama ./llama-q4 --calibration calib.txt --tune-steps 200   # + each layer's scales tuned
  quantlite convert ./tiny ./tiny-q4 --calibration calib.txt --calibration-windows 128 --tune-model-steps 1500
                                                                    # + all layers tuned together towards the float logits
  quantlite convert ./llama ./llama-q4 --calibration self           # calibrated on the model's own samples
  torchrun --nproc-per-node 4 -m quantlite convert ./llama ./llama-q4  # 4 ranks share the layers (docs/convert.md)

Under torchrun (one node or several over a shared filesystem) the ranks share the files; rank 0
writes the manifest after every shard; the result is byte-identical to one process's, and an
interrupted run resumes. A calibrated conversion is sequential in the layers: rank 0 does it alone.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from quantlite.cli import arguments
from quantlite.distributed import launched_by_torchrun
from quantlite.distributed.options import add_timeout_argument

SUMMARY = "convert an HF folder or a .gguf file (Llama, Mistral, Qwen2/2.5, Qwen3) into packed 4-bit per-layer shards"
METHOD_NAMES = ("quantlite", "nf4", "rtn")  # quantlite.quantizer.METHODS, without importing torch for --help
DEFAULT_BLOCK_SIZE = 64  # quantlite.converter.DEFAULT_BLOCK_SIZE, likewise
WIDTHS = ("q8", "q4", "float")               # quantlite.converter.WIDTHS
FLOAT_DTYPES = ("bfloat16", "float16", "float32")  # quantlite.converter.FLOAT_DTYPES


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="Hugging Face checkpoint folder or .gguf file")
    parser.add_argument("out", type=Path, help="packed output folder (created; resumed if interrupted)")
    parser.add_argument("--method", choices=METHOD_NAMES, default="quantlite",
                        help="quantlite: NF4 + outliers + scale search + 8-bit scales (default); "
                             "nf4: plain NF4 as bitsandbytes; rtn: int4 round-to-nearest")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE,
                        help=f"weights per scale along the input dimension (default {DEFAULT_BLOCK_SIZE})")
    parser.add_argument("--attention-block-size", type=int, default=None, metavar="N",
                        help="block size of the attention projections q/k/v/o_proj (default: 32 for the quantlite "
                             "method on random tokens (the default) or with --calibration none, which keeps less of "
                             "NF4's damage at the same bits/weight: docs/accuracy.md, at the default --block-size; else --block-size)")
    parser.add_argument("--outlier-frac", type=float, default=None,
                        help="fraction of weights kept exactly in fp16 (default: the method's; for quantlite up to "
                             "0.01, as many as fit 4.5 bits/weight per tensor)")
    parser.add_argument("--max-bits-per-weight", type=float, default=None, metavar="BITS",
                        help="cap each tensor's outlier table so the tensor stays within BITS bits/weight all-in "
                             "(default: 4.5 for quantlite when --outlier-frac is not given, else no cap)")
    parser.add_argument("--head", choices=WIDTHS, default=None,
                        help="how lm_head is stored: q8 block-scaled int8, q4 as the layers, float (default: "
                             "--embedding's, else q8). A tied head is the embedding: one matrix, one width")
    parser.add_argument("--embedding", choices=WIDTHS, default=None,
                        help="how model.embed_tokens is stored (default: --head's, else q8); the runtime decodes "
                             "only the rows of a batch")
    parser.add_argument("--keep-head-float", action="store_true",
                        help="keep the head and the embedding unquantized (--head float --embedding float)")
    parser.add_argument("--float-dtype", choices=FLOAT_DTYPES, default=None,
                        help="dtype of unquantized tensors (norms, a float head); default: the source's 16-bit "
                             "dtype, bfloat16 for a float32 source (a GGUF is read as float32)")
    parser.add_argument("--no-quantize", action="store_true", help="write the same layout with the original weights")
    parser.add_argument("--overwrite", action="store_true", help="replace a complete conversion already in OUT")
    parser.add_argument("--workers", type=arguments.count(256), default=1, help="processes converting layers in parallel (default 1); a calibrated conversion (the default) converts its layers in order, in this process, and uses them for the other files only")
    parser.add_argument("--calibration", default=None, metavar="random|none|TEXT_FILE|self",
                        help="what GPTQ error feedback (docs/convert.md, 'Calibration') calibrates the 4-bit codes on. "
                             "Default: random when SRC has a tokenizer.json (a GGUF always has one), else none, with "
                             "a note; --method nf4 and rtn stay plain unless given one. "
                             "'random': random token ids (seeded, drawn by their BPE merge rank; no data, no "
                             "generation): on SmolLM2-135M it keeps 37 %% of plain NF4's perplexity increase, on "
                             "stories260K 47 %%, at 4.49 bits/weight, for ~2.8x the data-free conversion time. "
                             "'none': data-free, no forward pass, the fastest: 78 %% and 50 %%, same bits. "
                             "TEXT_FILE: calibrate on this text (22 %% on SmolLM2 with 32 windows of WikiText-2; "
                             "must not overlap text you evaluate on). 'self': on text the float model samples "
                             "itself (minutes of generation). Layers are converted in order, each on the windows "
                             "as they leave the quantized layers before it (docs/accuracy.md has every figure; a "
                             "file named random, none or self is ./random, ./none, ./self)")
    parser.add_argument("--calibration-windows", type=arguments.count(1 << 16), default=None,
                        help="windows of calibration text (default 32 for a text file; 16 with --calibration self, 4 with --calibration random, as good there; a shorter text gives fewer)")
    parser.add_argument("--calibration-ctx", type=arguments.count(1 << 20), default=512, help="tokens per calibration window (default 512)")
    parser.add_argument("--tune-steps", type=arguments.count(1 << 20, least=0), default=0, metavar="N",
                        help="after GPTQ (a calibrated conversion: the default random one, a text or self), N Adam "
                             "steps per layer (one calibration window each) tune the layer's block scales, outlier "
                             "values and norm gains, codes fixed, towards the float layer's output on the calibration "
                             "windows; stored in the same format and bits. Costs N forward+backward passes of one "
                             "window per layer: on SmolLM2-135M with 32 windows of WikiText-2, N=100 cut the "
                             "perplexity increase over float from 22 %% to 17.5 %% of plain NF4's but took 38 min "
                             "instead of 14 (2.6x) on a loaded 2-core machine (docs/accuracy.md, 'Tuning the scales end to "
                             "end'). Default: 0, off")
    parser.add_argument("--tune-model-steps", type=arguments.count(1 << 20, least=0), default=0, metavar="N",
                        help="after the layers are written (and --tune-steps, if given), N steps tune all decoder "
                             "layers at once, their 4-bit codes included, for the least KL divergence between the "
                             "float model's next-token distributions and the quantized model's on the calibration "
                             "windows (one window a step); one window in 8 is held out and the best checkpoint on it "
                             "is kept, never worse than the untuned layers. Same format and bits. Holds the whole "
                             "model's layers as float32 trainables (~7 floats a weight): for small models. Give it "
                             "more windows than the default 32: on stories260K, with --calibration-windows 128 of "
                             "TinyStories text, N=1500 cut the perplexity increase over float from 43 %% to 22 %% of "
                             "plain NF4's, in 11 min instead of 33 s on a loaded 2-core machine (docs/accuracy.md, "
                             "'Tuning the whole model'). Default: 0, off")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_timeout_argument(parser.add_argument_group("distributed (under torchrun)"))


def run(args: argparse.Namespace) -> int:
    from quantlite.cli.inspect import directory_bytes
    from quantlite.converter import DEFAULT_WIDTH, convert
    from quantlite.errors import ConversionError

    if args.keep_head_float and (args.head or args.embedding):
        raise ConversionError("--keep-head-float already says --head float --embedding float; give one or the other")
    default = "float" if args.keep_head_float else DEFAULT_WIDTH
    head, embedding = args.head or args.embedding or default, args.embedding or args.head or default  # one given: both

    if launched_by_torchrun():
        from quantlite.distributed.convert import convert as convert_shared

        def convert(src, out, **options):  # None on every rank but 0, which prints
            return convert_shared(src, out, timeout=args.dist_timeout, **options)
    summary = convert(
        args.src, args.out, method=args.method, block_size=args.block_size, attention_block_size=args.attention_block_size,
        outlier_frac=args.outlier_frac,
        max_bits_per_weight=args.max_bits_per_weight, head=head, embedding=embedding,
        float_dtype=args.float_dtype, no_quantize=args.no_quantize, overwrite=args.overwrite, workers=args.workers, progress=not args.quiet,
        calibration=args.calibration, calibration_windows=args.calibration_windows,
        calibration_ctx=args.calibration_ctx, tune_steps=args.tune_steps,
        tune_model_steps=args.tune_model_steps,
    )
    if summary is None:
        return 0
    resumed = f", {summary.files_resumed} resumed" if summary.files_resumed else ""
    print(f"wrote {summary.path} ({summary.files_written} files{resumed}) in {summary.seconds:.1f} s, "
          f"{summary.params_per_second / 1e6:.2f} M params/s")
    print(format_totals(summary.manifest, directory_bytes(summary.path, summary.manifest)))
    return 0


def format_totals(manifest: dict, directory_bytes: int) -> str:
    """The summary lines shared by `convert` and `inspect`: sizes, bits/weight over all tensors and per
    part (quantlite.cli.inspect.bits_by_part), SQNR."""
    from quantlite.cli.inspect import bits_by_part

    totals = manifest["totals"]
    lines = [
        f"directory   {directory_bytes / 1e6:.1f} MB ({directory_bytes / 2**20:.1f} MiB), tokenizer and manifest included",
        f"parameters  {totals['params']:,} ({totals['quantized_params']:,} quantized)",
        f"size        {totals['bytes'] / 2**20:.1f} MiB = {totals['bytes'] / totals['fp16_bytes']:.1%} of fp16 "
        f"({totals['fp16_bytes'] / 2**20:.1f} MiB); {totals['bits_per_weight']:.3f} bits/weight overall (shard files)",
    ]
    if totals["quantized_bits_per_weight"] is not None:
        lines.append(f"quantized   {totals['quantized_bits_per_weight']:.3f} bits/weight, {totals['outliers']:,} outliers")
    lines.append("bits/weight by part (every tensor's stored bytes, quantization state included):")
    lines.extend(f"  {part:<24}{row['bits_per_weight']:7.3f}  {row['params']:>13,} params {row['bytes'] / 1e6:8.2f} MB  {row['stored']}"
                 for part, row in bits_by_part(manifest).items())
    if totals["sqnr_db_by_type"]:
        lines.append("SQNR (dB, mean over layers; higher is better):")
        lines.extend(f"  {kind:<18} {value:6.2f}" for kind, value in totals["sqnr_db_by_type"].items())
    return "\n".join(lines)
