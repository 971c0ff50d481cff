"""Where the weights live: a Llama run one decoder layer at a time from a packed directory.

    load(path, device, memory_budget, prefetch) -> StreamingLlama

A forward pass walks the layers in order. Layers 0..R-1 are *resident*: read once, then kept on the
device. Layers R..L-1 are *streamed*: read from their shard, moved to the device, run, dropped.
R is the largest count whose bytes fit the memory budget next to the embedding, the final norm and
head, and one slot for the layer being prefetched (no slot needed when every layer fits: then a second
pass reads nothing from disk).

A single loader thread reads the next streamed layer while the current layer computes, for 4-bit
shards too; one read is in flight at a time so at most two streamed layers are in memory. At the
start of each pass it begins reading layer R while the resident layers compute.

Bytes read, layer loads, time spent waiting on the loader and peak memory are counted in `stats`.
"""
from __future__ import annotations

import os
import re
import resource
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from quantlite.errors import QuantliteError
from quantlite.kernels.prepared import prepare
from quantlite.packed import EMBEDDING_FILE, FINAL_FILE, PackedModel, layer_file
from quantlite.q8weight import Q8Weight
from quantlite.qweight import QWeight
from quantlite.runtime import llama

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
AUTO_BUDGET_FRACTION = 0.5  # memory_budget=None: half of the memory available when loading


class MemoryBudgetError(QuantliteError, ValueError):
    """The memory budget is malformed, or too small for the parts that must stay in memory."""


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
    storages: dict[int, int] = {}
    for value in weights.values():
        tensors = [value] if isinstance(value, torch.Tensor) else list(value.to_dict().values())
        if isinstance(value, QWeight) and prepared_on is not None:
            tensors += [t for t in vars(prepare(value, prepared_on)).values() if isinstance(t, torch.Tensor)]
        for tensor in tensors:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


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
    bytes_read: int = 0           # shard bytes read from disk (layer_nbytes of every load, embedding, head)
    layer_loads: int = 0          # decoder-layer reads, resident ones counted once
    load_seconds: float = 0.0     # loader time: read + move to device
    wait_seconds: float = 0.0     # compute time lost waiting for a layer that was not ready
    passes: int = 0               # forward passes over all layers
    resident_layers: int = 0
    streamed_layers: int = 0
    resident_bytes: int = 0       # device bytes of the resident layers, embedding and head
    layer_bytes: list[int] = field(default_factory=list)  # device bytes of each layer, as first loaded

    def peak_memory_bytes(self, device: torch.device) -> int:
        if device.type == "cuda":
            return torch.cuda.max_memory_allocated(device)
        return peak_rss_bytes()


