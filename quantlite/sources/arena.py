"""Reading a whole shard into one buffer the caller reuses: how a streamed unit is read on every token.

    layout = arena_layout(shard, widen, derive)    # from the header alone: where each tensor lands
    tensors = read_into_arena(shard, arena, layout, direct)
    layout.derived_view(arena, name)                # float32 room for values the caller derives from `name`

Why (measured on a 405B-shape layer, 1.58 GiB, cold, 2 busy cores; docs/runtime.md "The loader"):
  * a fresh buffer per read first faults in and zeroes every page: 2.6 s for one layer's worth,
    against 1.05 s for the disk to deliver its bytes; so the buffer (the *arena*) is allocated once per
    streaming slot and reused;
  * through the page cache the kernel copies every byte once more on the CPU that the matmuls need
    (0.94 GB/s buffered into a reused buffer against 1.62 GB/s direct); with `direct` the file is
    opened O_DIRECT, the disk's DMA fills the arena, and IO_THREADS reads of IO_CHUNK_BYTES are in
    flight at once (one at a time: 1.39 GB/s);
  * fp16 scales of 4-bit weights (`widen`) are read through a small scratch at the arena's end and
    stored as the float32 the kernels take, so the stored copy is never held;
  * `derive` reserves a float32 region the shape of a stored tensor, for values the caller computes
    from it (double-quantized scales decoded: 0.36 s per 405B MLP matrix into fresh memory, 0.12 s
    into memory already faulted in).

Layout, in file order: maximal runs of tensors kept as stored ("pieces", each widened to whole
`align` units on both sides so that O_DIRECT may read it: offset, length and address), then each
widened tensor's float32 region, then the derived regions, then the scratch. A tensor of a piece sits at the same offset
modulo `align` as in the file, so its dtype's alignment is the file's.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from quantlite.errors import FormatError
from quantlite.sources.safetensors_file import SafetensorsFile, tensor_in_buffer

PAGE = 4096  # O_DIRECT alignment of offsets, lengths and addresses (a multiple of any logical block size in use)
IO_CHUNK_BYTES = 8 << 20  # one positioned read; also the widening scratch
IO_THREADS = 8  # reads in flight (direct only: buffered reads keep the kernel's own readahead)

_io_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class Piece:
    names: tuple[str, ...]  # tensors in file order (one when widened)
    file_begin: int         # absolute file offset of the first byte read, a multiple of align
    file_end: int           # absolute end of the read, a multiple of align (may pass the file's end)
    at: int                 # arena offset of file_begin (a piece), or of the float32 values (widened)
    widen: bool


@dataclass(frozen=True)
class ArenaLayout:
    pieces: tuple[Piece, ...]
    derived: dict[str, int]  # stored tensor name -> arena offset of its derived float32 region
    scratch_at: int  # arena offset of the widening scratch (IO_CHUNK_BYTES + 2 x align, when any tensor widens)
    nbytes: int      # the arena's size
    align: int
    shapes: dict[str, tuple[int, ...]]  # of the derived regions

    def derived_view(self, arena: torch.Tensor, name: str) -> torch.Tensor:
        """The float32 region reserved for `name` (its stored shape), uninitialised."""
        at, shape = self.derived[name], self.shapes[name]
        return arena[at : at + math.prod(shape) * 4].view(torch.float32).reshape(shape)


def arena_layout(shard: SafetensorsFile, widen: frozenset[str], derive: frozenset[str] = frozenset(), align: int = PAGE) -> ArenaLayout:
    """Where each tensor of `shard` lands in an arena; `widen`: names stored as float16 that the arena
    holds as float32; `derive`: names (read as stored) that get a float32 region of their shape too."""
    def down(n: int) -> int:
        return n - n % align

    def up(n: int) -> int:
        return -(-n // align) * align

    pieces: list[Piece] = []
    run: list[str] = []
    at = 0

    def close_run() -> None:
        nonlocal at
        if run:
            begin, end = down(shard.data_start + shard.entries[run[0]].begin), up(shard.data_start + shard.entries[run[-1]].end)
            pieces.append(Piece(tuple(run), begin, end, at, widen=False))
            at += end - begin
            run.clear()

    widest = 0
    for name in sorted(shard.entries, key=lambda n: shard.entries[n].begin):
        entry = shard.entries[name]
        if entry.nbytes == 0:
            continue
        if name in widen:
            close_run()
            begin, end = shard.data_start + entry.begin, shard.data_start + entry.end
            pieces.append(Piece((name,), begin, end, at, widen=True))
            at += up(entry.nbytes // entry.dtype.itemsize * 4)
            widest = max(widest, entry.nbytes)
        else:
            run.append(name)
    close_run()
    derived, shapes = {}, {}
    for name in sorted(derive):
        derived[name], shapes[name] = at, shard.entries[name].shape
        at += up(math.prod(shapes[name]) * 4)
    scratch = min(IO_CHUNK_BYTES, up(widest)) + 2 * align if widest else 0
    return ArenaLayout(tuple(pieces), derived, at, at + scratch, align, shapes)


def aligned_buffer(nbytes: int, align: int = PAGE) -> torch.Tensor:
    """(nbytes,) uint8 whose address is a multiple of `align`: anonymous memory from mmap (page
    aligned), advised as transparent huge pages where the kernel offers them (512x fewer faults on
    first touch, fewer TLB misses in the matmuls that stream through it)."""
    import mmap

    memory = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            memory.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    buffer = torch.frombuffer(memory, dtype=torch.uint8)[:nbytes]  # keeps `memory` alive
    assert buffer.data_ptr() % align == 0
    return buffer


def read_into_arena(shard: SafetensorsFile, arena: torch.Tensor, layout: ArenaLayout, direct: bool) -> dict[str, torch.Tensor]:
    """{name: tensor viewing `arena`} for every tensor of `shard`, as `layout` places them; widened
    ones float32. arena: (>= layout.nbytes,) uint8 at an address that is a multiple of layout.align
    (aligned_buffer). direct: O_DIRECT where the file system allows it (else buffered reads)."""
    reading = ArenaRead(shard, arena, layout, direct)
    reading.finish()
    return reading.views()


class ArenaRead:
    """A read into an arena, started on construction: `views()` are the tensors (as read_into_arena's;
    a caller that already holds views of an earlier read of the same shard into the same arena needs
    none), `wait(names)` returns once those tensors' bytes have landed (so a caller can check and
    prepare the first weights while the disk delivers the rest), `finish()` once all have and closes
    the file. With O_DIRECT the reads run on IO_THREADS threads; buffered ones are done on construction."""

    def __init__(self, shard: SafetensorsFile, arena: torch.Tensor, layout: ArenaLayout, direct: bool):
        if arena.numel() < layout.nbytes or arena.data_ptr() % layout.align:
            raise ValueError(f"arena of {arena.numel()} bytes at {arena.data_ptr():#x}: needs {layout.nbytes}, aligned to {layout.align}")
        self.shard, self._arena, self._layout = shard, arena, layout
        self._fd, direct = _open(shard, direct and layout.align % PAGE == 0)
        self._chunks: list[tuple[int, int, Future]] = []  # (file begin, end, read) in file order
        try:
            if direct:
                pool, step = _pool(), max(layout.align, IO_CHUNK_BYTES - IO_CHUNK_BYTES % layout.align)
                for piece in (p for p in layout.pieces if not p.widen):
                    for begin in range(piece.file_begin, piece.file_end, step):
                        end = min(begin + step, piece.file_end)
                        target = arena[piece.at + begin - piece.file_begin : piece.at + end - piece.file_begin]
                        self._chunks.append((begin, end, pool.submit(_read_range, shard, self._fd, target, begin, piece.names[0])))
            else:
                for piece in (p for p in layout.pieces if not p.widen):
                    _read_range(shard, self._fd, arena[piece.at : piece.at + piece.file_end - piece.file_begin], piece.file_begin,
                                piece.names[0])
            scratch = arena[layout.scratch_at : layout.nbytes]
            for piece in (p for p in layout.pieces if p.widen):  # meanwhile, on this thread
                _read_widened(shard, self._fd, arena, scratch, piece, layout.align)
        except BaseException:
            self.finish(raising=False)
            raise

    def views(self) -> dict[str, torch.Tensor]:
        """{name: tensor viewing the arena} for every tensor of the shard (see read_into_arena)."""
        if any((self.shard.data_start + entry.begin) % entry.dtype.itemsize for entry in self.shard.entries.values()):
            self.wait(self.shard.entries)  # a misaligned tensor is copied out (tensor_in_buffer): once it is there
        return _views(self.shard, self._arena, self._layout)

    def wait(self, names) -> None:
        """Block until the bytes of the tensors `names` are in the arena (a read's error raised here)."""
        spans = [(self.shard.data_start + self.shard.entries[n].begin, self.shard.data_start + self.shard.entries[n].end) for n in names]
        for begin, end, future in self._chunks:
            if any(begin < span_end and span_begin < end for span_begin, span_end in spans):
                future.result()

    def finish(self, raising: bool = True) -> None:
        """Wait for every read, then close the file (idempotent)."""
        if self._fd is None:
            return
        try:
            for _, _, future in self._chunks:
                if raising:
                    future.result()
                else:
                    future.exception()
        finally:
            os.close(self._fd)
            self._fd = None


def _views(shard: SafetensorsFile, arena: torch.Tensor, layout: ArenaLayout) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for piece in layout.pieces:
        if piece.widen:
            entry = shard.entries[piece.names[0]]
            numel = entry.nbytes // entry.dtype.itemsize
            out[piece.names[0]] = arena[piece.at : piece.at + numel * 4].view(torch.float32).reshape(entry.shape)
            continue
        region = arena[piece.at : piece.at + piece.file_end - piece.file_begin]
        for name in piece.names:
            out[name] = tensor_in_buffer(region, shard.entries[name], piece.file_begin - shard.data_start)
    for name, entry in shard.entries.items():
        if name not in out:  # zero-size tensors
            out[name] = torch.empty(entry.shape, dtype=entry.dtype)
    return out


def _pool() -> ThreadPoolExecutor:
    global _io_pool
    if _io_pool is None:
        _io_pool = ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="quantlite-io")
    return _io_pool


