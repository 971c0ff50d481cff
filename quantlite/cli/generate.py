"""Generate text with a packed model, streaming its decoder layers from disk.

Tokens are printed as they are made. Several --prompt flags (or --prompt-file, one prompt per line)
run as one batch that shares every layer read; their answers are printed when all have finished.

Examples:
  quantlite generate ./smollm2-q4 --prompt "The capital of France is" --max-new-tokens 20
  quantlite generate ./smollm2-q4 --chat --prompt "Name three rivers." --stats
  quantlite generate ./big-model --prompt "Hello" --memory-budget 1GB --stats
  quantlite generate ./smollm2-q4 --prompt "Once" --prompt "In a land" --temperature 0.8 --top-p 0.9 --seed 7
  quantlite generate ./smollm2-q4 --prompt-file prompts.txt --max-new-tokens 32
  quantlite generate ./smollm2-q4 --prompt "Hello" --int8-activations --stats   # faster decode, some accuracy

Under torchrun the ranks share the layers (see "distributed" below); the last rank prints.

--stats prints time to first token, decode tokens/s, the split of a decode step (matmuls,
attention, the rest), peak memory, bytes read from disk and how many layers stayed resident in memory.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from quantlite.cli import arguments
from quantlite.distributed.options import add_pipeline_arguments, pipeline_options

SUMMARY = "generate text from a packed model, streaming layers from disk"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="packed model directory (made by `quantlite convert`)")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    parser.add_argument("--prompt-file", type=Path, help="a file of prompts, one per line (added to the batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--system", help="system message for --chat")
    parser.add_argument("--max-new-tokens", type=arguments.count(arguments.MAX_NEW_TOKENS), default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--temperature", type=arguments.finite_float(0.0), default=0.0, help="0 = greedy (default); >0 samples")
    parser.add_argument("--top-k", type=arguments.count(2**31 - 1), help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=arguments.finite_float(1e-9, 1.0), help="sample among the most likely tokens holding probability p")
    parser.add_argument("--seed", type=arguments.seed, help="seed for sampling (reproducible output)")
    parser.add_argument("--stop", action="append", default=[], help="a stop string; repeatable")
    parser.add_argument("--device", type=arguments.device, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--memory-budget", help="bytes for every weight in memory (resident ones and the streamed ones in flight), e.g. 1GB or 800MiB (default: half of free memory)")
    parser.add_argument("--no-prefetch", action="store_true", help="read each layer only when it is needed")
    parser.add_argument("--stats", action="store_true", help="print speed, memory and I/O figures at the end")
    arguments.add_int8_activations(parser)
    add_pipeline_arguments(parser, "generate", '--prompt "Hello" --stats')


def read_prompts(args) -> list[str]:
    from quantlite.runtime.generate import GenerationError

    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            lines = args.prompt_file.read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise GenerationError(f"cannot read --prompt-file {args.prompt_file}: {error.strerror or error}") from error
        except UnicodeDecodeError as error:
            raise GenerationError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({error.reason} at byte {error.start})") from error
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise GenerationError("give at least one --prompt (or a --prompt-file)")
    return prompts


def print_stats(model, result, out=None) -> None:
    """The figures --stats promises, one per line (to stderr unless `out` is given)."""
    out = out or sys.stderr
    from quantlite.runtime.streaming import format_size

    s, io = result.stats, model.stats
    rows = [
        ("time to first token", f"{s.time_to_first_token:.2f} s ({s.prompt_tokens} prompt tokens)"),
        ("decode speed", f"{s.decode_tokens_per_second:.2f} tokens/s per sequence, {len(result.token_ids)} sequence(s)"),
        ("decode step", decode_split(s)),
        ("new tokens", str(s.new_tokens)),
        ("peak memory", format_size(model.peak_memory_bytes()) + (" (CUDA allocated)" if model.device.type == "cuda" else " (process RSS)")),
        ("bytes read", f"{format_size(io.bytes_read)} in {io.layer_loads} layer loads ({io.load_seconds:.2f} s loading, {io.wait_seconds:.2f} s waited)"),
        ("resident layers", f"{io.resident_layers} of {model.config.num_layers} (budget {format_size(model.memory_budget)})"),
    ]
    print("\n--- stats", file=out)
    for label, value in rows:
        print(f"{label:>20}: {value}", file=out)


def decode_split(stats) -> str:
    """Where a decode step's time went: the matmuls, attention (q/k norm, RoPE, KV cache, attend), and
    the rest (norms, activation, Python, sampling, loader waits), in ms per step and as shares of the step."""
    if not stats.decode_steps:
        return "no decode step (one new token)"
    parts = [("matmuls", stats.decode_matmul_seconds), ("attention", stats.decode_attention_seconds),
             ("rest", stats.decode_other_seconds)]
    per_step = stats.decode_seconds / stats.decode_steps
    shares = ", ".join(f"{name} {seconds / stats.decode_steps * 1e3:.2f} ms ({seconds / stats.decode_seconds:.0%})"
                       for name, seconds in parts)
    return f"{per_step * 1e3:.2f} ms: {shares}"


def stream_printer(tokenizer, out=None):
    """on_token callback for one sequence: print the text each new token adds (UTF-8 safe)."""
    out = out or sys.stdout
    tokens: list[int] = []
    printed = 0

    def on_token(row: int, token: int) -> None:
        nonlocal printed
        tokens.append(token)
        text = tokenizer.decode(tokens)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        out.write(text[printed:])
        out.flush()
        printed = len(text)

    return on_token


def run(args) -> int:
    from quantlite.runtime.streaming import load

    prompts = read_prompts(args)
    pipeline = pipeline_options(args)
    activations = "int8" if args.int8_activations else "float32"
    with load(args.path, device=args.device, memory_budget=args.memory_budget, prefetch=not args.no_prefetch,
              activations=activations, **pipeline) as model:
        single = len(prompts) == 1
        result = model.generate(
            prompts if not single else prompts[0],
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
            seed=args.seed, stop=args.stop, chat=args.chat, system=args.system,
            on_token=stream_printer(model.tokenizer) if single else None,
        )
        if pipeline:  # every rank's figures, then only the last rank (which has the tokens' text) prints
            reports = model.stage_reports() if args.stats else []
            if not model.is_driver:
                return 0
        if single:
            print()
        else:
            for index, (prompt, text) in enumerate(zip(prompts, result.texts)):
                print(f"=== [{index}] {prompt}\n{text}\n")
        if args.stats:
            print_stats(model, result)
            if pipeline:
                from quantlite.distributed.pipeline import format_reports

                print(format_reports(reports), file=sys.stderr)
    return 0
