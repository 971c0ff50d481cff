"""Show what a packed directory holds: config, per-file sizes, bits/weight (over all tensors and per
part: layers, head, embedding), outliers, totals vs fp16, the directory's size.

examples:
  quantlite inspect ./smol-q4              # a table
  quantlite inspect ./smol-q4 --json       # the same as JSON (config, files, tensors, totals)
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

SUMMARY = "show a packed model's config, per-layer sizes, bits/weight and outliers"
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "tie_word_embeddings")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("path", type=Path, help="packed model folder")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def bits_by_part(manifest: dict) -> dict[str, dict]:
    """Part -> {params, bytes, bits_per_weight, stored} over the manifest's tensors, "all tensors" last.
    Parts: the decoder layers, the embedding (with the head when tied), the head, the final norm.
    Bytes are each tensor's stored bytes (a quantized one all-in: codes, scales, outliers, metadata)."""
    tied = bool(manifest["config"].get("tie_word_embeddings"))
    parts: dict[str, dict] = {}
    for name, tensor in sorted(manifest["tensors"].items()):
        if name.startswith("model.layers."):
            part = "layers"
        elif name == "model.embed_tokens.weight":
            part = "embedding (= tied head)" if tied else "embedding"
        else:
            part = "head" if name == "lm_head.weight" else "final norm"
        for key in (part, "all tensors"):
            row = parts.setdefault(key, {"params": 0, "bytes": 0, "stored": set()})
            row["params"] += math.prod(tensor["shape"])
            row["bytes"] += tensor["bytes"]
            row["stored"].add(tensor["stored"])
    parts["all tensors"] = parts.pop("all tensors")  # last
    for row in parts.values():
        row["bits_per_weight"] = round(8 * row["bytes"] / row["params"], 3)
        row["stored"] = "+".join(sorted(row["stored"]))
    return parts


def directory_bytes(path: Path, manifest: dict) -> int:
    """The packed directory's size: every file the manifest lists, and the manifest."""
    return sum(entry["size"] for entry in manifest["files"].values()) + (Path(path) / "quantlite.json").stat().st_size


def per_file(manifest: dict) -> dict[str, dict]:
    """Output file -> {bytes, params, quantized, outliers, bits_per_weight}."""
    rows: dict[str, dict] = {}
    for tensor in manifest["tensors"].values():
        row = rows.setdefault(tensor["file"], {"params": 0, "quantized": 0, "outliers": 0})
        params = math.prod(tensor["shape"])
        row["params"] += params
        if tensor["stored"] in ("qweight", "q8weight"):  # 4-bit, int8 (quantlite.converter.STORED)
            row["quantized"] += params
            row["outliers"] += tensor["outliers"]
    for name, row in rows.items():
        row["bytes"] = manifest["files"][name]["size"]
        row["bits_per_weight"] = round(8 * row["bytes"] / row["params"], 3)
    return dict(sorted(rows.items()))


def printable(value: object) -> str:
    """str(value) with control characters escaped: a manifest's provenance or config strings must not
    reach the terminal as ANSI/OSC escape sequences (which can retitle, recolour or hide output)."""
    text = str(value)
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def run(args: argparse.Namespace) -> int:
    from quantlite.cli.convert import format_totals
    from quantlite.errors import FormatError
    from quantlite.packed import PackedModel

    model = PackedModel.open(args.path)
    manifest = model.manifest
    try:
        files = per_file(manifest)
        totals = format_totals(manifest, directory_bytes(model.path, manifest))
        parts = bits_by_part(manifest)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
        # the reader needs only files and config; the statistics are optional for other writers
        raise FormatError(f"{model.path}: the manifest lacks the statistics inspect shows ({error!r})") from error
    if args.json:
        print(json.dumps({"path": str(model.path), "config": manifest["config"], "quantization": manifest["quantization"],
                          "files": files, "totals": manifest["totals"],
                          "bits_by_part": parts, "directory_bytes": directory_bytes(model.path, manifest), "provenance": manifest["provenance"]}, indent=1))
        return 0
    provenance = manifest["provenance"]
    print(printable(f"{model.path}  ({provenance.get('source_kind')} source {provenance.get('source')})"))
    print(printable("config      " + ", ".join(f"{k}={manifest['config'].get(k)}" for k in CONFIG_KEYS)))
    quant = manifest["quantization"]
    print(printable(f"method      {quant.get('method')}, block size {quant.get('block_size')}, outlier fraction "
                    f"{quant.get('outlier_frac')}" + (f" within {quant['max_bits_per_weight']} bits/weight"
                    if quant.get("max_bits_per_weight") else "") + f"; quantized: {quant.get('quantized')}"))
    print(f"\n{'file':<26}{'MiB':>9}{'params':>13}{'quantized':>13}{'outliers':>10}{'bits/w':>8}")
    for name, row in files.items():
        print(f"{printable(name):<26}{row['bytes'] / 2**20:9.2f}{row['params']:13,}{row['quantized']:13,}"
              f"{row['outliers']:10,}{row['bits_per_weight']:8.3f}")
    print()
    print("\n".join(map(printable, totals.splitlines())))
    return 0
