"""A strict reader of one safetensors file, one tensor at a time, for files nobody vouches for.

Why not `safetensors.safe_open`: it memory-maps the whole file, and every page a conversion touches
stays in the process's resident set while the map lives (a multi-GB checkpoint would show up whole
in peak RSS); and a reader of packed models must turn every lie in a header into our own FormatError.
This reader checks the header completely before trusting it, then reads each tensor's bytes with a
plain `readinto`, so memory is the tensor itself and nothing else.

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
from pathlib import Path

import torch

from quantlite.errors import FormatError
from quantlite.untrusted import parse_json

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
MAX_DIMS = 8

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
                self.file_size = os.fstat(handle.fileno()).st_size
                header_bytes = self._read_header_bytes(handle)
        except OSError as error:
            raise FormatError(f"{self.path}: cannot read ({error.strerror or error})") from error
        self.data_start = 8 + len(header_bytes)
        self.metadata, self.entries = self._parse_header(header_bytes)

    @property
    def names(self) -> list[str]:
        return list(self.entries)

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise FormatError(f"{self.path}: no tensor named {name!r}")
        # torch.empty, not bytearray: a bytearray is zero-filled first, which cost half the load time
        # of a 1.6 GB layer (benchmarks/streaming_405b.py)
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.data_start + entry.begin)
                got = handle.readinto(buffer.numpy())
        except OSError as error:
            raise FormatError(f"{self.path}: cannot read tensor {name!r} ({error.strerror or error})") from error
        if got != entry.nbytes:
            raise FormatError(f"{self.path}: file ends inside tensor {name!r} (truncated after it was opened?)")
        if entry.nbytes == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        return buffer.view(entry.dtype).reshape(entry.shape)

    def read_all(self) -> dict[str, torch.Tensor]:
        return {name: self.read(name) for name in self.entries}

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

    def _parse_header(self, header_bytes: bytes) -> tuple[dict[str, str], dict[str, TensorEntry]]:
        header = parse_json(header_bytes, f"{self.path}: header", FormatError)  # depth and digit limits
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.pop("__metadata__", {})
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise self._fail("__metadata__ must map strings to strings")
        entries = {name: self._parse_entry(name, spec) for name, spec in header.items()}
        self._check_coverage(entries)
        return metadata, entries

    def _parse_entry(self, name: str, spec) -> TensorEntry:
        if not isinstance(spec, dict):
            raise self._fail(f"entry {name!r} is not an object")
        dtype = DTYPES.get(spec.get("dtype")) if isinstance(spec.get("dtype"), str) else None
        if dtype is None:
            raise self._fail(f"tensor {name!r} has unknown dtype {spec.get('dtype')!r}")
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_count(v) for v in shape)):
            raise self._fail(f"tensor {name!r} has invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(v) for v in offsets)):
            raise self._fail(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        data_size = self.file_size - self.data_start
        if not begin <= end <= data_size:
            raise self._fail(f"tensor {name!r} spans bytes {begin}..{end} outside the {data_size}-byte data section")
        expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if end - begin != expected:
            raise self._fail(f"tensor {name!r}: shape {shape} of {spec['dtype']} needs {expected} bytes, offsets give {end - begin}")
        return TensorEntry(dtype, tuple(shape), begin, end)

    def _check_coverage(self, entries: dict[str, TensorEntry]) -> None:
        """The spec's rule: the byte ranges tile the data section exactly (no holes, no overlaps)."""
        position = 0
        for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
            if entry.begin != position:
                kind = "overlaps another" if entry.begin < position else "leaves a hole before it"
                raise self._fail(f"tensor {name!r} at byte {entry.begin} {kind} (expected {position})")
            position = entry.end
        data_size = self.file_size - self.data_start
        if position != data_size:
            raise self._fail(f"tensors cover {position} bytes but the data section has {data_size}")


def _is_count(value) -> bool:
    """A JSON non-negative integer small enough that products of a few stay exact (< 2**48)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**48
