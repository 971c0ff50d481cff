"""Reading files nobody vouches for: the two rules every reader of a packed folder or a source applies.

* A file is opened only when it is a regular file inside its folder. Opening a FIFO blocks until a
  writer comes (forever), a device can read without end, and a symlink can point anywhere: a packed
  folder that links `layer-00000.safetensors` to ~/.ssh/id_rsa must not be "verified" and read. In a
  packed folder no symlink is followed at all; in a source folder a symlink is resolved and must land
  inside the folder, or inside the `blobs/` of a Hugging Face cache (whose snapshot folders are made
  of symlinks into it).
* JSON is parsed with limits: size (read at most `max_bytes`), nesting depth (MAX_JSON_DEPTH: a
  parser or a later recursive walk must not exhaust the stack) and integer digits (Python's own
  limit raises ValueError beyond 4300 digits); NaN and Infinity literals are refused (not JSON).
  Every failure is one error naming the file.
"""
from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

MAX_JSON_BYTES = 64 * 1024 * 1024
MAX_JSON_DEPTH = 64  # config.json and tokenizer.json nest 5-6 deep; the manifest 4

Error = Callable[[str], Exception]


def check_regular_file(path: Path, root: Path, error: Error, follow_links: bool = False) -> bool:
    """False when `path` (under `root`) does not exist; True when it is a regular file reached inside
    `root`; otherwise raise error(message). follow_links: symlinks below root are resolved and must
    stay inside root (or a Hugging Face cache's blobs/); without it any symlink is refused."""
    path, root = Path(path), Path(root)
    if not os.path.lexists(path):
        return False
    current = root
    for part in path.relative_to(root).parts:
        current = current / part
        mode = os.lstat(current).st_mode
        if stat.S_ISLNK(mode):
            if not follow_links:
                raise error(f"{current} is a symbolic link; quantlite reads only regular files inside {root}")
            target = current.resolve()
            if not any(target.is_relative_to(inside) for inside in _link_roots(root)):
                raise error(f"{current} is a symbolic link to {target}, outside {root}; refusing to read it")
    try:
        mode = os.stat(path).st_mode
    except OSError as err:  # a dangling symlink
        raise error(f"{path}: cannot read ({err.strerror or err})") from err
    if not stat.S_ISREG(mode):
        raise error(f"{path} is not a regular file (a FIFO, device, socket or folder); refusing to open it")
    return True


def _link_roots(root: Path) -> list[Path]:
    resolved = root.resolve()
    roots = [resolved]
    if root.parent.name == "snapshots":  # HF cache: REPO/snapshots/REV/file -> ../../blobs/HASH
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def read_json(path: Path, error: Error, max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in `path` (already checked to be a regular file), within the limits above."""
    return parse_json(read_limited(path, error, max_bytes), path, error)


def read_limited(path: Path, error: Error, max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of `path` (already checked to be a regular file), refused beyond max_bytes."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    except OSError as err:
        raise error(f"{path}: cannot read ({err.strerror or err})") from err
    if len(data) > max_bytes:
        raise error(f"{path}: larger than {max_bytes} bytes, refusing to parse")
    return data


def parse_json(data: bytes | str, where, error: Error):
    """json.loads with the limits above; error(message) names `where`."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value = json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:  # int digits: ValueError
        detail = str(err)[:200]
        raise error(f"{where}: not readable JSON ({err.__class__.__name__}: {detail})") from err
    if _too_deep(value):
        raise error(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_deep(value) -> bool:
    stack = [(value, 1)]
    while stack:  # iterative: a recursive walk is what the limit protects
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False
