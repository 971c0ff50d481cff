"""A strict reader of one safetensors file, one tensor at a time, for files nobody vouches for.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a conversion touches
stays in the process's resident set while the map lives (a multi-GB checkpoint would show up whole
in peak RSS); and a reader of packed models must turn every lie in a header into our own FormatError.
This reader checks the header completely before trusting it, then reads the bytes with positioned
reads into uninitialised buffers, so memory is the tensors themselves and nothing else. A header is
parsed once per distinct header (the parse is memoised on its bytes and the file size): a layer
streamed on every token pays for its 65-entry JSON header once, not on every read.

The file (https://github.com/huggingface/safetensors, little-endian):
    u64 n                      header length in bytes
    n bytes of UTF-8 JSON      {name: {"dtype": "F16", "shape": [..], "data_offsets": [begin, end]},
                                "__metadata__": {str: str}}   (optional)
    the data                   offsets relative to the data's start; together they cover it
                               without holes or overlaps
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from quantlite.errors import FormatError
from quantlite.untrusted import parse_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMS = 8
# read_all: a tensor this large gets a buffer of its own (so a caller can free it alone, e.g. fp16
# scales once widened); smaller neighbours share one buffer filled by one read (one syscall instead of
# ~65 for a SmolLM2 layer)
OWN_BUFFER_BYTES = 1 << 20
MAX_MEMOISED_HEADER_BYTES = 1 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # byte offset from the start of the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


class SafetensorsFile:
    """Header parsed and validated on construction; `read(name)` returns one CPU tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as handle:
                stat = os.fstat(handle.fileno())
                self.file_size = stat.st_size
                header_bytes = self._read_header_bytes(handle)
        except OSError as error:
            raise FormatError(f"{self.path}: cannot read ({error.strerror or error})") from error
        # which file, in which state: a writer changes the size, mtime or ctime (ctime cannot be set back)
        self.identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
        self.data_start = 8 + len(header_bytes)
        try:
            parse = _parse_header_memoised if len(header_bytes) <= MAX_MEMOISED_HEADER_BYTES else _parse_header
            self.metadata, self.entries = parse(header_bytes, self.file_size)
        except _HeaderError as error:
            raise self._fail(str(error)) from None

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        if name not in self.entries:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        return self.read_all([name])[name]

    def read_all(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{name: CPU tensor} of `names` (default: every tensor), read through one file descriptor.

        Runs of small tensors that lie next to each other in the file are read into one buffer by one
        positioned read and handed out as views; a tensor of OWN_BUFFER_BYTES or more gets its own.
        Buffers are torch.empty, not bytearray: zero-filling first cost half the load time of a
        1.6 GB layer (benchmarks/streaming_405b.py)."""
        names = list(self.entries) if names is None else names
        wanted = sorted(names, key=lambda n: self.entries[n].begin)
        out: dict[str, torch.Tensor] = {}
        fd = self.open_unchanged()
        try:
            for run in _runs(wanted, self.entries):
                begin, end = self.entries[run[0]].begin, self.entries[run[-1]].end
                buffer = torch.empty(end - begin, dtype=torch.uint8)
                self.read_into(fd, buffer, self.data_start + begin, run[0])
                for name in run:
                    out[name] = tensor_in_buffer(buffer, self.entries[name], begin)
        finally:
            os.close(fd)
        return {name: out[name] for name in names}

    def read_slices(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        """Rows [start, end) of tensor `name` along its first dimension, for each range in order,
        concatenated: (sum of lengths, *shape[1:]). Positioned reads of just those bytes (the rows
        of a vocab-sized table a decode step needs, never the table)."""
        entry = self.entries.get(name)
        if entry is None or not entry.shape:
            raise FormatError(f"{self.path}: no tensor named {name!r} with a first dimension")
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        if any(not 0 <= start <= end <= entry.shape[0] for start, end in ranges):
            raise FormatError(f"{self.path}: rows {ranges[:3]} outside tensor {name!r} of {entry.shape[0]} rows")
        out = torch.empty((sum(end - start for start, end in ranges), *entry.shape[1:]), dtype=entry.dtype)
        flat = out.view(-1).view(torch.uint8)
        fd = self.open_unchanged()
        try:
            at = 0
            for start, end in ranges:
                size = (end - start) * row_bytes
                if size:
                    self.read_into(fd, flat[at : at + size], self.data_start + entry.begin + start * row_bytes, name)
                at += size
        finally:
            os.close(fd)
        return out

    def open_unchanged(self, flags: int = 0) -> int:
        """A file descriptor of the file whose header this object checked (FormatError if it changed);
        `flags` are added to O_RDONLY (the arena reader's O_DIRECT)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0) | flags)
            stat = os.fstat(fd)
        except OSError as error:
            raise FormatError(f"{self.path}: cannot read ({error.strerror or error})") from error
        if (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns) != self.identity:
            os.close(fd)
            raise FormatError(f"{self.path}: the file changed after its header was read")
        return fd

    def read_into(self, fd: int, buffer: torch.Tensor, offset: int, first: str, need: int | None = None) -> None:
        """Fill `buffer` (uint8) from file offset `offset` of `fd` (open_unchanged's); with `need`, only
        its first `need` bytes must be there (an O_DIRECT read of whole pages past the file's end)."""
        view, done = memoryview(buffer.numpy()), 0
        while done < (len(view) if need is None else need):  # a single read stops short of 2 GiB on Linux
            try:
                got = os.preadv(fd, [view[done:]], offset + done)
            except OSError as error:
                raise FormatError(f"{self.path}: cannot read tensor {first!r} ({error.strerror or error})") from error
            if got == 0:
                raise FormatError(f"{self.path}: file ends inside tensor {first!r} (truncated after it was opened?)")
            done += got

    # ----------------------------------------------------------------- header checks
    def _fail(self, message: str) -> FormatError:
        return FormatError(f"{self.path}: {message}")

    def _read_header_bytes(self, handle) -> bytes:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise self._fail(f"{self.file_size} bytes is too short for a safetensors file")
        length = int.from_bytes(prefix, "little")
        if length > MAX_HEADER_BYTES:
            raise self._fail(f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + length > self.file_size:
            raise self._fail(f"header length {length} runs past the end of the {self.file_size}-byte file")
        return handle.read(length)


class _HeaderError(Exception):
    """A header violation, before the file's path is put in front of it."""


def _parse_header(header_bytes: bytes, file_size: int) -> tuple[dict[str, str], dict[str, TensorEntry]]:
    """The checked header (metadata, entries); (its bytes, the file's size) fix the result."""
    header = parse_json(header_bytes, "header", _HeaderError)  # depth and digit limits
    if not isinstance(header, dict):
        raise _HeaderError("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _HeaderError("__metadata__ must map strings to strings")
    data_size = file_size - 8 - len(header_bytes)
    entries = {name: _parse_entry(name, spec, data_size) for name, spec in header.items()}
    _check_coverage(entries, data_size)
    return metadata, entries


# a packed layer's header is ~10 KB; larger ones (and hostile 100 MB ones) are not kept. Callers must
# not mutate what a memoised parse returns.
_parse_header_memoised = lru_cache(maxsize=256)(_parse_header)


def _parse_entry(name: str, spec, data_size: int) -> TensorEntry:
    if not isinstance(spec, dict):
        raise _HeaderError(f"entry {name!r} is not an object")
    dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec.get("dtype"), str) else None
    if dtype is None:
        raise _HeaderError(f"tensor {name!r} has unknown dtype {spec.get('dtype')!r}")
    shape, offsets = spec.get("shape"), spec.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(v) for v in shape)):
        raise _HeaderError(f"tensor {name!r} has invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
        raise _HeaderError(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= data_size:
        raise _HeaderError(f"tensor {name!r} spans bytes {begin}..{end} outside the {data_size}-byte data section")
    expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if end - begin != expected:
        raise _HeaderError(f"tensor {name!r}: shape {shape} of {spec['dtype']} needs {expected} bytes, offsets give {end - begin}")
    return TensorEntry(dtype, tuple(shape), begin, end)


def _check_coverage(entries: dict[str, TensorEntry], data_size: int) -> None:
    """The spec's rule: the byte ranges tile the data section exactly (no holes, no overlaps)."""
    position = 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != position:
            kind = "overlaps another" if entry.begin < position else "leaves a hole before it"
            raise _HeaderError(f"tensor {name!r} at byte {entry.begin} {kind} (expected {position})")
        position = entry.end
    if position != data_size:
        raise _HeaderError(f"tensors cover {position} bytes but the data section has {data_size}")


def _runs(names: list[str], entries: dict[str, TensorEntry]) -> list[list[str]]:
    """names (sorted by offset) -> groups read by one positioned read each: a large tensor alone,
    small ones together while they are contiguous in the file."""
    runs: list[list[str]] = []
    for name in names:
        entry = entries[name]
        alone = entry.nbytes >= OWN_BUFFER_BYTES
        previous = entries[runs[-1][-1]] if runs else None
        if runs and not alone and previous.nbytes < OWN_BUFFER_BYTES and previous.end == entry.begin:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


def tensor_in_buffer(buffer: torch.Tensor, entry: TensorEntry, buffer_begin: int) -> torch.Tensor:
    """entry's bytes in `buffer` (which starts at data offset buffer_begin) as a tensor: a view when
    the offset suits the dtype's alignment (safetensors writers align them), a copy when it does not."""
    if entry.nbytes == 0:
        return torch.empty(entry.shape, dtype=entry.dtype)
    raw = buffer[entry.begin - buffer_begin : entry.end - buffer_begin]
    if (entry.begin - buffer_begin) % entry.dtype.itemsize:
        raw = raw.clone()  # misaligned for its dtype: a fresh (aligned) allocation
    return raw.view(entry.dtype).reshape(entry.shape)


def _is_count(value) -> bool:
    """A JSON non-negative integer small enough that products of a few stay exact (< 2**48)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**48
