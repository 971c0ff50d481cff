"""The packed model directory (docs/FORMAT.md): layout, manifest, and a reader that validates before trusting.

    OUT/
      quantlite.json              manifest, written last: a folder without it is not a packed model
      embedding.safetensors       model.embed_tokens.weight (a QWeight's fields, or the plain tensor)
      layer-00000.safetensors     every tensor of model.layers.0, full HF names
      ...
      final.safetensors           model.norm.weight, and lm_head.weight unless tied to the embedding
      tokenizer/                  tokenizer.json, tokenizer_config.json, ...

A QWeight named W is stored as the tensors `W.meta`, `W.codes`, `W.scales`, ... (QWeight.to_dict(W + ".")).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from quantlite.errors import FormatError
from quantlite.q8weight import Q8Weight, read_quantized
from quantlite.qweight import QWeight
from quantlite.sources.checksum import sha256_file
from quantlite.sources.llama_layout import EMBEDDING, final_shapes, layer_shapes, llama_dims
from quantlite.sources.safetensors_file import SafetensorsFile
from quantlite.sources.tokenizer_files import TOKENIZER_FILES

MANIFEST = "quantlite.json"
FORMAT_NAME = "quantlite.packed"
FORMAT_VERSION = 2  # 2: the head and embedding may be Q8Weights, floats 16-bit (docs/FORMAT.md)
READABLE_VERSIONS = (1, 2)  # a version-1 directory is a version-2 one that uses none of that
EMBEDDING_FILE = "embedding.safetensors"
FINAL_FILE = "final.safetensors"
TOKENIZER_DIR = "tokenizer"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
MAX_FILE_BYTES = 2**44  # 16 TiB: a size beyond this in a manifest is a lie, not a shard
QWEIGHT_FIELD = re.compile(r"(.+)\.meta")
_LAYER_FILE = re.compile(r"layer-(\d{5})\.safetensors")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"


def check_relative_path(name: object) -> str:
    """A manifest path must be one of the names the format defines, relative to OUT. Raises FormatError."""
    if not isinstance(name, str):
        raise FormatError(f"manifest path {name!r} is not a string")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in name.split("/") or "\\" in name:
        raise FormatError(f"manifest path {name!r} points outside the packed directory")
    known = (
        name in (EMBEDDING_FILE, FINAL_FILE)
        or _LAYER_FILE.fullmatch(name)
        or (name.startswith(TOKENIZER_DIR + "/") and name[len(TOKENIZER_DIR) + 1:] in TOKENIZER_FILES)
    )
    if not known:
        raise FormatError(f"manifest path {name!r} is not a file name the packed format defines")
    return name


def group_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor | QWeight]:
    """Flat shard tensors -> {name: Tensor or QWeight}: every `X.meta` starts a QWeight named X."""
    prefixes = [m.group(1) for m in map(QWEIGHT_FIELD.fullmatch, tensors) if m]
    grouped: dict[str, torch.Tensor | QWeight] = {}
    claimed: set[str] = set()
    for prefix in prefixes:
        fields = {n: t for n, t in tensors.items() if n.startswith(prefix + ".")}
        grouped[prefix] = read_quantized(fields, prefix=prefix + ".", name=f"{where}: {prefix}")
        claimed.update(fields)
    for name, tensor in tensors.items():
        if name not in claimed:
            if name in grouped:
                raise FormatError(f"{where}: {name!r} is stored both plain and quantized")
            grouped[name] = tensor
    return grouped


class PackedModel:
    """A validated packed directory. Construct with PackedModel.open(path)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.config: dict = manifest["config"]
        self.dims = llama_dims(self.config, lambda m: FormatError(f"{path / MANIFEST}: config: {m}"))
        self.num_layers: int = self.dims.layers

    @classmethod
    def open(cls, path: str | Path) -> "PackedModel":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            hint = " (an interrupted conversion: rerun the same convert command to finish it)" if path.is_dir() and any(path.iterdir()) else ""
            raise FormatError(f"{path}: no {MANIFEST}, so not a packed quantlite model{hint}")
        try:
            if manifest_path.stat().st_size > MAX_MANIFEST_BYTES:
                raise FormatError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise FormatError(f"{manifest_path}: not readable JSON ({error.__class__.__name__}: {error})") from error
        model = cls(path, _check_manifest(manifest, manifest_path))
        model._check_files_present()
        return model

    # ----------------------------------------------------------------- contract
    def layer_nbytes(self, index: int) -> int:
        return self.manifest["files"][self._layer_name(index)]["size"]

    def load_layer(self, index: int) -> dict[str, torch.Tensor | QWeight]:
        """Tensors of model.layers.{index}, names relative to `model.layers.{index}.`."""
        prefix = f"model.layers.{index}."
        loaded = self._load(self._layer_name(index))
        expected = {prefix + name: shape for name, shape in layer_shapes(self.dims).items()}
        self._check_names_and_shapes(self._layer_name(index), loaded, expected)
        return {name[len(prefix):]: value for name, value in loaded.items()}

    def load_embedding(self) -> torch.Tensor | QWeight:
        expected = {EMBEDDING: (self.dims.vocab, self.dims.hidden)}
        loaded = self._load(EMBEDDING_FILE)
        self._check_names_and_shapes(EMBEDDING_FILE, loaded, expected)
        return loaded[EMBEDDING]

    def load_final(self) -> dict[str, torch.Tensor | QWeight]:
        loaded = self._load(FINAL_FILE)
        self._check_names_and_shapes(FINAL_FILE, loaded, final_shapes(self.dims))
        return loaded

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    # ----------------------------------------------------------------- verification
    def verify(self, progress: bool = False) -> list[str]:
        """Every problem found, one message per file naming it (empty when all is well): missing or extra
        files, sizes, sha256 against the manifest, and each shard's structure against the config."""
        from tqdm import tqdm

        problems = []
        files = self.manifest["files"]
        for name in tqdm(sorted(files), desc="verify", unit="file", disable=not progress):
            file_path = self.path / name
            if not file_path.is_file():
                problems.append(f"{name}: missing")
                continue
            size = file_path.stat().st_size
            if size != files[name]["size"]:
                problems.append(f"{name}: {size} bytes, the manifest says {files[name]['size']}")
            elif sha256_file(file_path) != files[name]["sha256"]:
                problems.append(f"{name}: sha256 differs from the manifest (the file changed or is corrupt)")
            elif name.endswith(".safetensors"):
                problems.extend(self._structure_problem(name))
        listed = set(files)
        for stray in sorted(p for p in self.path.rglob("*") if p.is_file()):
            relative = stray.relative_to(self.path).as_posix()
            if relative != MANIFEST and relative not in listed:
                problems.append(f"{relative}: not listed in the manifest")
        return problems

    def _structure_problem(self, name: str) -> list[str]:
        try:
            if name == EMBEDDING_FILE:
                self.load_embedding()
            elif name == FINAL_FILE:
                self.load_final()
            else:
                self.load_layer(int(_LAYER_FILE.fullmatch(name).group(1)))
        except FormatError as error:
            return [f"{name}: {error}"]
        return []

    # ----------------------------------------------------------------- internals
    def _layer_name(self, index: int) -> str:
        if not (isinstance(index, int) and 0 <= index < self.num_layers):
            raise FormatError(f"{self.path}: layer {index!r} does not exist (the model has {self.num_layers})")
        return layer_file(index)

    def _load(self, name: str) -> dict[str, torch.Tensor | QWeight]:
        file_path = self.path / name
        size = file_path.stat().st_size if file_path.is_file() else None
        if size != self.manifest["files"][name]["size"]:
            raise FormatError(f"{file_path}: {'missing' if size is None else f'{size} bytes'}, the manifest says {self.manifest['files'][name]['size']}")
        return group_tensors(SafetensorsFile(file_path).read_all(), str(file_path))

    def _check_names_and_shapes(self, name: str, loaded: dict, expected: dict[str, tuple]) -> None:
        where = self.path / name
        if set(loaded) != set(expected):
            missing, extra = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
            raise FormatError(f"{where}: tensors differ from the config (missing {missing[:3]}, unexpected {extra[:3]})")
        for tensor_name, value in loaded.items():
            shape = value.shape if isinstance(value, (QWeight, Q8Weight)) else tuple(value.shape)
            if tuple(shape) != expected[tensor_name]:
                raise FormatError(f"{where}: {tensor_name} has shape {list(shape)}, the config implies {list(expected[tensor_name])}")
            if not isinstance(value, (QWeight, Q8Weight)) and not value.is_floating_point():
                raise FormatError(f"{where}: {tensor_name} has dtype {value.dtype}, expected a float tensor")

    def _check_files_present(self) -> None:
        expected = {EMBEDDING_FILE, FINAL_FILE, *(layer_file(i) for i in range(self.num_layers))}
        missing = sorted(expected - set(self.manifest["files"]))
        if missing:
            raise FormatError(f"{self.path / MANIFEST}: does not list {', '.join(missing[:3])}")

    def __repr__(self) -> str:
        return f"PackedModel({str(self.path)!r}, layers={self.num_layers}, method={self.manifest['quantization'].get('method')!r})"


def _check_manifest(manifest: object, where: Path) -> dict:
    """The manifest's structure: types, known paths, sane sizes. The config is checked by PackedModel."""
    def fail(message: str) -> FormatError:
        return FormatError(f"{where}: {message}")

    if not isinstance(manifest, dict):
        raise fail("not a JSON object")
    if manifest.get("format") != FORMAT_NAME:
        raise fail(f"format is {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if type(manifest.get("version")) is not int or manifest["version"] not in READABLE_VERSIONS:
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise fail(f"format version {manifest.get('version')!r} is not supported (this reader knows {readable})")
    for key in ("config", "quantization", "files", "tensors", "provenance"):
        if not isinstance(manifest.get(key), dict):
            raise fail(f"{key!r} must be a JSON object")
    for name, entry in manifest["files"].items():
        try:
            check_relative_path(name)
        except FormatError as error:
            raise fail(str(error)) from error
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
            raise fail(f"files[{name!r}] needs a lowercase hex 'sha256'")
        size = entry.get("size")
        if not (isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_FILE_BYTES):
            raise fail(f"files[{name!r}] has an absurd size {size!r}")
    return manifest