class StreamingLlama:
    """A packed Llama whose decoder layers stream from disk. `model(input_ids)` -> float32 logits."""

    def __init__(self, packed, device: str | torch.device = "cpu", memory_budget=None, prefetch: bool = True,
                 dtype: torch.dtype | None = None):
        self.packed = packed
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise QuantliteError(f"device {device!r} asked for, but torch sees no CUDA device here")
        # float32 on the CPU (no fast fp16 matmul there); fp16 on a GPU
        self.dtype = dtype or (torch.float32 if self.device.type == "cpu" else torch.float16)
        self.config = llama.config_from_hf(packed.config)
        if packed.num_layers != self.config.num_layers:
            raise QuantliteError(f"{packed.path}: {packed.num_layers} layer shards, config says {self.config.num_layers}")
        self.prefetch = prefetch
        self.stats = StreamStats()
        self.memory_budget = self._budget_bytes(memory_budget)
        # where QWeights get their kernel layout built on load (None: the torch reference needs none)
        self._prepared_on = self.device if _fused_kernels_live(self.device) else None
        self._tokenizer = None

        self.embedding = self._to_device(packed.load_embedding())  # (vocab, hidden) tensor or QWeight
        final = packed.load_final()
        self.norm = self._to_device(final["model.norm.weight"])    # (hidden,)
        self.lm_head = self.embedding if self.config.tie_word_embeddings else self._to_device(final["lm_head.weight"])
        # a tied head is the embedding's own storage, counted once
        self._fixed_bytes = weights_nbytes({"e": self.embedding, "n": self.norm, "h": self.lm_head}, self._prepared_on)
        self.stats.bytes_read += sum(packed.manifest["files"][name]["size"] for name in (EMBEDDING_FILE, FINAL_FILE))
        if self._fixed_bytes > self.memory_budget:
            raise MemoryBudgetError(
                f"memory budget {format_size(self.memory_budget)} is below the {format_size(self._fixed_bytes)} "
                "that the embedding, final norm and head need in memory"
            )
        self.stats.resident_bytes = self._fixed_bytes

        self._resident: dict[int, dict] = {}
        self._n_resident: int | None = None  # planned at the first layer load, when sizes are known
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quantlite-loader") if prefetch else None
        self._pending: dict[int, Future] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ sizes and the plan
    def _budget_bytes(self, memory_budget) -> int:
        if memory_budget is not None:
            return parse_size(memory_budget)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * AUTO_BUDGET_FRACTION)
        import psutil

        return int(psutil.virtual_memory().available * AUTO_BUDGET_FRACTION)

    def _plan(self, first_layer_bytes: int, first_layer_disk: int) -> int:
        """How many leading layers stay resident. Device bytes of layer i are estimated from its shard
        size at the ratio layer 0 showed (the same dtypes in every layer)."""
        ratio = first_layer_bytes / max(first_layer_disk, 1)
        sizes = [int(self.packed.layer_nbytes(i) * ratio) for i in range(self.config.num_layers)]
        room = self.memory_budget - self._fixed_bytes
        if sum(sizes) <= room:
            return self.config.num_layers
        room -= max(sizes) if self.prefetch else 0  # the slot of the layer being prefetched
        resident, used = 0, 0
        while resident < len(sizes) and used + sizes[resident] <= room:
            used += sizes[resident]
            resident += 1
        return resident

    # ------------------------------------------------------------------ loading
    def _to_device(self, value):
        if isinstance(value, Q8Weight):  # its kernels read the stored tensors: nothing to prepare
            return value if self.device.type == "cpu" else value.to(self.device)
        if isinstance(value, QWeight):
            value = value if self.device.type == "cpu" else value.to(self.device)
            if self._prepared_on is not None:  # built here, on the loader thread, not in the matmul
                prepare(value, self._prepared_on)
            return value
        if value.is_floating_point():
            return value.to(self.device, self.dtype)
        return value.to(self.device)

    def _read_layer(self, index: int) -> dict:
        """Runs on the loader thread (or inline without prefetch): read one shard, move it to the device."""
        start = time.perf_counter()
        if self.prefetch:
            self._hint_readahead(self._next_streamed(index))
        weights = {name: self._to_device(value) for name, value in self.packed.load_layer(index).items()}
        with self._lock:
            self.stats.load_seconds += time.perf_counter() - start
            self.stats.bytes_read += int(self.packed.layer_nbytes(index))
            self.stats.layer_loads += 1
        return weights

    def _hint_readahead(self, index: int | None) -> None:
        """Ask the kernel to start reading the shard after this one into the page cache, so the disk
        keeps working while this shard is validated and prepared (CPU work). Only a hint: no memory
        of this process, and nothing happens where posix_fadvise does not exist."""
        if index is None or not hasattr(os, "posix_fadvise"):
            return
        try:
            fd = os.open(self.packed.path / layer_file(index), os.O_RDONLY)
        except OSError:
            return  # the read itself will report a missing shard with the packed reader's error
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def _request(self, index: int | None) -> None:
        """Start reading a streamed layer in the background (no-op if resident, pending or off)."""
        if index is None or self._loader is None or index in self._resident or index in self._pending:
            return
        self._pending[index] = self._loader.submit(self._read_layer, index)

    def _layer(self, index: int) -> dict:
        """The weights of layer `index`, from memory, from the loader, or read now."""
        if index in self._resident:
            return self._resident[index]
        start = time.perf_counter()
        pending = self._pending.pop(index, None)
        weights = pending.result() if pending is not None else self._read_layer(index)
        self.stats.wait_seconds += time.perf_counter() - start
        if len(self.stats.layer_bytes) <= index:  # first pass: learn the layer's size in memory
            self.stats.layer_bytes.append(weights_nbytes(weights, self._prepared_on))
        if self._n_resident is None:
            self._n_resident = self._plan(self.stats.layer_bytes[index], int(self.packed.layer_nbytes(index)))
            self.stats.resident_layers = self._n_resident
            self.stats.streamed_layers = self.config.num_layers - self._n_resident
        if index < self._n_resident:
            self._resident[index] = weights
            self.stats.resident_bytes += self.stats.layer_bytes[index]
        return weights

    def _next_streamed(self, index: int) -> int | None:
        """The first layer after `index` that has to be read (None at the end of the pass)."""
        first = self._n_resident if self._n_resident is not None else 0
        nxt = max(index + 1, first)
        return nxt if nxt < self.config.num_layers else None

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        key_valid: torch.Tensor | None = None,
        cache: llama.KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (batch, seq) int64 -> float32 logits (batch, seq or 1, vocab).

        positions (batch, seq) int64: RoPE positions (default 0..seq-1). key_valid (batch, T) bool:
        which cached-plus-new positions are real tokens (None: all). cache: filled and advanced.
        last_only: logits of the last position only (generation needs no others)."""
        batch, seq = input_ids.shape
        input_ids = input_ids.to(self.device)
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + seq, device=self.device).expand(batch, seq)
        cos, sin = llama.rope_cos_sin(self.config, positions.to(self.device), self.dtype)
        mask = None
        if key_valid is not None or (cache is not None and cache.length > 0 and seq > 1):
            if key_valid is None:
                key_valid = torch.ones(batch, (cache.length if cache else 0) + seq, dtype=torch.bool)
            mask = llama.attention_mask(key_valid.to(self.device), seq, self.dtype)

        self._request(self._next_streamed(-1))  # the first streamed layer loads while resident ones run
        x = llama.embed(input_ids, self.embedding, self.dtype)  # (batch, seq, hidden)
        for index in range(self.config.num_layers):
            weights = self._layer(index)
            self._request(self._next_streamed(index))
            x = llama.decoder_layer(x, weights, self.config, cos, sin, mask, cache, index)
            del weights  # a streamed layer is freed here, before the next one is taken
        if cache is not None:
            cache.advance(seq)
        self.stats.passes += 1
        if last_only:
            x = x[:, -1:]
        x = llama.rms_norm(x, self.norm, self.config.rms_norm_eps)
        return llama.linear(x, self.lm_head).float()

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

    def close(self) -> None:
        """Stop the loader thread and drop every layer held."""
        if self._loader is not None:
            self._loader.shutdown(wait=True, cancel_futures=True)
            self._loader = None
        self._pending.clear()
        self._resident.clear()

    def __enter__(self) -> "StreamingLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fused_kernels_live(device: torch.device) -> bool:
    """Whether qmatmul will run a fused kernel on this device (they take the prepared layout; the
    torch reference does not, so preparing for it would only cost memory)."""
    from quantlite.kernels.dispatch import available_backends

    live = available_backends()
    names = ("cuda", "triton") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
    return any(live.get(name) is None for name in names)


def load(path: str | Path, device: str | torch.device = "cpu", memory_budget=None, prefetch: bool = True,
         dtype: torch.dtype | None = None) -> StreamingLlama:
    """Open a packed model directory (quantlite convert) for streaming inference.

    memory_budget: bytes (int) or a size string ("1GB", "800MiB") for the resident layers, the
    embedding and the head; None = half the memory available now. Streamed layers, the KV cache
    and activations come on top. prefetch: read the next layer on a background thread.
    """
    return StreamingLlama(PackedModel.open(path), device=device, memory_budget=memory_budget, prefetch=prefetch, dtype=dtype)
