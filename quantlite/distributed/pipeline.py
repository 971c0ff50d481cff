"""A layer pipeline over torch.distributed: each rank runs a contiguous run of decoder layers.

    load(path, ...) -> PipelineLlama        every rank, under torchrun (quantlite.load(..., distributed=True))

Rank r owns the layers split.py gives it, as a StreamingLlama restricted to them (`layers=`), under
its own memory budget: resident when they fit, streamed as on one machine when they do not. Rank 0
also holds the embedding, the last rank the final norm and the head. The ranks form a ring:

    last rank (the driver)  --ids-->  rank 0  --hidden-->  rank 1  --hidden--> ... --hidden-->  last rank
    runs generate()/perplexity()      embed, its layers     its layers                      its layers, norm, head, sampling

The driver runs the ordinary single-process code (quantlite.runtime.generate.generate,
quantlite.eval.ppl.perplexity) with this object as the model; each of its forward calls sends the
token ids round the ring and finishes the pass itself. The other ranks serve: they take each message
from the rank before, run their layers and pass the result on (`serve`), until the driver says stop;
then the driver's result is broadcast, so `generate` returns the same tokens on every rank.

Micro-batches. A forward call over several sequences with more than one position (prefill, a
perplexity batch) is cut into up to `micro_batches` runs of rows (default: one per rank); the
driver sends them all at once, so rank 0 works on the second while rank 1 works on the first.
With M micro-batches and N ranks a call takes M + N - 1 stage-steps instead of M x N. A decode
step (one position) is not cut: every micro-batch reads each weight again, and a decode step is
bound by those reads, so a cut step would cost M reads for one step's work.

Exactness: every rank runs the single-process code on the same tensors (float32 on the CPU), so
one micro-batch gives bit-identical logits; a cut call changes the rows per matmul, which may change
the summation order of a kernel (tests/test_distributed.py bounds the difference).

A message is a header (HEADER_FIELDS int64), then (2, batch, seq) int64 token ids and positions,
then (batch, T) uint8 key_valid when the header says so, then (batch, seq, hidden) hidden states
when the receiver is not rank 0.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch

from quantlite.distributed import group as groups
from quantlite.distributed.group import DistributedError, Group
from quantlite.distributed.split import describe, parse_counts, split_by_bytes, split_by_count
from quantlite.errors import QuantliteError
from quantlite.model_config import ModelConfig
from quantlite.runtime import llama
from quantlite.runtime.streaming import StreamingLlama, format_size, unit_sizes

# header fields, in order
OP, BATCH, SEQ, KEY_LEN, ROW_START, CACHE_START, USE_CACHE = range(7)
HEADER_FIELDS = 7
FORWARD, NEW_CACHE, STOP = 1, 2, 3  # ops; NEW_CACHE carries (batch, max_len) in (BATCH, SEQ)


class StageCache(llama.KVCache):
    """The KV cache of one stage: keys and values of its own layers only, indexed by the model's
    layer numbers. rows(start, stop, length) is a micro-batch's view: its rows of the same tensors."""

    def __init__(self, config: ModelConfig, layers: range, batch: int, max_len: int, dtype, device):
        super().__init__(dataclasses.replace(config, num_layers=len(layers)), batch, max_len, dtype, device)
        self.first_layer = layers.start

    def rows(self, start: int, stop: int, length: int) -> "StageCache":
        view = copy.copy(self)
        view.keys = [t[start:stop] for t in self.keys]  # (rows, n_kv_heads, max_len, head_dim) views
        view.values = [t[start:stop] for t in self.values]
        view.length = length
        return view


