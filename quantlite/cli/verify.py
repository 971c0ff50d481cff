"""Check a packed directory: every file the manifest lists exists, has its size and sha256, and each
shard's structure (header, tensor names, shapes, QWeight fields) agrees with the config.

Exit status 0 when everything checks out, 1 with one line per problem (each naming its file), 2 when
the folder is not a readable packed model at all.

examples:
  quantlite verify ./smol-q4
  quantlite verify ./smol-q4 --quiet && echo intact
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUMMARY = "check structure and sha256 of every file of a packed model"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="packed model folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; print only problems")


def run(args: argparse.Namespace) -> int:
    from quantlite.cli.inspect import printable
    from quantlite.packed import PackedModel

    model = PackedModel.open(args.path)
    problems = model.verify(progress=not args.quiet)
    for problem in problems:
        print(printable(f"{model.path}/{problem}"), file=sys.stderr)
    if problems:
        print(f"{model.path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"{model.path}: {len(model.manifest['files'])} files verified")
    return 0
