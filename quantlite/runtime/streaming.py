"""Where the weights live: a Llama-family model (quantlite.model_config) run one decoder layer at a time from a packed directory.

    load(path, device, memory_budget, prefetch) -> StreamingLlama

The memory budget covers every weight in memory at once: what stays resident, and the streamed
weights in flight (the one computing and, with prefetch, those being read ahead). The units are the
decoder layers 0..L-1 and the head (unit L); their sizes in memory are known from the shard headers
before anything is read (`memory_nbytes`). The plan (`plan_residency`):
  * everything fits (embedding, head, all layers): all resident, a second pass reads nothing;
  * otherwise the embedding stays on disk (a step reads the rows of its tokens, `PackedModel.
    load_embedding_rows`, never the table; a tied head that is resident serves them instead), and
    of "head resident" and "head streamed" the one that keeps more bytes resident is chosen; layers
    0..R-1 are resident, R..L-1 (and the head, if streamed) are read on every pass into slots, each
    as large as the largest streamed unit: one with prefetch off; with prefetch, the prefetch depth
    is chosen by the budget (`read_ahead_slots`): with O_DIRECT enough slots that the units read
    ahead cover two rounds of the reader's queue (3 for 0.1 GiB Llama-7B layers, 2 for 1.7 GiB 405B
    ones, at most MAX_SLOTS), before any layer stays resident; fewer, down to 2, on a budget too
    small; 2 when the shards are read through the page cache.

Loader threads read the streamed units ahead while the current one computes: each free slot takes
the next streamed unit as soon as it is free (after the head, the first streamed units of the next
pass), so with O_DIRECT the next unit's reads are queued behind the current one's and the disk is
never idle between units. A streamed unit is read into its slot's buffer (an arena, sources.arena:
allocated once, reused, lent to a unit until it has computed), as stored, O_DIRECT when the model
outgrows the memory; each weight is made compute-ready as soon as its bytes are in, while the rest
of the unit is still being read. What a read built is kept with the arena (packed.KeptUnit) when it
holds nothing outside it (on the CPU the kernels read the stored tensors): the next read of that
shard into that arena, the file unchanged, reads the bytes and rebuilds nothing.

Bytes read, unit loads, time spent waiting on the loader and peak memory are counted in `stats`.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from quantlite.errors import QuantliteError
from quantlite.kernels.dispatch import ACTIVATIONS, fused_kernel_live
from quantlite.kernels.prepared import compute_ready, layout_extra_nbytes, prepare
from quantlite.model_config import FINAL_NORM, LM_HEAD
from quantlite.packed import EMBEDDING_FILE, FINAL_FILE, PackedModel, layer_file
from quantlite.q8weight import Q8Weight
from quantlite.qweight import OUTLIER_FIELDS, QWeight
from quantlite.runtime import llama
from quantlite.sources.arena import IO_CHUNK_BYTES, IO_THREADS, aligned_buffer, arena_layout
from quantlite.sources.safetensors_file import SafetensorsFile
from quantlite.torch_threads import torch_threads

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
AUTO_BUDGET_FRACTION = 0.5  # memory_budget=None: half of the memory available when loading


class MemoryBudgetError(QuantliteError, ValueError):
    """The memory budget is malformed, or too small for the parts that must be in memory."""


def parse_size(text: str | int | float) -> int:
    """'1GB' -> 10**9, '512MiB' -> 2**29, 2e9 -> 2000000000. Raises MemoryBudgetError."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise MemoryBudgetError(f"memory budget must be positive, got {text}")
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise MemoryBudgetError(f"memory budget {text!r} is not a size such as 800MB, 1.5GiB or 2000000000")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).lower()])


def format_size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.2f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")


def weights_nbytes(weights: dict, prepared_on: torch.device | None = None) -> int:
    """Bytes held by a dict of tensors and QWeights, every storage counted once; with prepared_on,
    each QWeight's kernel layout on that device (kernels.prepared, cached) is counted too."""
    return sum(_storages(weights, prepared_on).values())


def _held_outside(weights: dict, arena: torch.Tensor, prepared_on: torch.device | None) -> bool:
    """Whether `weights` (as weights_nbytes counts them) hold any byte outside the arena's storage."""
    inside = arena.untyped_storage().data_ptr()
    return any(nbytes for at, nbytes in _storages(weights, prepared_on).items() if at != inside)


