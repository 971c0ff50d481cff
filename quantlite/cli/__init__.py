"""The `quantlite` command line.

Each sub-command lives in its own module of this package and exposes three names:
    SUMMARY: str                      one line, shown in `quantlite --help`
    configure(parser) -> None         adds its arguments (module-level imports stay light: no torch)
    run(args) -> int                  does the work, returns the exit status
Errors of the project's own types (quantlite.errors.QuantliteError) are printed as one line, exit 2
(`verify` exits 1 for a damaged folder). Any other exception is a bug: it is printed as one line with
a request to report it (QUANTLITE_DEBUG=1 shows the traceback), exit 1. docs/reliability.md.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name -> module, in the order a newcomer meets them.
COMMANDS = {
    "demo": "quantlite.cli.demo",
    "convert": "quantlite.cli.convert",
    "inspect": "quantlite.cli.inspect",
    "verify": "quantlite.cli.verify",
    "generate": "quantlite.cli.generate",
    "ppl": "quantlite.cli.ppl",
    "info": "quantlite.cli.info",
}

DESCRIPTION = """\
quantlite: 4-bit NF4 + sparse-outlier quantization and a layer-streaming Llama runtime.

Typical session:
  quantlite demo                                   # fetch SmolLM2-135M, convert, chat with it
  quantlite convert ./hf-llama ./packed            # HF folder or .gguf -> packed 4-bit shards
  quantlite inspect ./packed                       # sizes, bits/weight, outliers
  quantlite verify ./packed                        # checksums and structure of every file
  quantlite generate ./packed --prompt "Hello" --stats
  quantlite ppl ./packed --data wiki.test.raw      # perplexity
  quantlite info                                   # versions and live kernel back-ends

Run `quantlite COMMAND --help` for each command's options."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quantlite", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        command_parser = sub.add_parser(
            name,
            help=module.SUMMARY,
            description=(module.__doc__ or module.SUMMARY).strip(),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    from quantlite.errors import QuantliteError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except QuantliteError as error:
        print(f"quantlite {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"quantlite {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `quantlite inspect OUT | head`: the reader left, nothing is wrong
        sys.stderr.close()
        return 0
    except Exception as error:  # the last guard: every input the families of docs/reliability.md name has its own message
        if os.environ.get("QUANTLITE_DEBUG"):
            raise
        print(f"quantlite {args.command}: unexpected error: {error.__class__.__name__}: {str(error)[:300]} "
              "(a bug: please report it with the command; QUANTLITE_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
