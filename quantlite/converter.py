"""convert(src, out): a Hugging Face folder or a GGUF file of a Llama-family model (quantlite.model_config)
-> a packed directory (docs/FORMAT.md).

The work is one job per output file (embedding, each decoder layer, final norm/head). A job reads its
tensors one at a time, quantizes the Linear weights, and writes one safetensors file under a temporary
name that is renamed into place when complete. So that an interrupted run can resume:
  * `.quantlite-partial.json` records each finished file (sha256, size, tensor stats) and a fingerprint
    of the source and settings; a rerun with the same arguments skips what is done;
  * every file is a pure function of (source, settings), so the resumed result is byte-identical to an
    uninterrupted run; the manifest's creation time is the first run's (or $SOURCE_DATE_EPOCH);
  * `quantlite.json` is written last: a folder without it never looks complete.
Calibration (by default on random token ids; a text file, "self", or "none"): the decoder layers are
converted one after the other while windows of the text run through the model: for each layer, the second moment E[x x^T] of every
Linear's input, then its Linears quantized with it (GPTQ error feedback, docs/accuracy.md), then the
windows pass through the layer as written, to the next (GPTQ's sequential order;
quantlite.calibration.iter_layer_input_stats). One layer in float32, its statistics and the windows'
hidden states are in memory, not the model; nothing is stored besides the shards.
Memory: one tensor is in memory at a time, and a large tensor is quantized in row chunks
(`quantize_in_row_chunks`), so peak memory follows the largest tensor, not the checkpoint
(benchmarks/convert_memory.py, docs/convert.md).
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from multiprocessing import get_context
from pathlib import Path

import torch
from safetensors import SafetensorError

import quantlite
from quantlite.errors import ConversionError, FormatError
from quantlite.gptq import Factored, factor
from quantlite.packed import (
    EMBEDDING_FILE, FINAL_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST, TOKENIZER_DIR, check_relative_path,
    group_tensors, layer_file, sha256_file,
)
from quantlite.q8weight import Q8Weight, quantize_int8
from quantlite.qweight import SCALE_GROUP_SIZE, QWeight, block_size_problem, concat_rows
from quantlite.quantizer import METHODS, outlier_frac_problem, quantize
from quantlite.sources import open_source
from quantlite.tuning import tune_steps_problem
from quantlite.calibration import (
    NO_CALIBRATION, RANDOM_CALIBRATION, RANDOM_CALIBRATION_PRIOR, RANDOM_CALIBRATION_SEED, RANDOM_CALIBRATION_WINDOWS, RANDOM_TOKEN_EXPONENT,
    RANDOM_TOKEN_RANK_OFFSET,
    SELF_CALIBRATION, SELF_CALIBRATION_DIR, SELF_CALIBRATION_SAMPLING, SELF_CALIBRATION_WINDOWS,
    TEXT_CALIBRATION_WINDOWS,
)
from quantlite.model_config import ATTENTION_PROJECTIONS, EMBEDDING, FINAL_NORM, LAYER_NAME, LINEAR_WEIGHTS, LM_HEAD
from quantlite.sources.safetensors_file import SafetensorsFile
from quantlite.sources.tokenizer_files import CHAT_TEMPLATE_FILE, TOKENIZER_FILES
from quantlite.untrusted import parse_json

PARTIAL_STATE = ".quantlite-partial.json"
MODEL_TUNING, MODEL_TUNED = "model_tuning", "model_tuned"  # the partial state's marks of --tune-model-steps
LOCK_FILE = ".quantlite.lock"  # flock()ed while a convert writes OUT; the kernel drops it if the process dies
# How the embedding and the output head may be stored: "q4" the conversion's 4-bit method, "q8"
# block-scaled int8 (quantlite.q8weight), "float" unquantized. The default q8 costs about 0.1 %
# perplexity where q4 costs more than 1 % (docs/accuracy.md, "The head and the embedding").
DEFAULT_BLOCK_SIZE = 64  # weights per scale, unless convert is told otherwise
DEFAULT_METHOD = "quantlite"  # the only method calibrated by default (nf4 and rtn are the plain baselines)
WIDTHS = ("q8", "q4", "float")
DEFAULT_WIDTH = "q8"
# Unquantized tensors (norms, a float head) are stored in 16 bits: the source's own 16-bit dtype, and
# bfloat16 for a float32 source (its range, unlike float16's, is float32's). The runtime computes in float32.
FLOAT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
TEMP_SUFFIX = ".partial"
# Rows of a large weight are quantized in chunks of at most this many weights: quantize() keeps about
# ten float32 temporaries of its input's size, so a 4M-weight chunk costs ~160 MB whatever the tensor.
MAX_CHUNK_WEIGHTS = 1 << 22
DISK_MARGIN_BYTES = 16 << 20
FILE_MODE = 0o644  # explicit: safetensors' writer creates files 0600, and the model is meant to be shared


@dataclass(frozen=True)
class Settings:
    method: str
    block_size: int
    outlier_frac: float
    max_bits_per_weight: float | None  # caps each tensor's outlier table (quantize(max_bits_per_weight=))
    embedding: str                     # one of WIDTHS; a tied head is the embedding
    head: str                          # one of WIDTHS
    float_dtype: str | None            # a key of FLOAT_DTYPES, or None: see float_dtype_for
    no_quantize: bool
    calibration: dict | None = None  # {"sha256", "bytes", "windows", "ctx"} of the calibration text
    attention_block_size: int | None = None  # q/k/v/o_proj's block size; None: block_size

    def block_size_for(self, name: str) -> int:
        """The block size of 4-bit tensor `name`: attention_block_size for the attention projections."""
        match = LAYER_NAME.fullmatch(name)
        if self.attention_block_size is not None and match and match.group(2).removesuffix(".weight") in ATTENTION_PROJECTIONS:
            return self.attention_block_size
        return self.block_size

    def width(self, name: str) -> str:
        """How tensor `name` is stored: "q4", "q8" or "float" (WIDTHS)."""
        if self.no_quantize:
            return "float"
        if name == EMBEDDING:
            return self.embedding
        if name == LM_HEAD:
            return self.head
        match = LAYER_NAME.fullmatch(name)
        return "q4" if match and match.group(2) in LINEAR_WEIGHTS else "float"

    def float_dtype_for(self, source_dtype: torch.dtype) -> torch.dtype:
        """The dtype an unquantized tensor is stored in: --float-dtype when given; else the source's
        (its 16-bit dtype, or anything under --no-quantize); else bfloat16 for a float32 source."""
        if self.float_dtype is not None:
            return FLOAT_DTYPES[self.float_dtype]
        if self.no_quantize or source_dtype != torch.float32:
            return source_dtype
        return torch.bfloat16

    def as_manifest(self) -> dict:
        defaults = METHODS[self.method]
        return {
            "method": None if self.no_quantize else self.method,
            "block_size": self.block_size,
            "attention_block_size": self.attention_block_size,
            "outlier_frac": self.outlier_frac,
            "max_bits_per_weight": self.max_bits_per_weight,
            "codebook": defaults.codebook,
            "scale_search": defaults.scale_search,
            "double_quant": defaults.double_quant,
            "quantized": "nothing (--no-quantize)" if self.no_quantize else "decoder Linear weights (4-bit)"
            + "".join(f", {part} ({'4-bit' if width == 'q4' else 'int8'})" for part, width
                      in (("embedding", self.embedding), ("lm_head", self.head)) if width != "float"),
            "embedding": "float" if self.no_quantize else self.embedding,
            "head": "float" if self.no_quantize else self.head,
            "float_dtype": self.float_dtype,
            "no_quantize": self.no_quantize,
            "calibration": self.calibration,
        }


@dataclass(frozen=True)
class ConversionSummary:
    path: Path
    manifest: dict
    seconds: float
    files_written: int
    files_resumed: int

    @property
    def params_per_second(self) -> float:
        return self.manifest["totals"]["params"] / max(self.seconds, 1e-9)


def convert(
    src: str | Path,
    out: str | Path,
    *,
    method: str = DEFAULT_METHOD,
    block_size: int = DEFAULT_BLOCK_SIZE,
    attention_block_size: int | None = None,
    outlier_frac: float | None = None,
    max_bits_per_weight: float | None = None,
    head: str = DEFAULT_WIDTH,
    embedding: str = DEFAULT_WIDTH,
    float_dtype: str | None = None,
    no_quantize: bool = False,
    overwrite: bool = False,
    workers: int = 1,
    progress: bool = True,
    calibration: str | Path | None = None,
    calibration_windows: int | None = None,
    calibration_ctx: int = 512,
    tune_steps: int = 0,
    tune_model_steps: int = 0,
    run_jobs: Callable | None = None,
) -> ConversionSummary:
    """Convert `src` (HF folder or .gguf file of a Llama-family model) into the packed directory `out`.

    Decoder Linear weights are quantized with `method` ("quantlite", "nf4", "rtn"; see
    quantlite.quantizer.METHODS) in blocks of `block_size`, the attention projections (q/k/v/o_proj)
    in blocks of `attention_block_size` (None: the method's choice for a data-free conversion or one
    calibrated on random tokens, 32 for "quantlite"; else `block_size`); the output
    head and the embedding as `head` and `embedding` say (WIDTHS: "q8" block-scaled int8, the default; "q4" as the layers; "float"),
    a tied head being the embedding (both must then agree); unquantized tensors in `float_dtype` ("bfloat16", "float16",
    "float32"; None: the source's 16-bit dtype, bfloat16 for a float32 source); `no_quantize` writes
    the same layout with the original weights. `outlier_frac` and `max_bits_per_weight` are as in
    quantlite.quantize (left as None: the method's default fraction, capped by its bit budget).
    `calibration`: a UTF-8 text file, "random" for random token ids (seeded, drawn by frequency rank,
    with quantlite.calibration's identity prior), "self" for text sampled from the model itself, or
    "none" for none (data-free, no forward pass); None (the default): "random" for the "quantlite"
    method when the source has a tokenizer.json, else none, said in one line on stderr
    (calibration_to_run). A calibration runs over `calibration_windows` windows (None: 4 for "random", 16 for
    "self", 32 for a file) of `calibration_ctx` tokens from its start, layer after layer in GPTQ's sequential order;
    `tune_steps` > 0 then tunes each layer's scales, outliers and norm gains for that many steps
    towards the float layer's output on those windows (quantlite.tuning); `tune_model_steps` > 0, after
    all that, tunes the whole model's layers, codes included, towards the float model's logits on the
    same windows, one held out in eight for early stopping (quantlite.model_tuning). Rerunning after an interruption
    resumes. run_jobs(source, out, settings, todo, workers) -> iterator of (file, manifest entry):
    who converts the files (default: this process or its pool of `workers`; quantlite.distributed.
    convert shares them among torchrun ranks); not used for the layers of a calibrated conversion.
    Raises ConversionError for unusable input, an existing complete `out` without
    `overwrite`, or too little disk space.
    """
    started = time.perf_counter()
    settings = _check_settings(method, block_size, outlier_frac, max_bits_per_weight, embedding, head,
                               float_dtype, no_quantize, workers, attention_block_size,
                               calibrated=_is_named(calibration, SELF_CALIBRATION) or _is_text_file(calibration))
    source = open_source(src)
    given, calibration = calibration, calibration_to_run(calibration, source, method, no_quantize)
    if given is None and calibration is None and _calibrates_by_default(method, no_quantize):  # no tokenizer
        print(f"note: {source.path.name} has no usable tokenizer.json to draw random calibration tokens from, so this "
              "conversion is data-free (as --calibration none); give --calibration TEXT_FILE to calibrate it",
              file=sys.stderr)
    for steps, flag in ((tune_steps, "--tune-steps"), (tune_model_steps, "--tune-model-steps")):
        if steps != 0 and (problem := tune_steps_problem(steps, calibration, flag)):
            raise ConversionError(problem)
    if calibration is not None:
        described = _describe_calibration(calibration, calibration_windows, calibration_ctx, no_quantize)
        tuning = {key: steps for key, steps in (("tune_steps", tune_steps), ("tune_model_steps", tune_model_steps)) if steps}
        settings = replace(settings, calibration={**described, **tuning})
    if source.model_config.tie_word_embeddings and settings.head != settings.embedding and not no_quantize:
        raise ConversionError(
            f"this model ties lm_head to the embedding, one matrix: give --head and --embedding the same width "
            f"(got head {settings.head}, embedding {settings.embedding})"
        )
    out = Path(out)
    plan = _plan(source)
    fingerprint = _fingerprint(source, settings)
    with _output_lock(out):  # released (and removed) however convert ends
        state = _prepare_output(out, fingerprint, overwrite, plan)
        done: dict = state["done"]
        if state.pop(MODEL_TUNING, None) is not None:  # stopped while tuning the model: the layers from the start
            done = state["done"] = {file: entry for file, entry in done.items()
                                     if file not in plan or not LAYER_NAME.fullmatch(plan[file][0])}
        resumed = len(done)
        _check_disk_space(out, source, settings, plan, done)

        params_of = {file: sum(math.prod(source.shapes[n]) for n in names) for file, names in plan.items()}
        from tqdm import tqdm

        if TOKENIZER_DIR not in done:
            done[TOKENIZER_DIR] = _write_tokenizer(source, out)
            _save_state(out, state)
        todo = [(file, names) for file, names in plan.items() if file not in done]
        with tqdm(total=sum(params_of.values()), initial=sum(params_of[f] for f in done if f in params_of),
                  unit="param", unit_scale=True, desc="convert", disable=not progress) as bar:
            jobs = [(run_jobs or _run_jobs)(source, out, settings, todo, workers)]
            layers = [(file, names) for file, names in todo if LAYER_NAME.fullmatch(names[0])]
            # the calibration's token ids, made once (tokenized or sampled) for the layers and for model tuning
            calibration_ids = functools.cache(lambda: _calibration_ids(source, out, calibration, settings.calibration, progress))
            if settings.calibration and layers:  # the decoder layers one after the other, then the rest
                jobs = [_calibrated_layers(source, out, settings, calibration_ids, plan, done, progress),
                        _run_jobs(source, out, settings, [job for job in todo if job not in layers], workers)]
            for file, entry in (item for job in jobs for item in job):
                done[file] = entry
                _save_state(out, state)
                bar.update(params_of[file])
        if settings.calibration and settings.calibration.get("tune_model_steps") and not state.get(MODEL_TUNED):
            from quantlite.model_tuning import tune_model_shards

            state[MODEL_TUNING] = True
            _save_state(out, state)
            for file, entry in tune_model_shards(source, out, calibration_ids(), settings.calibration, done, progress):
                done[file] = entry
            del state[MODEL_TUNING]
            state[MODEL_TUNED] = True
            _save_state(out, state)

        manifest = _manifest(source, settings, plan, done, state["created"])
        write_atomically(out / MANIFEST, lambda temp: temp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n"))
        (out / PARTIAL_STATE).unlink()
        return ConversionSummary(out, manifest, time.perf_counter() - started, len(todo), resumed)


# --------------------------------------------------------------------------- quantization of one tensor
def quantize_in_row_chunks(
    w: torch.Tensor, settings: Settings, name: str, importance: torch.Tensor | Factored | None = None
) -> tuple[QWeight, float | None]:
    """(QWeight, SQNR in dB or None when exact) of w (N, K) float, quantized in chunks of whole rows.

    Rows are independent in the format except for double-quantized scales, whose groups of 256
    consecutive scales must not straddle two chunks: a chunk is a multiple of 256 / gcd(256, blocks
    per row) rows. With no outliers the result is bit-identical to quantize(w); with outliers each
    chunk keeps its own top fraction (docs/convert.md)."""
    n, k = w.shape
    block_size = settings.block_size_for(name)
    n_blocks = -(-k // block_size)
    row_multiple = SCALE_GROUP_SIZE // math.gcd(SCALE_GROUP_SIZE, n_blocks)
    rows = max(row_multiple, MAX_CHUNK_WEIGHTS // k // row_multiple * row_multiple)
    parts = [quantize(w[start:start + rows], method=settings.method, block_size=block_size,
                      outlier_frac=settings.outlier_frac, max_bits_per_weight=settings.max_bits_per_weight,
                      importance=importance, name=name) for start in range(0, n, rows)]
    return concat_rows(parts), sqnr_db(w, parts, rows)


def quantize_int8_in_row_chunks(w: torch.Tensor, block_size: int, name: str) -> tuple[Q8Weight, float | None]:
    """(Q8Weight, SQNR in dB or None when exact) of w (N, K) float, in chunks of whole rows (the rows
    of block-scaled int8 are independent, so the result is that of quantize_int8(w))."""
    rows = max(1, MAX_CHUNK_WEIGHTS // w.shape[1])
    parts = [quantize_int8(w[start:start + rows], block_size, name) for start in range(0, w.shape[0], rows)]
    whole = Q8Weight(shape=tuple(w.shape), block_size=block_size, qs=torch.cat([p.qs for p in parts]),
                     scales=torch.cat([p.scales for p in parts]))
    return whole, sqnr_db(w, parts, rows)


def sqnr_db(w: torch.Tensor, parts: list, rows: int) -> float | None:
    """10 log10(|w|^2 / |w - dequantized|^2) over chunks of `rows` rows (parts[i] is chunk i), None when exact."""
    signal = noise = 0.0
    for index, part in enumerate(parts):
        original = w[index * rows:(index + 1) * rows].to(torch.float64)
        signal += float(original.square().sum())
        noise += float((original - part.dequantize(torch.float64)).square().sum())
    return None if noise == 0 else round(10 * math.log10(max(signal, 1e-300) / noise), 3)


# --------------------------------------------------------------------------- one output file
def write_shard(source, out: Path, settings: Settings, file: str, names: list[str],
                importance: dict[str, torch.Tensor | Factored] | None = None, tune: Callable | None = None) -> dict:
    """Read, quantize and write one output file; returns its manifest entry (sha256, size, tensor stats).
    `importance`: calibration statistics by weight name (quantize's importance=); `tune(tensors,
    stats)`: the file's tensors as they will be written, from the quantized ones (quantlite.tuning)."""
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for name in names:
        w = source.read(name)
        width = settings.width(name)
        if width != "float":
            if width == "q4":
                qw, sqnr = quantize_in_row_chunks(w, settings, name, (importance or {}).get(name))
            else:
                qw, sqnr = quantize_int8_in_row_chunks(w, settings.block_size, name)
            tensors.update(qw.to_dict(name + "."))
            stats[name] = {"file": file, "shape": list(qw.shape), "stored": STORED[width], "method": qw.method,
                           "bits_per_weight": round(qw.bits_per_weight, 4), "outliers": qw.n_outliers,
                           "sqnr_db": sqnr, "bytes": qw.nbytes}
        else:
            if not bool(torch.isfinite(w).all()):  # the reader refuses it (docs/FORMAT.md): never write it
                raise ConversionError(f"{source.path}: tensor {name!r} holds NaN or Inf; a packed model's float tensors must be finite")
            w = w.to(settings.float_dtype_for(w.dtype)).contiguous()
            tensors[name] = w
            stats[name] = {"file": file, "shape": list(w.shape), "stored": str(w.dtype).replace("torch.", ""),
                           "bytes": w.numel() * w.element_size()}
        del w
    if tune is not None:
        tensors = tune(tensors, stats)
    from safetensors.torch import save_file

    write_atomically(out / file, lambda temp: save_file(tensors, str(temp), metadata={"format": "pt"}))
    return {"sha256": sha256_file(out / file), "size": (out / file).stat().st_size, "tensors": stats}


STORED = {"q4": "qweight", "q8": "q8weight"}  # the manifest's "stored" of a quantized tensor, by width
_worker_sources: dict[str, object] = {}


def _worker_job(src: str, out: Path, settings: Settings, file: str, names: list[str]) -> tuple[str, dict]:
    if src not in _worker_sources:  # each worker process opens the source once
        _worker_sources[src] = open_source(src)
    return file, write_shard(_worker_sources[src], out, settings, file, names)


def _worker_init() -> None:
    torch.set_num_threads(1)  # N processes share the cores; threads inside each would oversubscribe them


def _run_jobs(source, out: Path, settings: Settings, todo: list, workers: int):
    """Yield (file, entry) as files finish: in this process, or in a pool of `workers` processes."""
    if workers == 1 or len(todo) <= 1:
        for file, names in todo:
            yield file, write_shard(source, out, settings, file, names)
        return
    # spawn, not fork: a forked child would inherit torch's thread pool in an undefined state
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_init) as pool:
        futures = [pool.submit(_worker_job, str(source.path), out, settings, file, names) for file, names in todo]
        try:
            for future in futures:
                yield future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """write(temporary path), flush it to disk, then rename: a reader sees all of the file or nothing."""
    temp = path.with_name(_temp_name(path.name))
    try:
        write(temp)
        os.chmod(temp, FILE_MODE)
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except (OSError, SafetensorError) as error:  # SafetensorError: save_file's own I/O failure (a full disk)
        temp.unlink(missing_ok=True)
        raise ConversionError(f"cannot write {path}: {getattr(error, 'strerror', None) or error}; the folder stays incomplete "
                              "(free space or fix the cause, then rerun the same command to resume)") from error
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _write_tokenizer(source, out: Path) -> dict:
    """The tokenizer folder, built under a temporary name and renamed; returns {relative path: entry}."""
    temp = out / _temp_name(TOKENIZER_DIR)
    shutil.rmtree(temp, ignore_errors=True)
    temp.mkdir()
    try:
        source.write_tokenizer(temp)
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)
        os.replace(temp, out / TOKENIZER_DIR)
    except OSError as error:
        raise ConversionError(f"cannot write {out / TOKENIZER_DIR}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return {
        f"{TOKENIZER_DIR}/{p.name}": {"sha256": sha256_file(p), "size": p.stat().st_size}
        for p in sorted((out / TOKENIZER_DIR).iterdir())
    }


# --------------------------------------------------------------------------- calibration
def calibration_to_run(calibration, source, method: str = DEFAULT_METHOD, no_quantize: bool = False) -> str | Path | None:
    """What convert calibrates on: `calibration` as given (NO_CALIBRATION: None, data-free); not given
    (None), random token ids for the default method when the source has a tokenizer.json to draw them
    from, else None (docs/convert.md, "Calibration")."""
    if calibration is None:
        return RANDOM_CALIBRATION if _calibrates_by_default(method, no_quantize) and source.has_tokenizer() else None
    return None if _is_named(calibration, NO_CALIBRATION) else calibration


def _calibrates_by_default(method: str, no_quantize: bool) -> bool:
    """Whether a conversion given no calibration calibrates on random tokens, its source's tokenizer permitting."""
    return method == DEFAULT_METHOD and not no_quantize


def _describe_calibration(text_file, windows, ctx, no_quantize) -> dict:
    if no_quantize:
        raise ConversionError("--calibration has no use with --no-quantize")
    if windows is None:
        windows = (RANDOM_CALIBRATION_WINDOWS if _is_named(text_file, RANDOM_CALIBRATION)
                   else SELF_CALIBRATION_WINDOWS if _is_named(text_file, SELF_CALIBRATION) else TEXT_CALIBRATION_WINDOWS)
    if not (isinstance(windows, int) and windows >= 1 and isinstance(ctx, int) and ctx >= 2):
        raise ConversionError(f"calibration windows ({windows!r}) and ctx ({ctx!r}) must be integers >= 1 and >= 2")
    if _is_named(text_file, SELF_CALIBRATION):
        return {"file": SELF_CALIBRATION, "windows": windows, "ctx": ctx, "sampling": SELF_CALIBRATION_SAMPLING}
    if _is_named(text_file, RANDOM_CALIBRATION):
        return {"file": RANDOM_CALIBRATION, "windows": windows, "ctx": ctx, "seed": RANDOM_CALIBRATION_SEED,
                "exponent": RANDOM_TOKEN_EXPONENT, "rank_offset": RANDOM_TOKEN_RANK_OFFSET,
                "identity_prior": RANDOM_CALIBRATION_PRIOR}
    path = Path(text_file)
    if not path.is_file():
        raise ConversionError(f"calibration text {path} is not a readable file (or give random, self or none)")
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size, "windows": windows, "ctx": ctx}


def _is_named(calibration, name: str) -> bool:
    """Whether `calibration` is the string `name` ("none", "random", "self"): a file of that name is given
    as a Path, or as "./name" on the command line."""
    return isinstance(calibration, str) and calibration == name


def _is_text_file(calibration) -> bool:
    return calibration is not None and not any(_is_named(calibration, name)
                                               for name in (NO_CALIBRATION, RANDOM_CALIBRATION, SELF_CALIBRATION))


def _calibration_ids(source, out: Path, text_file: str | Path, calibration: dict, progress: bool) -> torch.Tensor:
    """(n,) int64 calibration token ids: random_token_ids for "random", the tokenized text of a file or,
    for "self", of what the model samples (its float copy written into OUT/SELF_CALIBRATION_DIR); the
    tokenizer is the one already written into OUT (for a GGUF, transformers built it from the metadata).
    Fewer ids than one window of calibration["ctx"]: ConversionError."""
    from quantlite.calibration import sampled_calibration_text, tokenizer_random_ids
    from quantlite.runtime.generate import GenerationError, Tokenizer

    try:
        tokenizer = Tokenizer(out / TOKENIZER_DIR)
    except GenerationError as error:
        raise ConversionError(f"--calibration {text_file} needs the model's tokenizer: {error}") from error
    if _is_named(text_file, RANDOM_CALIBRATION):  # the tokenizer's vocabulary, drawn by frequency rank
        return tokenizer_random_ids(tokenizer.backend, source.model_config.vocab_size, calibration["windows"] * calibration["ctx"],
                                    calibration["seed"], calibration["exponent"], calibration["rank_offset"])
    if _is_named(text_file, SELF_CALIBRATION):
        scratch = out / SELF_CALIBRATION_DIR
        text = sampled_calibration_text(
            lambda: convert(source.path, scratch, no_quantize=True, overwrite=True, progress=False), scratch, calibration, progress)
    else:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConversionError(f"calibration text {text_file}: {error}") from error
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.int64)
    if ids.numel() < calibration["ctx"]:
        raise ConversionError(f"calibration text {text_file} has {ids.numel()} tokens, fewer than one window of {calibration['ctx']}")
    return ids


def _calibrated_layers(source, out: Path, settings: Settings, calibration_ids: Callable[[], torch.Tensor], plan: dict,
                       done: dict, progress: bool):
    """Yield (file, entry) for each decoder layer not yet done, in order, quantized with calibration
    statistics in GPTQ's sequential order: the calibration windows reach each layer through the
    layers before it as written (quantized), so a layer's statistics include their errors. Layers
    already done (a resumed conversion) are read back and only run. One layer is in memory at a time."""
    from quantlite.calibration import iter_layer_input_stats, with_identity_prior
    from quantlite.tuning import tune_shard

    calibration = settings.calibration
    ids = calibration_ids()  # (n,) int64

    def as_written(layer: int) -> dict:
        """Layer `layer` as its shard holds it, named relative to the layer, floats as float32."""
        prefix = f"model.layers.{layer}."
        loaded = group_tensors(SafetensorsFile(out / layer_file(layer)).read_all(), str(out / layer_file(layer)))
        return {name[len(prefix):]: value if isinstance(value, QWeight) else value.float()
                for name, value in loaded.items()}

    layers = iter_layer_input_stats(source, ids, ctx=calibration["ctx"], max_windows=calibration["windows"],
                                    progress=False, forward_weights=as_written)  # convert's bar counts the layers
    prior = calibration.get("identity_prior")
    tune_steps = calibration.get("tune_steps", 0)
    for layer, stats, inputs in layers:
        file = layer_file(layer)
        if file not in done:
            # one statistic per shared input (q/k/v, gate/up), as they came: its prior added and GPTQ's
            # factorisation made once for the Linears that share it
            shared = {id(h): factor(h if prior is None else with_identity_prior(h, prior)) for h in stats.values()}
            stats = {name: shared[id(h)] for name, h in stats.items()}
            tune = (lambda tensors, entries: tune_shard(tensors, entries, source, layer, inputs, tune_steps, progress)) if tune_steps else None
            yield file, write_shard(source, out, settings, file, plan[file], importance=stats, tune=tune)


# --------------------------------------------------------------------------- plan, state, manifest
def _check_settings(method, block_size, outlier_frac, max_bits_per_weight, embedding, head, float_dtype,
                    no_quantize, workers, attention_block_size=None, calibrated=False) -> Settings:
    if method not in METHODS:
        raise ConversionError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    frac = METHODS[method].outlier_frac if outlier_frac is None else float(outlier_frac)
    if attention_block_size is None:  # the method's choice, for data-free or random-token conversions at the default block size
        chosen = METHODS[method].attention_block_size if not calibrated and block_size == DEFAULT_BLOCK_SIZE else None
        attention_block_size = chosen or block_size  # (docs/accuracy.md); a block size the user chose holds for all
    if problem := block_size_problem(block_size) or block_size_problem(attention_block_size) or outlier_frac_problem(frac):
        raise ConversionError(problem)
    if max_bits_per_weight is None and outlier_frac is None:
        max_bits_per_weight = METHODS[method].max_bits_per_weight  # the default fraction comes with its cap
    if max_bits_per_weight is not None and not (
        isinstance(max_bits_per_weight, (int, float)) and math.isfinite(max_bits_per_weight) and max_bits_per_weight > 0
    ):
        raise ConversionError(f"max bits per weight {max_bits_per_weight!r} must be a positive number")
    for part, width in (("embedding", embedding), ("head", head)):
        if width not in WIDTHS:
            raise ConversionError(f"{part} width {width!r} is not one of {', '.join(WIDTHS)}")
    if float_dtype is not None and float_dtype not in FLOAT_DTYPES:
        raise ConversionError(f"float dtype {float_dtype!r} is not one of {', '.join(FLOAT_DTYPES)}")
    if not (isinstance(workers, int) and workers >= 1):
        raise ConversionError(f"workers {workers!r} must be a positive integer")
    return Settings(method, block_size, frac, max_bits_per_weight, embedding, head, float_dtype, bool(no_quantize),
                    attention_block_size=attention_block_size)


def _plan(source) -> dict[str, list[str]]:
    """Output file -> the HF tensor names it holds, in the order they are written."""
    plan = {EMBEDDING_FILE: [EMBEDDING]}
    for layer in range(source.model_config.num_layers):
        prefix = f"model.layers.{layer}."
        plan[layer_file(layer)] = sorted(n for n in source.shapes if n.startswith(prefix))
    plan[FINAL_FILE] = [FINAL_NORM] + ([] if source.model_config.tie_word_embeddings else [LM_HEAD])
    return plan


def _fingerprint(source, settings: Settings) -> str:
    identity = {"source": str(Path(source.path).resolve()), "files": source.identity(),
                "settings": settings.as_manifest(), "format": FORMAT_VERSION, "tool": quantlite.__version__}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


@contextmanager
def _output_lock(out: Path) -> Iterator[None]:
    """Create `out` if needed and hold OUT/.quantlite.lock (flock) while the body runs: a second convert
    into the same folder stops with a clear message instead of interleaving its files with ours."""
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder")
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as error:
        raise ConversionError(f"cannot write into {out}: {error.strerror or error}") from error
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(handle).st_ino != os.stat(path).st_ino:  # the file was removed by its last holder
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(handle)
        raise ConversionError(f"{out} is being written by another `quantlite convert` (it holds {LOCK_FILE}); "
                              "wait for it to finish, or stop it and rerun to resume") from None
    try:
        yield
    finally:
        if os.fstat(handle).st_size == 0:  # ours are empty: a user's file of that name is left alone
            path.unlink(missing_ok=True)
        os.close(handle)


def _prepare_output(out: Path, fingerprint: str, overwrite: bool, plan: dict) -> dict:
    """Check what `out` holds and return the partial state to continue from (fresh or resumed).

    Only what quantlite recorded as its own (the manifest's files, the partial state's finished and
    planned files, their temporary names) is ever removed or replaced; anything else in `out`, a
    symlink or a FIFO under one of our names included, stops the conversion, --overwrite or not."""
    owned = _owned_paths(out)
    foreign = _foreign_entries(out, owned)
    if foreign:
        raise ConversionError(f"{out} holds files quantlite did not write ({', '.join(foreign[:3])}"
                              f"{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}); choose a new or empty "
                              "folder (--overwrite replaces only a folder of quantlite's own output)")
    state = _load_state(out)
    complete = MANIFEST in owned
    if (complete or (state and state.get("fingerprint") != fingerprint)) and not overwrite:
        what = "a converted model" if complete else "an interrupted conversion of another source or with other settings"
        raise ConversionError(f"{out} already holds {what}; pass --overwrite (overwrite=True) to replace it")
    if complete or state is None or state.get("fingerprint") != fingerprint:
        _remove(out, owned)
        created = os.environ.get("SOURCE_DATE_EPOCH", "")  # the reproducible-builds convention
        if created and not created.isdigit():
            raise ConversionError(f"SOURCE_DATE_EPOCH={created!r} must be a number of seconds since 1970")
        created_at = datetime.fromtimestamp(int(created) if created else time.time(), timezone.utc)
        state = {"fingerprint": fingerprint, "created": created_at.strftime("%Y-%m-%dT%H:%M:%SZ"), "done": {}}
    else:
        state["done"] = {file: entry for file, entry in state["done"].items() if _still_intact(out, file, entry)}
        _remove(out, {path for path in owned if path.split("/")[0].endswith(TEMP_SUFFIX)})  # left by a killed write
    state["planned"] = [*plan, TOKENIZER_DIR]  # recorded before anything is written: all of it is ours
    _save_state(out, state)
    return state


def _owned_paths(out: Path) -> set[str]:
    """Relative paths in `out` that quantlite wrote (or may have been writing), from its own records."""
    owned = {LOCK_FILE, PARTIAL_STATE, _temp_name(PARTIAL_STATE)}
    names: set[str] = set()
    manifest = _load_own_json(out / MANIFEST)
    if isinstance(manifest, dict) and manifest.get("format") == FORMAT_NAME and isinstance(manifest.get("files"), dict):
        owned.update((MANIFEST, _temp_name(MANIFEST)))
        names.update(manifest["files"])
    state = _load_state(out)
    if state is not None:
        owned.add(_temp_name(MANIFEST))
        for file, entry in state["done"].items():
            names.update(entry if file == TOKENIZER_DIR and isinstance(entry, dict) else [file])
        names.update(name for name in state.get("planned", []) if isinstance(name, str))
    for name in names:
        if name == TOKENIZER_DIR:
            owned.update(f"{TOKENIZER_DIR}/{file}" for file in TOKENIZER_FILES)
        elif _is_format_path(name):
            owned.add(name)
        else:
            continue
        if "/" not in name:
            owned.add(_temp_name(name))
        if name.startswith(TOKENIZER_DIR):  # the folder is built under a temporary name, then renamed
            owned.update(f"{_temp_name(TOKENIZER_DIR)}/{file}" for file in (*TOKENIZER_FILES, CHAT_TEMPLATE_FILE))
    scratch = out / SELF_CALIBRATION_DIR  # a conversion of its own (calibration="self")
    if scratch.is_dir() and not scratch.is_symlink():
        owned.update(f"{SELF_CALIBRATION_DIR}/{path}" for path in _owned_paths(scratch) if path != LOCK_FILE)
    return owned


def _foreign_entries(out: Path, owned: set[str]) -> list[str]:
    """Entries of `out` (recursively, symlinks not followed) that are not regular files quantlite owns."""
    folders = {path.rsplit("/", 1)[0] for path in owned if "/" in path}
    folders |= {folder.rsplit("/", 1)[0] for folder in folders if "/" in folder}
    foreign: list[str] = []

    def walk(folder: Path, prefix: str) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            relative = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                (walk(Path(entry.path), relative + "/") if relative in folders else foreign.append(relative + "/"))
            elif relative not in owned or not entry.is_file(follow_symlinks=False):
                foreign.append(relative)

    walk(out, "")
    return foreign


def _remove(out: Path, paths: set[str]) -> None:
    """Remove these owned files (never the lock we hold), then the folders they leave empty."""
    for path in sorted(paths - {LOCK_FILE}, key=lambda p: -p.count("/")):
        (out / path).unlink(missing_ok=True)
    for folder in sorted({p.rsplit("/", 1)[0] for p in paths if "/" in p}, key=lambda p: -p.count("/")):
        try:
            (out / folder).rmdir()
        except OSError:
            pass  # not empty (a file of ours that stays) or already gone


def _temp_name(name: str) -> str:
    return "." + name + TEMP_SUFFIX


def _is_format_path(name: object) -> bool:
    try:
        check_relative_path(name)
    except FormatError:
        return False
    return True


def _load_own_json(path: Path):
    """A JSON file quantlite wrote in OUT, or None when absent, not a regular file, or unreadable."""
    try:
        if not path.is_file() or path.is_symlink():
            return None
        return parse_json(path.read_bytes(), path, ValueError)
    except (OSError, ValueError):
        return None


def _load_state(out: Path) -> dict | None:
    state = _load_own_json(out / PARTIAL_STATE)
    ok = isinstance(state, dict) and isinstance(state.get("done"), dict) and isinstance(state.get("created"), str)
    if ok and not isinstance(state.get("planned", []), list):
        ok = False
    return state if ok else None


def _save_state(out: Path, state: dict) -> None:
    write_atomically(out / PARTIAL_STATE, lambda temp: temp.write_text(json.dumps(state, sort_keys=True)))


def _still_intact(out: Path, file: str, entry: dict) -> bool:
    """A file recorded as done counts only if it is still there, unchanged."""
    try:
        if file == TOKENIZER_DIR:
            return all(_is_format_path(name) and sha256_file(out / name) == e["sha256"] for name, e in entry.items())
        if not _is_format_path(file):
            return False
        return (out / file).stat().st_size == entry["size"] and sha256_file(out / file) == entry["sha256"]
    except (OSError, KeyError, TypeError, AttributeError):
        return False


def _check_disk_space(out: Path, source, settings: Settings, plan: dict, done: dict) -> None:
    """Refuse up front when the estimated output does not fit."""
    needed = DISK_MARGIN_BYTES + (0 if TOKENIZER_DIR in done else source.tokenizer_nbytes())
    for file, names in plan.items():
        if file in done:
            continue
        for name in names:
            numel = math.prod(source.shapes[name])
            width = settings.width(name)
            if width == "q4":
                # 4-bit codes, a 16-bit scale per block, 32 bits per outlier: an upper bound for every method
                needed += numel // 2 + numel * 2 // settings.block_size_for(name) + math.ceil(numel * settings.outlier_frac) * 4
            elif width == "q8":
                needed += numel + numel * 2 // settings.block_size  # int8 + a float16 scale per block
            else:
                needed += numel * source.itemsize(name)  # an upper bound: float32 may be stored in 16 bits
    free = shutil.disk_usage(out).free
    if needed > free:
        raise ConversionError(f"{out}: the converted model needs about {needed / 2**20:.0f} MiB, "
                              f"only {free / 2**20:.0f} MiB are free")


def _manifest(source, settings: Settings, plan: dict, done: dict, created: str) -> dict:
    files = dict(done[TOKENIZER_DIR])
    tensors: dict[str, dict] = {}
    for file in plan:
        files[file] = {"sha256": done[file]["sha256"], "size": done[file]["size"]}
        tensors.update(done[file]["tensors"])
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "config": source.config,
        "quantization": settings.as_manifest(),
        "layout": {"embedding": EMBEDDING_FILE, "layers": [layer_file(i) for i in range(source.model_config.num_layers)],
                   "final": FINAL_FILE, "tokenizer": TOKENIZER_DIR},
        "files": files,
        "tensors": tensors,
        "totals": _totals(tensors, files),
        "provenance": {"source": str(Path(source.path).resolve()), "source_kind": source.kind,
                       "tool": f"quantlite {quantlite.__version__}", "torch": torch.__version__, "created": created},
    }


def _totals(tensors: dict[str, dict], files: dict[str, dict]) -> dict:
    params = sum(math.prod(t["shape"]) for t in tensors.values())
    quantized = {n: t for n, t in tensors.items() if t["stored"] in STORED.values()}
    quantized_params = sum(math.prod(t["shape"]) for t in quantized.values())
    by_type: dict[str, list[float]] = {}
    for name, t in quantized.items():
        match = LAYER_NAME.fullmatch(name)
        kind = (match.group(2) if match else name.removeprefix("model.")).removesuffix(".weight")
        if t["sqnr_db"] is not None:
            by_type.setdefault(kind, []).append(t["sqnr_db"])
    weights_bytes = sum(f["size"] for name, f in files.items() if name.endswith(".safetensors"))
    return {
        "params": params,
        "quantized_params": quantized_params,
        "bytes": weights_bytes,
        "fp16_bytes": 2 * params,
        "bits_per_weight": round(8 * weights_bytes / params, 4),
        "quantized_bits_per_weight": round(8 * sum(t["bytes"] for t in quantized.values()) / quantized_params, 4)
        if quantized_params else None,
        "outliers": sum(t["outliers"] for t in quantized.values()),
        "sqnr_db_by_type": {kind: round(sum(v) / len(v), 3) for kind, v in sorted(by_type.items())},
    }