def _storages(weights: dict, prepared_on: torch.device | None) -> dict[int, int]:
    """{storage address: its bytes} of every tensor in `weights` (tensors, and the tensor fields of
    QWeights and Q8Weights), with prepared_on also of each QWeight's kernel layout there."""
    storages: dict[int, int] = {}
    for value in weights.values():
        tensors = [value] if isinstance(value, torch.Tensor) else [t for t in vars(value).values() if isinstance(t, torch.Tensor)]
        if isinstance(value, QWeight) and prepared_on is not None:
            tensors += [t for t in vars(prepare(value, prepared_on)).values() if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return storages


def memory_nbytes(shard: SafetensorsFile, compute_dtype: torch.dtype, names: list[str] | None = None,
                  device: torch.device = torch.device("cpu")) -> int:
    """An upper bound, from the header alone, on the bytes the tensors `names` (default: all) of a
    shard take on `device` once read as a resident unit is (SafetensorsFile.read_all) and made
    compute-ready: their stored bytes plus what `_beside_the_read` counts."""
    def wanted(name: str) -> bool:
        return names is None or any(name == n or name.startswith(n + ".") for n in names)

    stored = sum(entry.nbytes for name, entry in shard.entries.items() if wanted(name))
    return stored + _beside_the_read(shard, compute_dtype, device, wanted)


def streamed_nbytes(shard: SafetensorsFile, compute_dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> int:
    """The same bound for a streamed read of the whole shard into an arena (PackedModel.load_layer
    `into=`): the arena (sources.arena.arena_layout: the stored bytes, page-rounded) plus what
    `_beside_the_read` counts."""
    return arena_layout(shard).nbytes + _beside_the_read(shard, compute_dtype, device)


def _beside_the_read(shard: SafetensorsFile, compute_dtype: torch.dtype, device: torch.device, wanted=lambda name: True) -> int:
    """Bytes made from the `wanted` tensors of a shard outside the buffers they are read into: for
    each 4-bit weight, the all-zero row pointers of one stored without outliers (QWeight.from_dict)
    and, off the CPU, the float32 scales compute_ready decodes and what the kernel layout adds
    (kernels.prepared.layout_extra_nbytes; on the CPU the kernels read the stored tensors: nothing);
    plain floats converted to the compute dtype."""
    total = 0
    quantized = {name[: -len(".meta")] for name in shard.entries if name.endswith(".meta")}
    for name, entry in shard.entries.items():
        prefix = name.rpartition(".")[0]
        if not wanted(name):
            continue
        if name.endswith(".codes") and prefix in quantized:
            qw = _stand_in_qweight(shard, prefix + ".")
            total += 0 if prefix + ".outlier_row_ptr" in shard.entries else qw.outlier_row_ptr.numel() * 4
            if device.type != "cpu":
                ready = qw if qw.scales is not None and qw.scales.dtype == torch.float32 else replace(
                    qw, scales=torch.zeros((), dtype=torch.float32).expand(qw.codes.shape[0], qw.n_blocks), scale_codes=None,
                    scale_group_min=None, scale_group_step=None)
                total += (0 if ready is qw else ready.scales.numel() * 4) + layout_extra_nbytes(ready, device)
        elif prefix not in quantized and entry.dtype.is_floating_point and entry.dtype != compute_dtype:
            total += entry.nbytes // entry.dtype.itemsize * compute_dtype.itemsize
    return total


def _stand_in_qweight(shard: SafetensorsFile, prefix: str) -> QWeight:
    """A QWeight with the stored shapes and dtypes of the 4-bit weight `prefix` of `shard` (zeros
    broadcast: no memory), for the size rules; its K is the padded one."""
    def field(name: str) -> torch.Tensor | None:
        entry = shard.entries.get(prefix + name)
        return None if entry is None else torch.zeros((), dtype=entry.dtype).expand(entry.shape)

    codes, scales = field("codes"), field("scales") if prefix + "scales" in shard.entries else field("scale_codes")
    n, padded_k = codes.shape[0], codes.shape[1] * 2
    outliers = {name: field(name) for name in OUTLIER_FIELDS} if prefix + "outlier_row_ptr" in shard.entries else {
        "outlier_row_ptr": torch.zeros((), dtype=torch.int32).expand(n + 1), "outlier_cols": torch.zeros(0, dtype=torch.uint16),
        "outlier_vals": torch.zeros(0, dtype=torch.float16)}
    return QWeight(shape=(n, padded_k), block_size=padded_k // scales.shape[1], method="stand-in",
                   codebook=torch.zeros(16), codes=codes, scales=field("scales"), scale_codes=field("scale_codes"),
                   scale_group_min=field("scale_group_min"), scale_group_step=field("scale_group_step"), **outliers)


@dataclass(frozen=True)
class UnitSizes:
    """Bytes in memory (memory_nbytes, from the headers) of what a plan places."""
    norm: int
    layers: list[int]
    head: int
    embedding: int  # the whole table (== head when tied)
    arenas: list[int]  # the arena (sources.arena) a streamed read of each layer, then the head, needs


def unit_sizes(packed: PackedModel, dtype: torch.dtype, device: torch.device = torch.device("cpu")) -> UnitSizes:
    """Bytes in memory on `device` of the final norm, each layer, the head and the embedding table of `packed`:
    a layer or the head counts the larger of its resident read (memory_nbytes) and its streamed one
    (streamed_nbytes), since the plan decides which it gets."""
    def size(name: str, names: list[str] | None = None, streamable: bool = True) -> int:
        shard = SafetensorsFile(packed.path / name)
        return max(memory_nbytes(shard, dtype, names, device), streamed_nbytes(shard, dtype, device) if streamable else 0)

    def arena(name: str) -> int:
        return arena_layout(SafetensorsFile(packed.path / name)).nbytes

    tied = packed.config.get("tie_word_embeddings")
    embedding = size(EMBEDDING_FILE, streamable=bool(tied))
    head = embedding if tied else size(FINAL_FILE, [LM_HEAD])
    layers = [layer_file(i) for i in range(packed.num_layers)]
    return UnitSizes(norm=size(FINAL_FILE, [FINAL_NORM], streamable=False), layers=[size(name) for name in layers], head=head,
                     embedding=embedding, arenas=[arena(name) for name in layers + [EMBEDDING_FILE if tied else FINAL_FILE]])


@dataclass(frozen=True)
class Residency:
    resident_layers: int       # layers 0..R-1 stay in memory
    head_resident: bool
    embedding_resident: bool   # False: rows read on demand (or served by a resident tied head)
    slot_bytes: int            # room kept for each streamed unit in flight (0 when nothing streams)
    slots: int                 # streamed units in memory at once: the one computing and those read ahead (1 without prefetch)


# The streaming slots beyond the unit computing should hold at least this many bytes of reads ahead:
# two rounds of the O_DIRECT reader's queue (sources.arena: IO_THREADS reads of IO_CHUNK_BYTES), the
# unit being finished and the next one's first round, so the disk is never left without a queued read
# while a unit computes (docs/runtime.md "The loader").
READ_AHEAD_BYTES = 2 * IO_THREADS * IO_CHUNK_BYTES
MAX_SLOTS = 4  # the memory given to reads ahead is bounded; units smaller than a round get no more


def read_ahead_slots(slot_bytes: int, streamed_units: int, prefetch: bool, direct_io: bool) -> int:
    """Slots the plan wants for streamed units of up to `slot_bytes`: 1 without prefetch; 2 when the
    shards are read through the page cache (one loader thread copies one unit ahead, the kernel's own
    readahead keeps the disk busy); with O_DIRECT enough that the units read ahead cover
    READ_AHEAD_BYTES, at least 2 and at most MAX_SLOTS, and no more than can be in use (each of the
    `streamed_units` once, one of them twice: computing, and read for the next pass)."""
    if not prefetch:
        return 1
    if not direct_io:
        return 2
    wanted = 1 + -(-READ_AHEAD_BYTES // max(slot_bytes, 1))
    return max(2, min(wanted, MAX_SLOTS, streamed_units + 1))


def plan_residency(budget: int, fixed: int, layers: list[int], head: int, embedding: int, tied: bool,
                   prefetch: bool, direct_io: bool) -> Residency:
    """Where each unit lives under `budget` bytes (see the module docstring). `fixed`: the final norm;
    `embedding`: the table's bytes (ignored when tied: the head is the table). The slots the reads
    ahead want (read_ahead_slots) come before resident layers; fewer, down to 2, only when even
    nothing resident leaves no room for them. Raises MemoryBudgetError."""
    room = budget - fixed
    least = 2 if prefetch else 1
    if sum(layers) + head + (0 if tied else embedding) <= room:
        return Residency(len(layers), True, True, 0, least)
    best: tuple[int, Residency] | None = None
    for head_resident in (True, False):
        left = room - (head if head_resident else 0)
        for fewer in range(MAX_SLOTS):
            option = None
            for resident in range(len(layers), -1, -1):
                streamed = layers[resident:] + ([] if head_resident else [head])
                slot = max(streamed, default=0)
                slots = max(least, read_ahead_slots(slot, len(streamed), prefetch, direct_io) - fewer)
                if sum(layers[:resident]) + slots * slot <= left:
                    option = Residency(resident, head_resident, tied and head_resident, slot, slots)
                    break
            if option is not None:
                kept = sum(layers[: option.resident_layers]) + (head if head_resident else 0)
                if best is None or kept > best[0]:
                    best = (kept, option)
                break
    if best is None:
        largest = max(layers + [head])
        raise MemoryBudgetError(
            f"memory budget {format_size(budget)} is below the {format_size(fixed + least * largest)} that streaming needs: "
            f"{least} x the largest unit ({format_size(largest)}, a decoder layer or the head"
            + (", computing while the next is read)" if prefetch else ")") + " plus the final norm"
        )
    return best[1]


def peak_rss_bytes() -> int:
    """This process's peak resident set. On Linux, VmHWM of /proc/self/status: getrusage's ru_maxrss
    would also count the parent's resident set at fork time (it survives exec), so a small child of a
    big parent would report the parent's size."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


@dataclass
class StreamStats:
    bytes_read: int = 0           # bytes read from disk: shards of every unit load, embedding rows
    layer_loads: int = 0          # decoder-layer reads, resident ones counted once
    head_loads: int = 0           # reads of the head (once if resident, every pass if streamed)
    head_bytes_read: int = 0      # the head's shard bytes, summed over its loads
    embedding_rows_read: int = 0  # rows read on demand (the table on disk)
    embedding_bytes_read: int = 0  # the whole table once if resident, else the bytes of those rows
    load_seconds: float = 0.0     # loader time: read + move to device
    prepare_seconds: float = 0.0  # of which building the kernel layout (for a streamed unit: while its later weights are read)
    wait_seconds: float = 0.0     # compute time lost waiting for a unit that was not ready
    direct_io: bool = False       # streamed shards read O_DIRECT (around the page cache)
    arenas_allocated: int = 0     # buffers allocated for streamed units: the slots, unless all were lent
    most_read_ahead: int = 0      # the most streamed units requested at once and not yet computing (the prefetch depth reached)
    kept_reads: int = 0           # streamed reads that rebuilt nothing: the weights of the shard's last read into that arena (packed.KeptUnit)
    passes: int = 0               # forward passes over all layers
    resident_layers: int = 0
    streamed_layers: int = 0
    head_resident: bool = True
    embedding_resident: bool = True
    resident_bytes: int = 0       # planned bytes of the resident layers, embedding, head and norm
    slot_bytes: int = 0           # planned room of one streamed unit in flight
    layer_bytes: list[int] = field(default_factory=list)  # measured bytes of each layer, as first loaded

    def peak_memory_bytes(self, device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device)
        return peak_rss_bytes()


class StreamingLlama:
    """A packed Llama-family model (Llama, Mistral, Qwen2, Qwen3) whose decoder layers stream from disk. `model(input_ids)` -> float32 logits."""

    def __init__(self, packed, device: str | torch.device = "cpu", memory_budget=None, prefetch: bool = True,
                 dtype: torch.dtype | None = None, direct_io: bool | None = None, layers: range | None = None,
                 activations: str = "float32"):
        self.packed = packed
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise QuantliteError(f"device {device!r} asked for, but torch sees no CUDA device here")
        self.activations = _checked_activations(activations, self.device)
        # float32 on the CPU (no fast fp16 matmul there); fp16 on a GPU
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.float16)
        self.config = packed.model_config  # read and checked once, by PackedModel.open
        # the decoder layers this instance runs (all, or a pipeline stage's share: quantlite.distributed);
        # it holds the embedding only if it runs layer 0, the final norm and the head only if it runs the last
        self.layers = range(self.config.num_layers) if layers is None else layers
        if not (self.layers.step == 1 and 0 <= self.layers.start < self.layers.stop <= self.config.num_layers):
            raise QuantliteError(f"layers {self.layers} is not a non-empty run of the model's {self.config.num_layers} layers")
        self.first, self.last = self.layers.start == 0, self.layers.stop == self.config.num_layers
        self.prefetch = prefetch
        self.stats = StreamStats()
        self.memory_budget = self._budget_bytes(memory_budget)
        # where QWeights get their kernel layout built on load (None: the torch reference needs none)
        self._prepared_on = self.device if fused_kernel_live(self.device) else None
        self._tokenizer = None

        self._resident: dict[int, dict] = {}
        self._pending: dict[int, Future] = {}
        self._lent: dict[int, Arena] = {}  # streamed unit -> the arena it was read into, while it computes
        self._lock = threading.Lock()

        self.stats.direct_io = self._direct_io(direct_io)
        self.plan = self._plan()
        # the loader's torch ops are small and memory-bound: one intra-op thread (a per-thread setting
        # with OpenMP), so they neither fight the matmuls' thread team nor wait on its barrier (on 2
        # busy cores a 1536-row repeat_interleave took 40 ms with 2 threads, 0.04 ms with 1). O_DIRECT
        # reads are queued to the I/O threads (sources.arena), so a second loader thread queues the next
        # unit's reads while this unit's last ones are in flight; a buffered read is the loader's own copy
        self._loader = ThreadPoolExecutor(max_workers=min(self.plan.slots, 2 if self.stats.direct_io else 1),
                                          thread_name_prefix="quantlite-loader", initializer=torch.set_num_threads,
                                          initargs=(1,)) if prefetch else None
        # the units read on every pass, in order: layers R..L-1, then the head (num_layers) if it streams
        self._streamed = list(range(self.layers.start + self.plan.resident_layers, self.layers.stop))
        self._streamed += [] if self.plan.head_resident or not self.last else [self.config.num_layers]
        # the largest arena of a streamed unit (its slot also counts its small tensors made beside it)
        self._arenas = ArenaPool(max((self.sizes.arenas[i] for i in self._streamed), default=0), self.plan.slots, self.stats)
        self.norm = None       # (hidden,); None on a pipeline stage before the last
        self.embedding = None  # (vocab, hidden) tensor or QWeight when resident; None: rows on demand
        self.lm_head = None    # (vocab, hidden) tensor or QWeight when resident; None: streamed
        if self.last:
            final = packed.load_final()  # every tensor checked once; the head is dropped again if it streams
            self.stats.bytes_read += packed.manifest["files"][FINAL_FILE]["size"]
            self.norm = self._to_device(final[FINAL_NORM])
            if self.plan.head_resident:
                self.lm_head = self._to_device(packed.load_embedding() if self.config.tie_word_embeddings else final[LM_HEAD])
                self._count_load(self.config.num_layers, already_counted=not self.config.tie_word_embeddings)
            del final
        if self.plan.embedding_resident and self.first:
            self.embedding = self.lm_head if self.config.tie_word_embeddings and self.last else self._read_embedding()
        self.stats.resident_layers = self.plan.resident_layers
        self.stats.streamed_layers = len(self.layers) - self.plan.resident_layers
        self.stats.head_resident, self.stats.embedding_resident = self.plan.head_resident, self.embedding is not None
        self.stats.slot_bytes = self.plan.slot_bytes

    # ------------------------------------------------------------------ sizes and the plan
    def _budget_bytes(self, memory_budget) -> int:
        if memory_budget is not None:
            return parse_size(memory_budget)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * AUTO_BUDGET_FRACTION)
        import psutil

        return int(psutil.virtual_memory().available * AUTO_BUDGET_FRACTION)

    def _direct_io(self, asked: bool | None) -> bool:
        """Streamed shards are read O_DIRECT when asked, or (None) when the model on disk is larger than
        the memory available now: the page cache cannot keep it, so every pass reads from the disk
        anyway and the copy through the cache only costs CPU. A model that fits keeps the page cache
        (a second pass of a small model is then a memory copy)."""
        if asked is not None:
            return asked
        import psutil

        on_disk = sum(entry["size"] for entry in self.packed.manifest["files"].values())
        return on_disk > psutil.virtual_memory().available

    def _plan(self) -> Residency:
        """Sizes in memory from the shard headers (nothing read yet), then plan_residency."""
        self.sizes = sizes = unit_sizes(self.packed, self.dtype, self.device)
        # a pipeline stage plans only what it holds: its layers, the embedding if first, the norm and head if last
        norm, head = (sizes.norm, sizes.head) if self.last else (0, 0)
        embedding = sizes.embedding if self.first else 0
        layers = sizes.layers[self.layers.start:self.layers.stop]
        tied = self.config.tie_word_embeddings and self.first and self.last
        plan = plan_residency(self.memory_budget, norm, layers, head, embedding, tied, self.prefetch,
                              self.stats.direct_io)
        self.stats.resident_bytes = (norm + sum(layers[: plan.resident_layers]) + (head if plan.head_resident else 0)
                                     + (embedding if plan.embedding_resident and not tied else 0))
        return plan

    # ------------------------------------------------------------------ loading
    def _to_device(self, value):
        if isinstance(value, Q8Weight):  # its kernels read the stored tensors: nothing to prepare
            return value if self.device.type == "cpu" else value.to(self.device)
        if isinstance(value, QWeight):
            if self._prepared_on is not None:  # built here, on the loader thread, not in the matmul
                return compute_ready(value, self._prepared_on)
            return value if self.device.type == "cpu" else value.to(self.device)
        if value.is_floating_point():
            return value.to(self.device, self.dtype)
        return value.to(self.device)

    def _read_embedding(self):
        table = self._to_device(self.packed.load_embedding())
        nbytes = self.packed.manifest["files"][EMBEDDING_FILE]["size"]
        self.stats.embedding_bytes_read += nbytes
        self.stats.bytes_read += nbytes
        return table

    def _read_unit(self, index: int, arena: Arena | None = None):
        """Runs on the loader thread (or inline without prefetch): layer `index` (a dict of weights),
        or the head (index == num_layers). A streamed unit is read into `arena` (default: one taken
        now), which is lent to it until _give_back."""
        start = time.perf_counter()
        streamed = index >= self.layers.start + self.plan.resident_layers
        if self.prefetch and not self.stats.direct_io:
            self._hint_readahead(self._next_streamed(index))
        prepare_seconds = 0.0

        def prepare(value):
            nonlocal prepare_seconds
            began = time.perf_counter()
            value = self._to_device(value)
            prepare_seconds += time.perf_counter() - began
            return value

        # a streamed unit is read into a reused arena (sources.arena): no fresh pages to fault in, and
        # each quantized weight is prepared for the kernels as soon as its bytes are in, while the rest
        # is read; plain tensors (norms) are converted to the compute dtype once all is in. What the
        # read built is kept with the arena (packed.KeptUnit) when it holds nothing else: the next
        # read of the same shard into it rebuilds nothing
        name = self._unit_file(index)
        if streamed and arena is None:
            arena = self._arenas.take(name)
        kept_before = arena.kept.get(name) if streamed else None

        def quantized(value):
            return value if isinstance(value, torch.Tensor) else prepare(value)

        def plain(value):
            return prepare(value) if isinstance(value, torch.Tensor) else value

        read = {"into": arena.buffer, "direct": self.stats.direct_io, "kept": arena.kept, "prepare": quantized} if streamed else {}
        try:
            if index < self.config.num_layers:
                unit = self.packed.load_layer(index, **read)
                if not streamed:
                    # q/k/v and gate/up as one matmul each (llama.fuse_projections): a copy, paid once for a
                    # resident layer; a streamed one stays as stored (the copy would cost a layer of memory)
                    unit = {key: prepare(value) for key, value in llama.fuse_projections(unit).items()}
            elif self.config.tie_word_embeddings:
                unit = self.packed.load_embedding(**read)
            else:
                unit = self.packed.load_final(**read)[LM_HEAD]
        except BaseException:
            if streamed:
                self._arenas.give_back(arena)
            raise
        if streamed:
            kept = arena.kept.get(name)
            if kept is not None and kept is kept_before:
                with self._lock:
                    self.stats.kept_reads += 1
            elif kept is not None and _held_outside(kept.grouped, arena.buffer, self._prepared_on):
                del arena.kept[name]
            unit = {key: plain(value) for key, value in unit.items()} if isinstance(unit, dict) else plain(unit)
        with self._lock:
            self.stats.prepare_seconds += prepare_seconds
            self.stats.load_seconds += time.perf_counter() - start
        return unit, arena

    def _count_load(self, index: int, already_counted: bool = False) -> None:
        """Counters of a unit taken for compute after a read (counted when used, not when read: a
        unit prefetched for a pass that never comes is not counted)."""
        nbytes = self.packed.manifest["files"][self._unit_file(index)]["size"]
        if index < self.config.num_layers:
            self.stats.layer_loads += 1
        else:
            self.stats.head_loads += 1
            self.stats.head_bytes_read += nbytes
        self.stats.bytes_read += 0 if already_counted else nbytes

    def _unit_file(self, index: int) -> str:
        if index < self.config.num_layers:
            return layer_file(index)
        return EMBEDDING_FILE if self.config.tie_word_embeddings else FINAL_FILE

    def _hint_readahead(self, index: int | None) -> None:
        """Ask the kernel to start reading the shard after this one into the page cache, so the disk
        keeps working while this shard is validated and prepared (CPU work). Only a hint: no memory
        of this process, and nothing happens where posix_fadvise does not exist."""
        if index is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.packed.path / self._unit_file(index), os.O_RDONLY)
        except OSError:
            return  # the read itself will report a missing shard with the packed reader's error
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def _request(self, index: int | None) -> None:
        """Start reading streamed unit `index` in the background, then the ones after it (into the
        next pass) while a slot is free; a unit already being read is passed over. No-op for None or
        with prefetch off. The arena is taken here, on the computing thread, in the order of the
        units, so that which shard lands in which arena does not depend on the loader's timing."""
        if index is None or self._loader is None:
            return
        for _ in self._streamed:
            if index not in self._pending:
                if not self._arenas.free():
                    return
                arena = self._arenas.take(self._unit_file(index))
                self._pending[index] = self._loader.submit(self._read_unit, index, arena)
                self.stats.most_read_ahead = max(self.stats.most_read_ahead, len(self._pending))
            index = self._next_streamed(index)

    def _unit(self, index: int):
        """Layer `index`'s weights or the head (index == num_layers): from memory, from the loader,
        or read now."""
        if index == self.config.num_layers and self.lm_head is not None:
            return self.lm_head
        if index in self._resident:
            return self._resident[index]
        start = time.perf_counter()
        pending = self._pending.pop(index, None)
        if pending is not None:
            unit, arena = pending.result()
        else:
            with torch_threads(1):  # as on the loader threads (their initializer; quantlite.torch_threads says why)
                unit, arena = self._read_unit(index)
        self.stats.wait_seconds += time.perf_counter() - start
        if arena is not None:
            self._lent[index] = arena  # until _give_back(index)
        self._count_load(index)
        if index < self.config.num_layers:
            if len(self.stats.layer_bytes) <= index - self.layers.start:  # first pass: the layer's measured size in memory
                self.stats.layer_bytes.append(weights_nbytes(unit, self._prepared_on))
            if index < self.layers.start + self.plan.resident_layers:
                self._resident[index] = unit
        return unit

    def _give_back(self, index: int) -> None:
        """Unit `index` has computed: its arena takes the next streamed unit not yet being read."""
        arena = self._lent.pop(index, None)
        if arena is not None:
            self._arenas.give_back(arena)
            self._request(self._next_streamed(index))

    def _next_streamed(self, index: int) -> int | None:
        """The first streamed unit after `index` (-1: before the pass); after the last one, the first
        of the next pass. None when nothing streams."""
        if not self._streamed:  # all resident: asked twice a layer, every step
            return None
        return next((unit for unit in self._streamed if unit > index), self._streamed[0])

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (batch, seq) -> (batch, seq, hidden): from the resident table, or from the rows
        of these tokens read now."""
        if self.embedding is not None:
            return llama.embed(input_ids, self.embedding, self.dtype)
        rows, inverse = torch.unique(input_ids.reshape(-1).cpu(), return_inverse=True)
        table = self.packed.load_embedding_rows(rows)  # (len(rows), hidden)
        nbytes = table.nbytes
        self.stats.embedding_rows_read += len(rows)
        self.stats.embedding_bytes_read += nbytes
        self.stats.bytes_read += nbytes
        return llama.embed(inverse.reshape(input_ids.shape).to(self.device), self._to_device(table), self.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: llama.KVCache | None = None,
        last_only: bool = False,
        hidden: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (batch, seq) int64 -> float32 logits (batch, seq or 1, vocab).

        positions (batch, seq) int64: RoPE positions (default 0..seq-1). key_valid (batch, T) bool:
        which cached-plus-new positions are real tokens (None: all). cache: filled and advanced.
        last_only: logits of the last position only (generation needs no others).
        A pipeline stage (layers=): a later one takes the previous stage's output as `hidden`
        (batch, seq, hidden) instead of input_ids; one before the last returns (batch, seq, hidden).
        With activations="int8" the 4-bit layers' matmuls run ql_cpu_qmatmul_q8act at every M."""
        if self.activations == "float32":
            return self._forward(input_ids, positions, key_valid, cache, last_only, hidden)
        from quantlite.kernels import native

        with native.activations(self.activations):
            return self._forward(input_ids, positions, key_valid, cache, last_only, hidden)

    def _forward(self, input_ids, positions, key_valid, cache, last_only, hidden) -> torch.Tensor:
        batch, seq = (input_ids if hidden is None else hidden).shape[:2]
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + seq, device=self.device).expand(batch, seq)
        cos, sin = llama.rope_cos_sin(self.config, positions.to(self.device), self.dtype)
        mask = None
        past = cache.length if cache is not None else 0
        if key_valid is not None or (past > 0 and seq > 1) or llama.needs_mask(self.config, past + seq):
            if key_valid is None:
                key_valid = torch.ones(batch, past + seq, dtype=torch.bool)
            mask = llama.attention_mask(key_valid.to(self.device), seq, self.dtype, self.config.sliding_window)

        self._request(self._next_streamed(-1))  # the first streamed unit loads while resident ones run
        x = self._embed(input_ids.to(self.device)) if hidden is None else hidden.to(self.device, self.dtype)  # (batch, seq, hidden)
        resident = [self._resident.get(index) for index in self.layers]
        if not self._streamed and None not in resident:  # one call for every layer (a CPU decode step: one native call)
            x = llama.decoder_layers(x, resident, self.config, cos, sin, mask, cache, self.layers.start)
        else:
            for index in self.layers:
                weights = self._unit(index)
                self._request(self._next_streamed(index))
                try:
                    x = llama.decoder_layers(x, [weights], self.config, cos, sin, mask, cache, index)
                finally:
                    del weights
                    self._give_back(index)  # a streamed layer's arena is free for the next read
        if cache is not None:
            cache.advance(seq)
        self.stats.passes += 1
        if not self.last:
            return x
        if last_only:
            x = x[:, -1:]
        x = llama.rms_norm(x, self.norm, self.config.rms_norm_eps)
        head = self._unit(self.config.num_layers)  # (vocab, hidden), resident or streamed
        self._request(self._next_streamed(self.config.num_layers))  # the next pass's first streamed unit
        try:
            return llama.linear(x, head).float()
        finally:
            del head
            self._give_back(self.config.num_layers)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (batch, seq) int64 -> float32 logits (batch, seq, vocab); a full forward, no cache.
        attention_mask (batch, seq), 1 = token, 0 = padding (left padding), as in transformers."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise QuantliteError(f"input_ids must be (batch, seq) integer token ids, got {tuple(input_ids.shape)} {input_ids.dtype}")
        input_ids = input_ids.long()
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= self.config.vocab_size):
            raise QuantliteError(f"token ids must be in [0, {self.config.vocab_size}), got {int(input_ids.min())}..{int(input_ids.max())}")
        if attention_mask is None:
            return self.forward(input_ids)
        valid = attention_mask.bool()
        positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        return self.forward(input_ids, positions=positions, key_valid=valid)

    def new_cache(self, batch: int, max_len: int) -> llama.KVCache:
        return llama.KVCache(self.config, batch, max_len, self.dtype, self.device)

    # ------------------------------------------------------------------ generation and text
    @property
    def tokenizer(self):
        """The model's tokenizer (quantlite.runtime.generate.Tokenizer), read on first use."""
        if self._tokenizer is None:
            from quantlite.runtime.generate import Tokenizer

            self._tokenizer = Tokenizer(self.packed.tokenizer_dir)
        return self._tokenizer

    def generate(self, prompts, max_new_tokens: int = 128, **options):
        """See quantlite.runtime.generate.generate: prompts are strings or lists of token ids."""
        from quantlite.runtime.generate import generate

        return generate(self, prompts, max_new_tokens=max_new_tokens, **options)

    def peak_memory_bytes(self) -> int:
        return self.stats.peak_memory_bytes(self.device)

    def decode_reads(self) -> dict:
        """Counters to diff around a step: how many layers, heads and embedding rows were read."""
        s = self.stats
        return {"layers": s.layer_loads, "heads": s.head_loads, "head_bytes": s.head_bytes_read,
                "embedding_rows": s.embedding_rows_read, "embedding_bytes": s.embedding_bytes_read, "bytes": s.bytes_read}

    def close(self) -> None:
        """Stop the loader thread and drop every layer held."""
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None
        self._pending.clear()
        self._lent.clear()
        self._resident.clear()
        self._arenas.clear()

    def __enter__(self) -> "StreamingLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(eq=False)
class Arena:
    """One slot's buffer, and the units last read into it (packed.KeptUnit, by shard name)."""
    buffer: torch.Tensor  # (nbytes,) uint8, page-aligned (sources.arena.aligned_buffer)
    kept: dict = field(default_factory=dict)
    lent: bool = False
    taken_at: int = 0  # ArenaPool's count of takes when this one was last taken


class ArenaPool:
    """The buffers streamed units are read into: `count` of `nbytes` (the plan's slots), allocated on
    first use. `take` lends one out until `give_back`: the unit read into it is in use until then
    (the runtime gives it back once the layer or head has computed). Of the free arenas it takes one
    that keeps the shard about to be read (the read then rebuilds nothing), else the one taken least
    recently, so that the units of a pass alternate between the slots whatever the timing of the
    give-backs, and each shard meets its keeper again on the next pass. With every slot lent, a
    fresh buffer is made (counted in stats.arenas_allocated) and not kept."""

    def __init__(self, nbytes: int, count: int, stats: StreamStats):
        self.nbytes, self.count, self.stats = nbytes, count, stats
        self._arenas: list[Arena] = []
        self._takes = 0

    def free(self) -> int:
        """How many of the `count` slots are not lent (allocated or not yet)."""
        return self.count - sum(arena.lent for arena in self._arenas)

    def take(self, shard: str | None = None) -> Arena:
        free = [arena for arena in self._arenas if not arena.lent]
        keepers = [arena for arena in free if shard in arena.kept]
        arena = min(keepers or free, key=lambda arena: arena.taken_at, default=None)
        if arena is None:
            arena = Arena(aligned_buffer(self.nbytes))
            self.stats.arenas_allocated += 1
            if len(self._arenas) < self.count:
                self._arenas.append(arena)
        arena.lent = True
        self._takes += 1
        arena.taken_at = self._takes
        return arena

    def give_back(self, arena: Arena) -> None:
        arena.lent = False

    def clear(self) -> None:
        self._arenas.clear()


def _checked_activations(activations: str, device: torch.device) -> str:
    """load()'s `activations`, checked: "float32" anywhere, "int8" (the CPU opt-in) on the CPU only."""
    if activations not in ACTIVATIONS:
        raise QuantliteError(f"activations {activations!r} is not one of {', '.join(map(repr, ACTIVATIONS))}")
    if activations == "int8" and device.type != "cpu":
        raise QuantliteError(f"activations='int8' is an opt-in of the CPU kernels; the model runs on {device}")
    return activations


def load(path: str | Path, device: str | torch.device = "cpu", memory_budget=None, prefetch: bool = True,
         dtype: torch.dtype | None = None, direct_io: bool | None = None, distributed: bool = False,
         activations: str = "float32", **pipeline) -> StreamingLlama:
    """Open a packed model directory (quantlite convert) for streaming inference.

    memory_budget: bytes (int) or a size string ("1GB", "800MiB") for every weight in memory at
    once: resident layers, embedding, head, and the streamed units in flight; None = half the memory
    available now. The KV cache, activations and the interpreter come on top. prefetch: read the
    next streamed unit on a background thread while this one computes. direct_io: read streamed
    shards O_DIRECT (None: when the model on disk is larger than the memory available).
    distributed: under torchrun, this rank's stage of a layer pipeline over all ranks
    (quantlite.distributed.pipeline.load, which takes the `pipeline` options: layers_per_rank,
    micro_batches, timeout); memory_budget is then this rank's.
    activations: "float32" (default) or "int8": on the CPU, the 4-bit layers multiply x quantized per
    block of 32 to int8 (ql_cpu_qmatmul_q8act; faster decode, at the perplexity cost docs/accuracy.md
    measures). Not with distributed.
    """
    if distributed or pipeline:
        from quantlite.distributed.pipeline import load as load_pipeline

        if not distributed:
            raise QuantliteError(f"{', '.join(pipeline)}: options of a distributed load (distributed=True)")
        if activations != "float32":
            raise QuantliteError("activations='int8' is not supported by a distributed (pipelined) load")
        return load_pipeline(path, device=device, memory_budget=memory_budget, prefetch=prefetch, dtype=dtype,
                             direct_io=direct_io, **pipeline)
    return StreamingLlama(PackedModel.open(path), device=device, memory_budget=memory_budget, prefetch=prefetch, dtype=dtype,
                          direct_io=direct_io, activations=activations)