def _open(shard: SafetensorsFile, direct: bool) -> tuple[int, bool]:
    """(fd, whether it is O_DIRECT): the file whose header `shard` checked. A file system that refuses
    O_DIRECT (tmpfs, or a platform without it) is read through the page cache instead."""
    if direct and hasattr(os, "O_DIRECT"):
        try:
            return shard.open_unchanged(os.O_DIRECT), True
        except FormatError as error:
            if not isinstance(error.__cause__, OSError):
                raise
    return shard.open_unchanged(), False


def _read_range(shard: SafetensorsFile, fd: int, target: torch.Tensor, offset: int, first: str) -> None:
    """Fill `target` (uint8) from file offset `offset`; bytes past the file's end are left as they are."""
    shard.read_into(fd, target, offset, first, need=min(target.numel(), shard.file_size - offset))


def _read_widened(shard: SafetensorsFile, fd: int, arena: torch.Tensor, scratch: torch.Tensor, piece: Piece, align: int) -> None:
    """The stored float16/bfloat16 tensor of a widened piece, read a scratch-full at a time (whole
    `align` units around each chunk) and written as float32 at piece.at."""
    entry = shard.entries[piece.names[0]]
    itemsize, numel = entry.dtype.itemsize, entry.nbytes // entry.dtype.itemsize
    values = arena[piece.at : piece.at + numel * 4].view(torch.float32)
    per_chunk = (scratch.numel() - 2 * align) // itemsize
    for first in range(0, numel, per_chunk):
        last = min(first + per_chunk, numel)
        begin, end = piece.file_begin + first * itemsize, piece.file_begin + last * itemsize
        read_begin = begin - begin % align
        read_end = -(-end // align) * align
        _read_range(shard, fd, scratch[: read_end - read_begin], read_begin, piece.names[0])
        stored = scratch[begin - read_begin : end - read_begin]
        if (begin - read_begin) % itemsize:
            stored = stored.clone()  # misaligned for its dtype in the file
        values[first:last].copy_(stored.view(entry.dtype))
