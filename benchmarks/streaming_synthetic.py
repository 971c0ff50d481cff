"""Benchmark 1 (issue 4): a synthetic Llama far larger than the memory budget, streamed from disk.

    .venv/bin/python -m benchmarks.streaming_synthetic --out /tmp/ql-synth-7b --budget 1GB

Writes (once) a packed model of random 4-bit weights with Llama-2-7B shapes and 40 layers (>= 4 GB
on disk), then measures in separate child processes (so each peak RSS is its own):
  * the read bandwidth of the shards, page cache dropped first (posix_fadvise DONTNEED), buffered and
    O_DIRECT (one queue of reads across the shards), before the first streamed run and after each
    (`--repeats`); the fastest of all sets the strict floor (the disk is shared), and each run's
    ratio is also printed against the measurements just around it;
  * "stream": decode steps with the budget; every shard is dropped from the page cache right after
    it is read, so each step really reads the streamed layers from disk (and, by default, the runtime
    reads them O_DIRECT, as it does on its own for a model larger than the memory: `--io`);
  * "resident": the same steps with every layer in memory: the compute floor.
Goal: time per decode step <= 1.2 x max(I/O floor, compute floor), where the I/O floor is the bytes a
step reads divided by the measured bandwidth; peak RSS within the budget (which counts the streamed
layers in flight) plus the KV cache, activations and the interpreter's own baseline (printed separately).

The helpers here (synthetic packed writer, cold reads, child runs) serve the other streaming benchmarks.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.machine import describe
from quantlite.codebook import nf4_codebook, zero_code
from quantlite.packed import EMBEDDING_FILE, FINAL_FILE, FORMAT_NAME, FORMAT_VERSION, MANIFEST, PackedModel, layer_file
from quantlite.qweight import SCALE_GROUP_SIZE, QWeight

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
READ_CHUNK = 64 << 20


# ------------------------------------------------------------------------------ synthetic packed models
OUTLIER_STRIDE = 86  # default_format: one outlier every 86 columns of each row, 1.16 % (the default's ~1 % at 4.5 bits)


def random_qweight(n: int, k: int, generator: torch.Generator, block_size: int = 64, default_format: bool = False) -> QWeight:
    """Random codes and plausible fp16 scales: the bytes and the math of a real 4-bit weight.
    default_format: stored as `quantlite convert`'s default method stores it instead: double-quantized
    8-bit scales and an outlier table (every OUTLIER_STRIDE-th column, the zero code under it)."""
    blocks = -(-k // block_size)
    codes = torch.randint(0, 256, (n, blocks * block_size // 2), dtype=torch.uint8, generator=generator)
    if not default_format:
        return QWeight(
            shape=(n, k), block_size=block_size, method="quantlite", codebook=nf4_codebook(), codes=codes,
            outlier_row_ptr=torch.zeros(n + 1, dtype=torch.int32), outlier_cols=torch.zeros(0, dtype=torch.uint16),
            outlier_vals=torch.zeros(0, dtype=torch.float16),
            scales=(torch.rand(n, blocks, generator=generator) * 0.01 + 0.005).half(),
        )
    codebook = nf4_codebook()
    cols = torch.arange(0, k, OUTLIER_STRIDE, dtype=torch.int32)  # even columns: the low nibble of byte col // 2
    codes[:, cols // 2] = (codes[:, cols // 2] & 0xF0) | zero_code(codebook)
    groups = -(-n * blocks // SCALE_GROUP_SIZE)
    return QWeight(
        shape=(n, k), block_size=block_size, method="quantlite", codebook=codebook, codes=codes,
        outlier_row_ptr=torch.arange(n + 1, dtype=torch.int32) * len(cols), outlier_cols=cols.to(torch.uint16).repeat(n),
        outlier_vals=(torch.randn(n * len(cols), generator=generator) * 0.05).half(),
        scale_codes=torch.randint(0, 256, (n, blocks), dtype=torch.uint8, generator=generator),
        scale_group_min=torch.rand(groups, generator=generator) * 0.005 + 0.005,
        scale_group_step=torch.rand(groups, generator=generator) * 4e-5,
    )


def random_weight(n: int, k: int, generator: torch.Generator, quantized: bool, default_format: bool = False) -> dict:
    if quantized:
        return random_qweight(n, k, generator, default_format=default_format).to_dict()
    return {"": (torch.randn(n, k, generator=generator, dtype=torch.float32) * 0.02).half()}


def layer_tensors(config: dict, index: int, generator: torch.Generator, quantized: bool, default_format: bool = False) -> dict[str, torch.Tensor]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    shapes = {
        "self_attn.q_proj.weight": (config["num_attention_heads"] * head_dim, hidden), "self_attn.k_proj.weight": (kv, hidden),
        "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, config["num_attention_heads"] * head_dim),
        "mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden), "mlp.down_proj.weight": (hidden, inter),
    }
    prefix = f"model.layers.{index}."
    tensors = {prefix + "input_layernorm.weight": torch.ones(hidden, dtype=torch.float16),
               prefix + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.float16)}
    for name, (n, k) in shapes.items():
        for field, tensor in random_weight(n, k, generator, quantized, default_format).items():
            tensors[prefix + name + ("." + field if field else "")] = tensor
    return tensors


def write_synthetic(out: Path, config: dict, quantized: bool, seed: int = 0, quantized_embedding: bool | None = None,
                    default_format: bool = False) -> PackedModel:
    """A packed directory of random weights with `config`'s shapes (tied embeddings unless config
    says otherwise; 4-bit or fp16; the embedding as `quantized_embedding`, default: as the rest;
    default_format: 4-bit weights as random_qweight's)."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    manifest_path = out / MANIFEST
    if manifest_path.is_file():
        return PackedModel.open(out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    hf_config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                 "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                 "tie_word_embeddings": True, "torch_dtype": "float16", **config}
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    files: dict[str, dict] = {}

    def write(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, str(out / name))
        digest = hashlib.sha256()
        with open(out / name, "rb") as handle:
            for chunk in iter(lambda: handle.read(READ_CHUNK), b""):
                digest.update(chunk)
        files[name] = {"size": (out / name).stat().st_size, "sha256": digest.hexdigest()}

    def named(name: str, weight: dict) -> dict:
        return {name + ("." + field if field else ""): tensor for field, tensor in weight.items()}

    embedding_quantized = quantized if quantized_embedding is None else quantized_embedding
    write(EMBEDDING_FILE, named("model.embed_tokens.weight", random_weight(vocab, hidden, generator, embedding_quantized, default_format)))
    final = {"model.norm.weight": torch.ones(hidden, dtype=torch.float16)}
    if not hf_config["tie_word_embeddings"]:
        final.update(named("lm_head.weight", random_weight(vocab, hidden, generator, quantized, default_format)))
    write(FINAL_FILE, final)
    for index in tqdm(range(config["num_hidden_layers"]), desc=f"writing {out.name}", unit="layer"):
        write(layer_file(index), layer_tensors(config, index, generator, quantized, default_format))
    manifest = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "config": hf_config,
                "quantization": {"method": "synthetic-random" if quantized else "none"}, "files": files,
                "tensors": {}, "provenance": {"source": "benchmarks/streaming_synthetic.py (random weights)"}}
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return PackedModel.open(out)


