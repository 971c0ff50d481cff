"""Fuzzing the packed-model reader with hypothesis: damaged shards, lying headers, hostile manifests.

The property: whatever the bytes, opening, loading every shard and verifying either succeeds or raises
one of quantlite's own errors (QuantliteError), never anything else, and within a deadline. And when the
bytes of a listed file changed, something notices (an error, or a problem reported by verify).
"""
from __future__ import annotations

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantlite.converter import convert
from quantlite.errors import QuantliteError
from quantlite.packed import MANIFEST, PackedModel
from quantlite.sources.synthetic import TINY_CONFIG, write_random_llama

SMALL = {**TINY_CONFIG, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40}
FUZZ = settings(max_examples=30, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A 1-layer model quantized with every QWeight field in use (outliers, double-quantized scales)."""
    folder = tmp_path_factory.mktemp("fuzz")
    src = write_random_llama(folder / "hf", SMALL, generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    (src / "tokenizer.json").write_text('{"model": {}}')
    convert(src, folder / "out", outlier_frac=0.02, progress=False)  # the embedding and head in int8
    return folder / "out"


def exercise(folder: Path) -> bool:
    """Read everything; True if a QuantliteError or a verify problem flagged the damage."""
    try:
        model = PackedModel.open(folder)
        model.load_embedding()
        for layer in range(model.num_layers):
            model.load_layer(layer)
        model.load_final()
        return bool(model.verify())
    except QuantliteError:
        return True


def damaged_copy(pristine: Path, scratch: str) -> Path:
    return Path(shutil.copytree(pristine, Path(scratch) / "out"))


def listed_files(pristine: Path) -> list[str]:
    return sorted(json.loads((pristine / MANIFEST).read_text())["files"])


@FUZZ
@given(data=st.data())
def test_flipped_bytes(pristine, data):
    name = data.draw(st.sampled_from(listed_files(pristine) + [MANIFEST]), label="file")
    with tempfile.TemporaryDirectory() as scratch:
        folder = damaged_copy(pristine, scratch)
        original = (folder / name).read_bytes()
        raw = bytearray(original)
        for _ in range(data.draw(st.integers(1, 4), label="flips")):
            position = data.draw(st.integers(0, len(raw) - 1), label="position")
            raw[position] ^= data.draw(st.integers(1, 255), label="mask")
        (folder / name).write_bytes(bytes(raw))
        noticed = exercise(folder)
        # two flips may cancel; a flip in the manifest may land in a free-text string
        assert noticed or bytes(raw) == original or name == MANIFEST


@FUZZ
@given(data=st.data())
def test_truncated_or_extended_files(pristine, data):
    name = data.draw(st.sampled_from(listed_files(pristine)), label="file")
    with tempfile.TemporaryDirectory() as scratch:
        folder = damaged_copy(pristine, scratch)
        raw = (folder / name).read_bytes()
        cut = data.draw(st.integers(0, len(raw) - 1), label="keep")
        tail = data.draw(st.binary(max_size=64), label="appended")
        (folder / name).write_bytes(raw[:cut] + tail)
        assert exercise(folder)


@FUZZ
@given(data=st.data())
def test_lying_safetensors_headers(pristine, data):
    name = data.draw(st.sampled_from([n for n in listed_files(pristine) if n.endswith(".safetensors")]), label="file")
    with tempfile.TemporaryDirectory() as scratch:
        folder = damaged_copy(pristine, scratch)
        raw = (folder / name).read_bytes()
        length = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + length])
        tensor = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")), label="tensor")
        field = data.draw(st.sampled_from(["shape", "data_offsets", "dtype"]), label="field")
        header[tensor][field] = data.draw(
            JSON_VALUES | st.lists(st.integers(-(2**66), 2**66), max_size=9), label="value")
        encoded = json.dumps(header).encode()
        declared = data.draw(st.sampled_from([len(encoded), 2**64 - 1, len(encoded) + 1, 0]), label="length")
        (folder / name).write_bytes(struct.pack("<Q", declared) + encoded + raw[8 + length:])
        exercise(folder)  # a value equal to the original may pass; only the error type is the property


@FUZZ
@given(data=st.data())
def test_hostile_manifests(pristine, data):
    manifest = json.loads((pristine / MANIFEST).read_text())
    paths = [(key,) for key in manifest] + [(key, sub) for key, value in manifest.items()
                                            if isinstance(value, dict) for sub in value]
    path = data.draw(st.sampled_from(sorted(paths)), label="where")
    target = manifest
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(JSON_VALUES, label="value")
    with tempfile.TemporaryDirectory() as scratch:
        folder = damaged_copy(pristine, scratch)
        (folder / MANIFEST).write_text(json.dumps(manifest))
        exercise(folder)
