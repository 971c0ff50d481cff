"""Hostile inputs, family 1: `convert SRC OUT` never deletes or overwrites a file it did not write.

OUT's own files are the ones quantlite recorded (the manifest's, the partial state's finished and
planned files, their temporary names); anything else stops the conversion, --overwrite or not. A
lock guards OUT against a second convert; a conversion killed mid-write resumes (docs/reliability.md).
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from quantlite.converter import LOCK_FILE, PARTIAL_STATE, convert
from quantlite.errors import ConversionError
from quantlite.packed import MANIFEST, PackedModel
from quantlite.sources.synthetic import write_random_llama


@pytest.fixture
def checkpoint(tmp_path, generator) -> Path:
    return write_random_llama(tmp_path / "hf", dtype=torch.bfloat16, generator=generator)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("plant", [
    lambda out: (out / "tokenizer").mkdir() or (out / "tokenizer" / "my_notes.txt").write_text("mine"),
    lambda out: (out / "final.safetensors").mkdir() or (out / "final.safetensors" / "data.csv").write_text("mine"),
    lambda out: (out / "layer-00000.safetensors").write_text("mine, with a quantlite-looking name"),
    lambda out: (out / ".layer-00001.safetensors.partial").write_text("mine too"),
    lambda out: (out / "quantlite.json").write_text('{"mine": true}'),
])
@pytest.mark.parametrize("overwrite", [False, True])
def test_files_that_only_look_like_quantlite_output_are_never_touched(tmp_path, checkpoint, plant, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    plant(out)
    before = snapshot(out)
    with pytest.raises(ConversionError, match="did not write"):
        convert(checkpoint, out, overwrite=overwrite, progress=False)
    assert snapshot(out) == before


def test_a_users_file_added_to_a_complete_output_survives_overwrite(tmp_path, checkpoint):
    out = tmp_path / "out"
    convert(checkpoint, out, method="rtn", progress=False)
    (out / "tokenizer" / "my_notes.txt").write_text("mine")
    with pytest.raises(ConversionError, match=r"did not write \(tokenizer/my_notes.txt\)"):
        convert(checkpoint, out, method="nf4", overwrite=True, progress=False)
    assert (out / "tokenizer" / "my_notes.txt").read_text() == "mine"
    (out / "tokenizer" / "my_notes.txt").unlink()
    convert(checkpoint, out, method="nf4", overwrite=True, progress=False)
    assert PackedModel.open(out).verify() == []


def test_symlinks_in_out_are_refused_not_followed(tmp_path, checkpoint):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    convert(checkpoint, out, progress=False)
    elsewhere.mkdir()
    (elsewhere / "tokenizer.json").write_text("someone else's")
    for path in (out / "tokenizer").iterdir():
        path.unlink()
    (out / "tokenizer").rmdir()
    (out / "tokenizer").symlink_to(elsewhere)
    with pytest.raises(ConversionError, match="did not write"):
        convert(checkpoint, out, overwrite=True, progress=False)
    assert (elsewhere / "tokenizer.json").read_text() == "someone else's"


def test_output_under_a_file_or_in_proc_is_a_clear_error(tmp_path, checkpoint):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "out", Path("/proc/quantlite-out"), tmp_path / "file"):
        with pytest.raises(ConversionError, match="cannot write into|not a folder"):
            convert(checkpoint, out, progress=False)


SLOW_CONVERT = """
import sys, time, safetensors.torch as st
real = st.save_file
def slow(tensors, path, metadata=None):  # layer-00001 stays under its temporary name for a minute
    real(tensors, path, metadata=metadata)
    if "layer-00001" in path:
        time.sleep(60)
st.save_file = slow
from quantlite.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_slow_convert(checkpoint: Path, out: Path) -> subprocess.Popen:
    """A `quantlite convert` child, returned once it is writing .layer-00001.safetensors.partial."""
    child = subprocess.Popen([sys.executable, "-c", SLOW_CONVERT, "convert", "--quiet", str(checkpoint), str(out)],
                             cwd=Path(__file__).resolve().parents[1])
    temp, deadline = out / ".layer-00001.safetensors.partial", time.monotonic() + 120
    while not temp.exists() and time.monotonic() < deadline and child.poll() is None:
        time.sleep(0.05)
    if not temp.exists():
        child.kill()
        pytest.fail("the child never reached the slow write")
    return child


def test_kill_9_mid_write_then_rerun_and_overwrite_work(tmp_path, checkpoint):
    """A child process is killed while a shard's temporary file exists; the rerun cleans it and resumes."""
    out = tmp_path / "out"
    child = start_slow_convert(checkpoint, out)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (out / MANIFEST).exists() and (out / PARTIAL_STATE).exists()

    summary = convert(checkpoint, out, progress=False)
    assert summary.files_resumed >= 2 and not (out / ".layer-00001.safetensors.partial").exists()
    assert not (out / LOCK_FILE).exists() and PackedModel.open(out).verify() == []
    convert(checkpoint, out, method="rtn", overwrite=True, progress=False)
    assert PackedModel.open(out).verify() == []


def test_a_second_convert_into_the_same_folder_is_refused_by_the_lock(tmp_path, checkpoint):
    out = tmp_path / "out"
    child = start_slow_convert(checkpoint, out)
    try:
        with pytest.raises(ConversionError, match="being written by another `quantlite convert`"):
            convert(checkpoint, out, progress=False)
        with pytest.raises(ConversionError, match="being written by another"):
            convert(checkpoint, out, overwrite=True, progress=False)
    finally:
        child.kill()
        child.wait()
    convert(checkpoint, out, progress=False)  # the kernel dropped the dead process's lock
    assert PackedModel.open(out).verify() == []


def test_disk_full_inside_safetensors_is_one_clear_error(tmp_path, checkpoint, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full(tensors, path, metadata=None):
        if "layer-00001" in path:
            Path(path).write_bytes(b"half")
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(ConversionError, match="StorageFull.*rerun the same command to resume"):
        convert(checkpoint, tmp_path / "out", progress=False)
    assert not any(p.name.endswith(".partial") for p in (tmp_path / "out").iterdir())
    monkeypatch.undo()
    assert convert(checkpoint, tmp_path / "out", progress=False).files_resumed >= 2