# ------------------------------------------------------------------------------ cold reads
def fadvise(path: Path, advice: int) -> None:
    """posix_fadvise over the whole file: DONTNEED makes the kernel forget its cached pages (the next
    read comes from the disk), WILLNEED starts reading it into the page cache in the background."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, advice)
    finally:
        os.close(fd)


def drop_from_page_cache(path: Path) -> None:
    fadvise(path, os.POSIX_FADV_DONTNEED)


class ColdPackedModel:
    """A PackedModel whose every shard leaves the page cache right after it is read."""

    def __init__(self, packed: PackedModel):
        self.packed = packed

    def __getattr__(self, name):
        return getattr(self.packed, name)

    def load_layer(self, index: int, **read) -> dict:
        tensors = self.packed.load_layer(index, **read)
        drop_from_page_cache(self.packed.path / layer_file(index))
        return tensors

    def load_final(self, **read) -> dict:
        tensors = self.packed.load_final(**read)
        drop_from_page_cache(self.packed.path / FINAL_FILE)
        return tensors

    def load_embedding(self, **read):
        table = self.packed.load_embedding(**read)
        drop_from_page_cache(self.packed.path / EMBEDDING_FILE)
        return table

    def load_embedding_rows(self, rows):
        table = self.packed.load_embedding_rows(rows)
        drop_from_page_cache(self.packed.path / EMBEDDING_FILE)
        return table


def read_bandwidth(packed: PackedModel, max_bytes: int = 2 << 30) -> dict[str, float]:
    """Bytes/s of cold reads of whole layer shards (up to max_bytes of them, in layer order), each way
    the disk can be read here, every shard dropped from the page cache first:
      * "buffered": sequential readinto of IO_CHUNK_BYTES into one reused buffer, the next shard
        hinted (WILLNEED) before this one is read (the runtime's page-cache mode);
      * "direct": O_DIRECT, IO_THREADS positioned reads of IO_CHUNK_BYTES in flight into one reused
        aligned buffer, one queue across the shards (the next shard's reads start while this one's
        last are in flight: the disk is never left idle between shards), where the file system allows it.
    The floor of a benchmark is the best of them: the disk's speed, not the loader's."""
    from concurrent.futures import ThreadPoolExecutor

    from quantlite.sources.arena import IO_CHUNK_BYTES, IO_THREADS, PAGE, aligned_buffer

    paths = [packed.path / layer_file(index) for index in range(packed.num_layers)]
    sizes = [path.stat().st_size for path in paths]
    paths = paths[: next((i + 1 for i in range(len(sizes)) if sum(sizes[: i + 1]) >= max_bytes), len(paths))]
    buffer = aligned_buffer(-(-max(sizes) // PAGE) * PAGE)
    buffer.fill_(0)  # faulted in before timing
    view = memoryview(buffer.numpy())

    def buffered() -> int:
        total = 0
        for index, path in enumerate(paths):
            if index + 1 < len(paths):
                fadvise(paths[index + 1], os.POSIX_FADV_WILLNEED)
            with open(path, "rb", buffering=0) as handle:
                while (got := handle.readinto(view[:IO_CHUNK_BYTES])) > 0:
                    total += got
        return total

    def direct() -> int:
        fds: list[int] = []

        def chunk(fd_and_offset: tuple[int, int]) -> int:
            fd, offset = fd_and_offset
            return os.preadv(fd, [view[offset : offset + IO_CHUNK_BYTES]], offset)

        try:
            for path in paths:
                fds.append(os.open(path, os.O_RDONLY | os.O_DIRECT))
            chunks = [(fd, offset) for fd, size in zip(fds, sizes) for offset in range(0, -(-size // PAGE) * PAGE, IO_CHUNK_BYTES)]
            with ThreadPoolExecutor(IO_THREADS) as pool:
                sum(pool.map(chunk, chunks))
            return sum(sizes[: len(fds)])
        finally:
            for fd in fds:
                os.close(fd)

    rates = {}
    for name, read in (("buffered", buffered), ("direct", direct)):
        for path in paths:
            drop_from_page_cache(path)
        start = time.perf_counter()
        try:
            total = read()
        except OSError:  # no O_DIRECT on this file system
            continue
        rates[name] = total / (time.perf_counter() - start)
    return rates


def best_bandwidth(*measurements: dict[str, float]) -> tuple[float, str]:
    """The fastest (bytes/s, "how") of several read_bandwidth results: the stricter floor."""
    return max((rate, how) for rates in measurements for how, rate in rates.items())


def describe_bandwidth(label: str, rates: dict[str, float]) -> str:
    return f"{label}: " + ", ".join(f"{how} {rate / 1e9:.2f} GB/s" for how, rate in rates.items())


# ------------------------------------------------------------------------------ one measured run (child process)
def measure_decode(path: str, budget: str, steps: int, cold: bool, prefetch: bool = True, prompt_len: int = 4,
                   direct_io: bool | None = None) -> dict:
    """Prefill a short prompt, then time `steps` decode steps; figures of this process only.
    budget: a size, or "stream-all" for the smallest budget that streams (the final norm and two
    slots of the largest unit: no decoder layer, head or embedding resident). direct_io: as
    StreamingLlama's (None: its own choice)."""
    import resource

    from quantlite.runtime.streaming import StreamingLlama, peak_rss_bytes, unit_sizes

    baseline_rss = peak_rss_bytes()
    packed = PackedModel.open(path)
    for index in range(packed.num_layers):
        drop_from_page_cache(packed.path / layer_file(index))
    source = ColdPackedModel(packed) if cold else packed
    if budget == "stream-all":
        sizes = unit_sizes(packed, torch.float32)
        budget = sizes.norm + (2 if prefetch else 1) * max(sizes.layers + [sizes.head])
    model = StreamingLlama(source, memory_budget=budget, prefetch=prefetch, direct_io=direct_io)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        cache = model.new_cache(1, prompt_len + steps + 1)
        logits = model.forward(torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=generator), cache=cache, last_only=True)
        times, reads, counts = [], [], []
        loader_before = (model.stats.load_seconds, model.stats.prepare_seconds, model.stats.wait_seconds)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            before = model.decode_reads()
            start = time.perf_counter()
            logits = model.forward(token, cache=cache, last_only=True)
            times.append(time.perf_counter() - start)
            after = model.decode_reads()
            counts.append({key: after[key] - before[key] for key in after})
            reads.append(counts[-1]["bytes"])
    model.close()
    stats = model.stats
    load, prepare, wait = (after - before for after, before in zip((stats.load_seconds, stats.prepare_seconds, stats.wait_seconds), loader_before))
    return {"decode_load_seconds": load, "decode_prepare_seconds": prepare, "decode_wait_seconds": wait,
            "direct_io": model.stats.direct_io, "arenas_allocated": model.stats.arenas_allocated, "kept_reads": model.stats.kept_reads,
            "step_seconds": times, "step_bytes": reads, "step_reads": counts, "peak_rss": peak_rss_bytes(), "baseline_rss": baseline_rss,
            "budget": model.memory_budget, "slots": model.plan.slots, "head_resident": model.plan.head_resident, "embedding_resident": model.stats.embedding_resident,
            "load_seconds": model.stats.load_seconds,
            "resident_layers": model.stats.resident_layers, "layers": model.config.num_layers,
            "resident_bytes": model.stats.resident_bytes, "max_layer_bytes": max(model.stats.layer_bytes),
            "wait_seconds": model.stats.wait_seconds, "kv_bytes": cache.nbytes,
            "utime": resource.getrusage(resource.RUSAGE_SELF).ru_utime}


