"""Perplexity of a packed quantlite directory, an HF checkpoint folder (the unquantized baseline) or
a .gguf file, on a text file.

Protocols:
  gptq      (default) the whole file tokenized as is, non-overlapping windows of --ctx tokens,
            ppl = exp(mean NLL over every predicted token) — the number quantization papers quote.
  llamacpp  the same windows with BOS first (when the tokenizer has one), only the second half of
            each window scored — comparable with llama.cpp's `perplexity` tool.

Examples:
  quantlite ppl ./packed --data ../shared/data/wiki.test.raw
  quantlite ppl ./hf-smollm2 --data wiki.test.raw --ctx 512 --max-windows 40     # the baseline
  quantlite ppl ./packed --data wiki.test.raw --ctx 512 --protocol llamacpp --json
  quantlite ppl SmolLM2-135M-Instruct.Q4_1.gguf --data wiki.test.raw --max-windows 8
  quantlite ppl ./packed --data wiki.test.raw --ctx 512 --max-windows 40 --int8-activations   # its cost

A packed model under torchrun runs as a pipeline over the ranks (see "distributed" below; give
--batch-size >= the number of ranks so that they overlap); the last rank prints.
"""
from __future__ import annotations

import argparse

from quantlite.cli import arguments
from quantlite.distributed.options import add_pipeline_arguments, pipeline_options

SUMMARY = "perplexity of a packed model, an HF folder or a GGUF file on a text file"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="packed quantlite directory, HF checkpoint folder, or .gguf file")
    parser.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text file, evaluated as one token stream")
    parser.add_argument("--ctx", type=arguments.count(1 << 20), default=2048, help="tokens per window (default 2048)")
    parser.add_argument("--max-windows", type=arguments.count(2**31 - 1), default=None, metavar="N", help="evaluate only the first N windows")
    parser.add_argument("--protocol", choices=("gptq", "llamacpp"), default="gptq",
                        help="gptq: score every predicted token (default); llamacpp: second half of each window")
    parser.add_argument("--batch-size", type=arguments.count(4096), default=1, metavar="B", help="windows per forward pass (default 1)")
    parser.add_argument("--device", type=arguments.device, default="cpu", help="torch device to run the model on (default cpu)")
    parser.add_argument("--memory-budget", help="for a packed model: bytes for every weight in memory, e.g. 1GB (default: half of free memory)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    arguments.add_int8_activations(parser)
    add_pipeline_arguments(parser, "ppl", "--data wiki.test.raw --batch-size 4")


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from quantlite.eval.models import open_for_eval
    from quantlite.eval.ppl import EvaluationError, perplexity

    data = Path(args.data)
    try:
        text = data.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise EvaluationError(f"cannot read --data {data}: {error}") from error
    pipeline = pipeline_options(args)
    activations = "int8" if args.int8_activations else "float32"
    model = open_for_eval(args.model, device=args.device, memory_budget=args.memory_budget, activations=activations, **pipeline)
    # under torchrun only the last rank (the driver) scores the windows; the others serve their layers
    token_ids = model.tokenize(text) if not pipeline or model.forward.is_driver else None
    options = dict(ctx=args.ctx, max_windows=args.max_windows, protocol=args.protocol, bos_id=model.bos_id,
                   batch_size=args.batch_size, progress=not args.json)
    if pipeline:  # model.forward is this rank's PipelineLlama: every rank runs, the last one prints
        with model.forward:  # then leaves the process group: a gloo group left to the interpreter's exit can abort it
            result = model.forward.perplexity(token_ids, **options)
        if not model.forward.is_driver:
            return 0
    else:
        result = perplexity(model.forward, token_ids, **options)
    if args.json:
        print(json.dumps({"model": str(args.model), "data": str(data), **result.as_dict()}))
    else:
        print(f"model     {args.model} ({model.kind})")
        print(f"data      {data} ({token_ids.numel()} tokens)")
        print(f"protocol  {result.protocol}, ctx {result.ctx}")
        print(f"windows   {result.windows}")
        print(f"tokens    {result.tokens} scored")
        print(f"ppl       {result.ppl:.4f}")
        print(f"time      {result.seconds:.1f} s ({result.tokens / result.seconds:.0f} tokens/s)")
    return 0
