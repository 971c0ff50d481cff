"""argparse types shared by the sub-commands: each refuses a bad value with one line naming it (exit 2),
before any model is read, instead of a traceback from deep inside torch."""
from __future__ import annotations

import argparse
import math

MAX_NEW_TOKENS = 1 << 20  # the KV cache is allocated for prompt + max_new_tokens up front


def count(limit: int, least: int = 1):
    """An integer from `least` (a positive count by default) up to `limit`."""
    def parse(text: str) -> int:
        value = _integer(text)
        if not least <= value <= limit:
            raise argparse.ArgumentTypeError(f"{value} must be between {least} and {limit}")
        return value
    parse.__name__ = "count"
    return parse


def seed(text: str) -> int:
    """torch.Generator.manual_seed takes [0, 2**64)."""
    value = _integer(text)
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"{value} must be in [0, 2**64)")
    return value


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None


def finite_float(low: float, high: float = math.inf):
    """A finite number in [low, high] (NaN compares false with everything, so it is refused by name)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not (math.isfinite(value) and low <= value <= high):
            raise argparse.ArgumentTypeError(f"{text} must be a finite number in [{low}, {high}]")
        return value
    parse.__name__ = "number"
    return parse


def device(text: str) -> str:
    """cpu, cuda or cuda:N, and only where it exists."""
    import torch

    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a device; use cpu, cuda or cuda:N") from None
    if parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: quantlite runs on cpu or cuda")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA device is visible here")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: there are {torch.cuda.device_count()} CUDA device(s)")
    return text


def add_int8_activations(parser: argparse.ArgumentParser) -> None:
    """--int8-activations, as `generate` and `ppl` both take it (load(..., activations="int8"))."""
    parser.add_argument(
        "--int8-activations", action="store_true",
        help="opt-in, CPU with AVX2 or AVX-512 VNNI: the 4-bit layers multiply x quantized to int8 per block of "
             "32 (llama.cpp's Q8_0 way) instead of float32. Buys: a faster matmul kernel at decode (AVX-512 VNNI, "
             "M=1: 1.3-1.5x at 4096x4096 and SmolLM2's shapes, one thread; two threads: 0.73-1.11 of DRAM bandwidth "
             "against the default's 0.56-0.89, quiet machines; AVX2, M=1: 1.5-1.6x the AVX2 float kernel, one thread; "
             "docs/native.md), also for batches up to 64 rows (AVX2: up to 16); with VNNI a prefill from 24 rows "
             "runs an int8 GEMM, 1.9-3.6x the default's float GEMM at 64-512 rows (quiet machine), on AVX2 a long "
             "prompt's prefill is slower (0.82-0.85x at 32-64 rows). Costs: perplexity +0.27%% "
             "on SmolLM2 (WikiText-2, 40 x 512) and +0.09%% on stories260K (docs/accuracy.md). Without AVX2 a "
             "portable C version runs, slower than "
             "the default. Default: float32 activations, exact.")
