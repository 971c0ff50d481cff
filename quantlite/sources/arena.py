"""Reading a whole shard into one buffer the caller reuses: how a streamed unit is read on every token.

    layout = arena_layout(shard)                     # from the header alone: where the bytes land
    tensors = read_into_arena(shard, arena, layout, direct)

Why (measured on a 405B-shape layer, 1.58 GiB, cold, 2 busy cores; docs/runtime.md "The loader"):
  * a fresh buffer per read first faults in and zeroes every page: 2.6 s for one layer's worth,
    against 1.05 s for the disk to deliver its bytes; so the buffer (the *arena*) is allocated once per
    streaming slot and reused;
  * through the page cache the kernel copies every byte once more on the CPU that the matmuls need
    (0.94 GB/s buffered into a reused buffer against 1.62 GB/s direct); with `direct` the file is
    opened O_DIRECT, the disk's DMA fills the arena, and IO_THREADS reads of IO_CHUNK_BYTES are in
    flight at once (one at a time: 1.39 GB/s).

Layout: the shard's data section as stored, widened to whole `align` units on both sides so that
O_DIRECT may read it (offset, length and address). A tensor sits at the same offset modulo `align`
as in the file, so its dtype's alignment is the file's. The CPU kernels read every stored tensor as
it is (kernels.prepared), so nothing is converted on the way in.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from quantlite.errors import FormatError
from quantlite.sources.safetensors_file import SafetensorsFile, tensor_in_buffer

PAGE = 4096  # O_DIRECT alignment of offsets, lengths and addresses (a multiple of any logical block size in use)
IO_CHUNK_BYTES = 8 << 20  # one positioned read
IO_THREADS = 8  # reads in flight (direct only: buffered reads keep the kernel's own readahead)

_io_pool: ThreadPoolExecutor | None = None


@dataclass(frozen=True)
class ArenaLayout:
    file_begin: int  # absolute file offset of the first byte read, a multiple of align
    file_end: int    # absolute end of the read, a multiple of align (may pass the file's end)
    align: int

    @property
    def nbytes(self) -> int:
        """The arena's size."""
        return self.file_end - self.file_begin


def arena_layout(shard: SafetensorsFile, align: int = PAGE) -> ArenaLayout:
    """Where the tensors of `shard` land in an arena: its data section at arena offset 0."""
    return ArenaLayout(shard.data_start - shard.data_start % align, -(-shard.file_size // align) * align, align)


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
    """{name: tensor viewing `arena`} for every tensor of `shard`, as `layout` places them. arena:
    (>= layout.nbytes,) uint8 at an address that is a multiple of layout.align (aligned_buffer).
    direct: O_DIRECT where the file system allows it (else buffered reads)."""
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
                for begin in range(layout.file_begin, layout.file_end, step):
                    end = min(begin + step, layout.file_end)
                    target = arena[begin - layout.file_begin : end - layout.file_begin]
                    self._chunks.append((begin, end, pool.submit(_read_range, shard, self._fd, target, begin)))
            else:
                _read_range(shard, self._fd, arena[: layout.nbytes], layout.file_begin)
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
    region = arena[: layout.nbytes]
    return {name: tensor_in_buffer(region, entry, layout.file_begin - shard.data_start) for name, entry in shard.entries.items()}


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


def _read_range(shard: SafetensorsFile, fd: int, target: torch.Tensor, offset: int) -> None:
    """Fill `target` (uint8) from file offset `offset`; bytes past the file's end are left as they are.
    An error names the tensor whose bytes the range reaches first."""
    reached = [name for name, entry in shard.entries.items() if shard.data_start + entry.end > offset]
    first = min(reached, key=lambda name: shard.entries[name].begin, default="<none>")
    shard.read_into(fd, target, offset, first, need=min(target.numel(), shard.file_size - offset))