def measure_peak_growth(path: str, budget: int, steps: int, direct_io: bool | None = None) -> dict:
    """Peak RSS growth over the resident set just before the model opens (VmHWM reset through
    /proc/self/clear_refs; Linux), over `steps` decode steps with `budget` (direct_io: as
    StreamingLlama's). Run it in a child process."""
    from quantlite.kernels.dispatch import qmatmul
    from quantlite.runtime.streaming import StreamingLlama

    # first the one-time costs that are not the model's: the back-ends' imports (triton is ~100 MiB
    # of RSS), the native library and its thread pool
    qmatmul(torch.randn(1, 256), random_qweight(64, 256, torch.Generator().manual_seed(0)))
    status = Path("/proc/self/status").read_text()
    before = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) * 1024
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    model = StreamingLlama(PackedModel.open(path), memory_budget=budget, direct_io=direct_io)
    with torch.inference_mode():
        cache = model.new_cache(1, steps + 2)
        token = torch.tensor([[1, 2]])
        for _ in range(steps):
            token = model.forward(token, cache=cache, last_only=True)[:, -1].argmax(-1, keepdim=True)
    status = Path("/proc/self/status").read_text()
    peak = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    model.close()
    return {"growth": peak - before, "resident_layers": model.stats.resident_layers, "head_resident": model.plan.head_resident,
            "slots": model.plan.slots,
            "embedding_resident": model.stats.embedding_resident, "fixed": model.sizes.embedding + model.sizes.head}