class PipelineLlama:
    """This rank's stage of a pipelined packed Llama. Call the same methods on every rank:
    `generate` and `perplexity` return the driver's result everywhere; `model(input_ids)` returns
    the logits on the last rank (`is_driver`) and None on the others."""

    def __init__(self, packed, group: Group, runs: list[range], device="cpu", memory_budget=None,
                 prefetch: bool = True, dtype: torch.dtype | None = None, direct_io: bool | None = None,
                 micro_batches: int | None = None):
        if micro_batches is not None and micro_batches < 1:
            raise DistributedError(f"micro_batches must be a positive integer, got {micro_batches!r}")
        self.group, self.runs = group, runs
        self.rank, self.driver = group.rank, group.world - 1
        self.is_driver = self.rank == self.driver
        self.prev, self.next = (self.rank - 1) % group.world, (self.rank + 1) % group.world
        self.micro_batches = micro_batches or group.world
        self.stage = StreamingLlama(packed, device=device, memory_budget=memory_budget, prefetch=prefetch, dtype=dtype,
                                    direct_io=direct_io, layers=runs[self.rank])
        self._cache: StageCache | None = None  # a serving rank's cache of the current generation
        self._driving = False

    # ------------------------------------------------------------------ what generate() and perplexity() read
    packed = property(lambda self: self.stage.packed)
    config = property(lambda self: self.stage.config)
    device = property(lambda self: self.stage.device)
    dtype = property(lambda self: self.stage.dtype)
    lm_head = property(lambda self: self.stage.lm_head)
    stats = property(lambda self: self.stage.stats)
    memory_budget = property(lambda self: self.stage.memory_budget)
    tokenizer = property(lambda self: self.stage.tokenizer)

    def peak_memory_bytes(self) -> int:
        return self.stage.peak_memory_bytes()

    # ------------------------------------------------------------------ every rank
    def drive(self, function, *args, share: bool = True, **kwargs):
        """The driver calls function(*args, **kwargs), whose forward calls run through the pipeline,
        while the other ranks serve; returns its result on every rank (share=False: None elsewhere).
        An error on the driver is raised on every rank."""
        if not self.is_driver:
            self.serve()
            outcome = groups.broadcast(self.group, None, self.driver) if share else ("ok", None)
            if share and outcome[0] == "error":
                raise outcome[1]
            return outcome[1]
        self._driving = True
        try:
            result = function(*args, **kwargs)
        except QuantliteError as error:
            self._stop()
            if share:
                groups.broadcast(self.group, ("error", error), self.driver)
            raise
        except BaseException as error:
            self._stop()
            if share:
                message = f"the last rank failed: {error.__class__.__name__}: {str(error)[:200]}"
                groups.broadcast(self.group, ("error", DistributedError(message)), self.driver)
            raise
        finally:
            self._driving = False
        self._stop()
        if share:
            groups.broadcast(self.group, ("ok", result), self.driver)
        return result

    def generate(self, prompts, max_new_tokens: int = 128, **options):
        """quantlite.runtime.generate.generate through the pipeline; the same result on every rank
        (on_token is called on the driver only)."""
        from quantlite.runtime.generate import generate

        return self.drive(generate, self, prompts, max_new_tokens=max_new_tokens, **options)

    def perplexity(self, token_ids: torch.Tensor, **options):
        """quantlite.eval.ppl.perplexity through the pipeline; the same result on every rank. Give
        batch_size >= the number of ranks so that micro-batches keep every rank busy."""
        from quantlite.eval.ppl import perplexity

        return self.drive(perplexity, self, token_ids, **options)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """As StreamingLlama's: (batch, seq) ids -> (batch, seq, vocab) float32 logits on the driver;
        on the other ranks None (they run their layers for it)."""
        if self._driving:
            return StreamingLlama.__call__(self, input_ids, attention_mask)  # checks and masks, then self.forward
        return self.drive(StreamingLlama.__call__, self, input_ids, attention_mask, share=False)

    def stage_reports(self) -> list[dict]:
        """Every rank's layers, residency and reads (all_gather: call it on every rank)."""
        s = self.stage.stats
        mine = {"rank": self.rank, "layers": describe([self.runs[self.rank]]).split(": ", 1)[1],
                "resident_layers": s.resident_layers, "streamed_layers": s.streamed_layers,
                "layer_loads": s.layer_loads, "bytes_read": s.bytes_read, "passes": s.passes,
                "peak_memory": self.stage.peak_memory_bytes(), "budget": self.stage.memory_budget}
        gathered: list = [None] * self.group.world
        import torch.distributed as dist

        with groups.bounded(self.group, "gathering the ranks' figures"):
            dist.all_gather_object(gathered, mine)
        return gathered

    # ------------------------------------------------------------------ the driver
    def new_cache(self, batch: int, max_len: int) -> StageCache:
        """The driver's cache for its layers; every other rank makes its own (a NEW_CACHE message)."""
        self._check_driver()
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64)
        header[OP], header[BATCH], header[SEQ] = NEW_CACHE, batch, max_len
        groups.finish(self.group, groups.send(self.group, header, self.next), self.next)
        return StageCache(self.config, self.runs[self.rank], batch, max_len, self.dtype, self.device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, key_valid: torch.Tensor | None = None,
                cache: StageCache | None = None, last_only: bool = False) -> torch.Tensor:
        """As StreamingLlama.forward, through the ring: input_ids (batch, seq) int64 -> float32 logits
        (batch, seq or 1, vocab). Driver only."""
        self._check_driver()
        batch, seq = input_ids.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + seq).expand(batch, seq)
        runs = self._row_runs(batch, seq)
        sent = []
        for run in runs:  # all at once: rank 0 starts the next while the next rank takes this one
            header = torch.tensor([FORWARD, len(run), seq, 0 if key_valid is None else key_valid.shape[1], run.start, start,
                                   cache is not None], dtype=torch.int64)
            sent += self._send(header, input_ids[run.start:run.stop], positions[run.start:run.stop],
                               None if key_valid is None else key_valid[run.start:run.stop], None)
        logits = []
        for run in runs:
            header, _, run_positions, run_valid, hidden = self._receive()
            view = cache.rows(run.start, run.stop, start) if cache is not None else None
            logits.append(self.stage.forward(None, run_positions, run_valid, view, last_only, hidden=hidden))
        for item in sent:
            groups.finish(self.group, item, self.next)
        if cache is not None:
            cache.advance(seq)
        return torch.cat(logits)

    def _row_runs(self, batch: int, seq: int) -> list[range]:
        """The micro-batches of a call: runs of rows (the whole batch for a decode step, see above)."""
        count = 1 if seq == 1 else min(self.micro_batches, batch)
        bounds = [batch * i // count for i in range(count + 1)]
        return [range(a, b) for a, b in zip(bounds, bounds[1:])]

    def _stop(self) -> None:
        header = torch.zeros(HEADER_FIELDS, dtype=torch.int64)
        header[OP] = STOP
        groups.finish(self.group, groups.send(self.group, header, self.next), self.next)

    def _check_driver(self) -> None:
        if not self.is_driver:
            raise DistributedError(f"rank {self.rank}: only the last rank runs forward passes; call generate, "
                                   "perplexity or the model itself on every rank")

    # ------------------------------------------------------------------ the other ranks
    @torch.inference_mode()
    def serve(self) -> None:
        """Run this stage for each message from the rank before, passing results on, until STOP."""
        pending: list = []
        while True:
            header, ids, positions, key_valid, hidden = self._receive()
            op = int(header[OP])
            if op == FORWARD:
                view = None
                if int(header[USE_CACHE]):
                    if self._cache is None:
                        raise DistributedError(f"rank {self.rank}: a cached forward pass came before any cache")
                    start = int(header[ROW_START])
                    view = self._cache.rows(start, start + int(header[BATCH]), int(header[CACHE_START]))
                x = self.stage.forward(ids, positions, key_valid, view, hidden=hidden)  # (batch, seq, hidden)
                for item in pending:  # one message in flight at a time: its buffers are freed in order
                    groups.finish(self.group, item, self.next)
                pending = self._send(header, ids, positions, key_valid, x)
                continue
            for item in pending:
                groups.finish(self.group, item, self.next)
            pending = []
            if op == NEW_CACHE:
                self._cache = StageCache(self.config, self.runs[self.rank], int(header[BATCH]), int(header[SEQ]),
                                         self.dtype, self.device)
            elif op != STOP:
                raise DistributedError(f"rank {self.rank}: unknown message {op} from rank {self.prev}")
            if self.next != self.driver:
                groups.finish(self.group, groups.send(self.group, header, self.next), self.next)
            if op == STOP:
                self._cache = None
                return

    # ------------------------------------------------------------------ messages
    def _send(self, header, ids, positions, key_valid, hidden) -> list:
        """Start sending one message to the next rank; returns the sends to finish."""
        tensors = [header, torch.stack([ids, positions])]
        if key_valid is not None:
            tensors.append(key_valid.to(torch.uint8))
        if hidden is not None:
            tensors.append(hidden)
        return [groups.send(self.group, t, self.next) for t in tensors]

    def _receive(self):
        """One message from the rank before: (header, ids, positions, key_valid, hidden), the last
        three None when absent (a NEW_CACHE or STOP message is a header alone)."""
        header = groups.receive(self.group, (HEADER_FIELDS,), torch.int64, self.prev).cpu()
        if int(header[OP]) != FORWARD:
            return header, None, None, None, None
        batch, seq, key_len = int(header[BATCH]), int(header[SEQ]), int(header[KEY_LEN])
        ints = groups.receive(self.group, (2, batch, seq), torch.int64, self.prev)
        key_valid = groups.receive(self.group, (batch, key_len), torch.uint8, self.prev).bool() if key_len else None
        hidden = None
        if self.rank != 0:
            hidden = groups.receive(self.group, (batch, seq, self.config.hidden_size), self.dtype, self.prev)
        return header, ints[0], ints[1], key_valid, hidden

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        self.stage.close()

    def __enter__(self) -> "PipelineLlama":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        if exc[0] is None:
            groups.leave()


def load(path: str | Path, device: str | torch.device = "cpu", memory_budget=None, prefetch: bool = True,
         dtype: torch.dtype | None = None, direct_io: bool | None = None, layers_per_rank: str | list[int] | None = None,
         micro_batches: int | None = None, timeout: float = groups.DEFAULT_TIMEOUT_SECONDS) -> PipelineLlama:
    """This rank's stage of the packed model at `path` (call on every rank of a torchrun launch).

    memory_budget: this rank's budget, as quantlite.load's. layers_per_rank: "10,10,12" or [10, 10,
    12] (default: split by bytes, split.py). micro_batches: runs of rows per multi-position forward
    call (default: the number of ranks). timeout: seconds any wait on another rank may take.
    Every rank must see the same packed model (sha256 of quantlite.json) and split; else
    DistributedError on every rank, before any layer is read."""
    from quantlite.packed import PackedModel

    device = torch.device(device)
    group = groups.join(device, timeout)
    try:
        packed, problem = PackedModel.open(path), None
        digest = groups.manifest_digest(path)[:16]
    except QuantliteError as error:  # reported to every rank below, so none waits for this one
        packed, digest, problem = None, f"unusable ({error})", error
    groups.same_everywhere(group, f"the packed model (sha256 of {path}/quantlite.json)", digest)
    if problem is not None:
        raise problem
    dtype = dtype or (torch.float32 if device.type == "cpu" else torch.float16)  # StreamingLlama's default
    if layers_per_rank is not None:
        counts = parse_counts(layers_per_rank) if isinstance(layers_per_rank, str) else list(layers_per_rank)
        runs = split_by_count(counts, group.world, packed.num_layers)
    else:
        sizes = unit_sizes(packed, dtype)
        runs = split_by_bytes(sizes.layers, group.world, first_extra=sizes.embedding, last_extra=sizes.norm + sizes.head)
    groups.same_everywhere(group, "the layer split", describe(runs))
    return PipelineLlama(packed, group, runs, device=device, memory_budget=memory_budget, prefetch=prefetch, dtype=dtype,
                         direct_io=direct_io, micro_batches=micro_batches)


def format_reports(reports: list[dict]) -> str:
    """One line per rank of stage_reports(): its layers, where they live, what it read."""
    return "\n".join(
        f"rank {r['rank']} ({r['layers']}): {r['resident_layers']} resident, {r['streamed_layers']} streamed "
        f"(budget {format_size(r['budget'])}); {r['layer_loads']} layer loads in {r['passes']} passes, "
        f"{format_size(r['bytes_read'])} read; peak {format_size(r['peak_memory'])}"
        for r in reports)