def run_child(target: str = "benchmarks.streaming_synthetic:measure_decode", **kwargs) -> dict:
    """target(**kwargs) ("module:function", JSON arguments) in a fresh interpreter: its peak RSS is
    not the parent's. The function returns a JSON-able dict."""
    module, function = target.split(":")
    code = (f"import json, sys; from {module} import {function}; "
            f"print('RESULT ' + json.dumps({function}(**json.loads(sys.argv[1]))))")
    arguments = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})
    done = subprocess.run([sys.executable, "-c", code, arguments], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"child run {target} failed:\n{done.stdout}\n{done.stderr[-4000:]}")


def print_loader_split(run: dict, units: int) -> None:
    """Where a streamed unit's time went over the measured decode steps (measure_decode's counters)."""
    total = sum(run["step_seconds"])
    prepare, load, wait = run["decode_prepare_seconds"], run["decode_load_seconds"], run["decode_wait_seconds"]
    print(f"per streamed unit: loader {load / units:.2f} s (of which building kernel layouts {prepare / units:.2f} s, "
          f"overlapping the read of the unit's later weights); "
          f"compute waited {wait / units:.2f} s, computed {(total - wait) / units:.2f} s; "
          f"{run['arenas_allocated']} read buffers allocated in the whole run, {run['kept_reads']} streamed reads rebuilt nothing "
          f"(packed.KeptUnit)")


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ql-synth-7b"))
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--budget", default="1GB")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1,
                        help="streamed runs, each its own process, with a cold-read measurement before the first and after each")
    parser.add_argument("--io", choices=("direct", "buffered", "auto"), default="direct",
                        help="how the runtime reads streamed shards (auto: O_DIRECT when the model outgrows the memory; "
                             "the cold reads here stand for such a model)")
    args = parser.parse_args()
    print(describe())
    packed = write_synthetic(args.out, {**LLAMA2_7B, "num_hidden_layers": args.layers}, quantized=True)
    total = sum(f["size"] for f in packed.manifest["files"].values())
    direct_io = {"direct": True, "buffered": False, "auto": None}[args.io]
    cold_reads, streams, clock = [read_bandwidth(packed)], [], []
    for _ in range(args.repeats):  # the disk is shared: its speed is measured around every run
        clock.append(time.strftime("%H:%M:%S", time.gmtime()))
        streams.append(run_child(path=args.out, budget=args.budget, steps=args.steps, cold=True, direct_io=direct_io))
        cold_reads.append(read_bandwidth(packed))
    clock.append(time.strftime("%H:%M:%S", time.gmtime()))
    resident = run_child(path=args.out, budget="64GB", steps=args.steps, cold=False)
    compute_floor = min(resident["step_seconds"])
    # the strict floor: the fastest of all the cold-read measurements
    bandwidth, how = best_bandwidth(*cold_reads)
    stream = streams[0]
    reads = stream["step_reads"][stream["step_seconds"].index(min(stream["step_seconds"]))]
    print(f"packed model: {gib(total)} on disk, {packed.num_layers} layers of {gib(packed.layer_nbytes(0))}")
    print(f"budget {args.budget}: {stream['resident_layers']} of {stream['layers']} layers resident, head "
          f"{'resident' if stream['head_resident'] else 'streamed'}, embedding {'resident' if stream['embedding_resident'] else 'on disk'}; "
          f"{stream['slots']} streaming slots (prefetch depth {stream['slots'] - 1}); "
          f"per decode step {reads['layers']} layers, {reads['heads']} head and {reads['embedding_rows']} embedding rows read, "
          f"{gib(max(stream['step_bytes']))}; streamed shards read {'O_DIRECT' if stream['direct_io'] else 'through the page cache'}")
    print(f"compute floor    : {compute_floor:.2f} s per step (every layer resident, best of {args.steps})")
    print(f"cold reads       : {'; '.join(describe_bandwidth(f'#{i}', rates) for i, rates in enumerate(cold_reads))}; "
          f"strict floor at the best, {bandwidth / 1e9:.2f} GB/s ({how})")
    ratios = []
    for i, run in enumerate(streams):
        io_floor = max(run["step_bytes"]) / bandwidth
        floor = max(io_floor, compute_floor)
        own_bandwidth, _ = best_bandwidth(cold_reads[i], cold_reads[i + 1])  # the measurements just before and after this run
        own_floor = max(max(run["step_bytes"]) / own_bandwidth, compute_floor)
        best, middle = min(run["step_seconds"]), statistics.median(run["step_seconds"])
        ratios.append(best / floor)
        print(f"run {i + 1} ({clock[i]}-{clock[i + 1]} UTC): steps {', '.join(f'{t:.2f}' for t in run['step_seconds'])} s; "
              f"floor max(I/O {io_floor:.2f} s, compute {compute_floor:.2f} s) = {floor:.2f} s: ratio {best / floor:.2f} best, "
              f"{middle / floor:.2f} median (against the cold reads #{i} and #{i + 1} around it, {own_bandwidth / 1e9:.2f} GB/s: "
              f"{best / own_floor:.2f} / {middle / own_floor:.2f}); waited on the loader {run['wait_seconds']:.2f} s in all")
        print_loader_split(run, (reads["layers"] + reads["heads"]) * args.steps)
    print(f"ratio            : best step {min(ratios):.2f} x the strict floor, median of the runs' best steps "
          f"{statistics.median(ratios):.2f} x (goal <= 1.2)")
    print(f"peak RSS         : {', '.join(gib(run['peak_rss']) for run in streams)} (interpreter + torch before loading: "
          f"{gib(stream['baseline_rss'])}; above that: {', '.join(gib(run['peak_rss'] - run['baseline_rss']) for run in streams)}; "
          f"budget {args.budget}, one layer {gib(stream['max_layer_bytes'])}, KV cache {stream['kv_bytes'] / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
