"""A Hugging Face Llama checkpoint folder: config.json, model.safetensors or sharded *.safetensors with
model.safetensors.index.json, and tokenizer files. Tensors are read one at a time (SafetensorsFile)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from quantlite.errors import ConversionError, FormatError
from quantlite.sources import PICKLE_ADVICE, PICKLE_SUFFIXES
from quantlite.sources.llama_layout import LM_HEAD, LlamaDims, all_shapes, llama_dims
from quantlite.sources.safetensors_file import SafetensorsFile
from quantlite.sources.tokenizer_files import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, finish_tokenizer_folder

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_JSON_BYTES = 64 * 1024 * 1024
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; it is recomputed


class HFCheckpoint:
    kind = "hf"

    def __init__(self, folder: Path):
        self.path = Path(folder)
        self.config = _read_json(self.path / "config.json")
        self.dims: LlamaDims = llama_dims(self.config, lambda m: ConversionError(f"{self.path / 'config.json'}: {m}"))
        self._files = {name: self._open(name) for name in self._weight_files()}
        self._where = self._locate_tensors()
        self.shapes = all_shapes(self.dims)
        self._check_tensors()

    # ----------------------------------------------------------------- the source surface
    def itemsize(self, name: str) -> int:
        return self._files[self._where[name]].entries[name].dtype.itemsize

    def read(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].read(name)

    def write_tokenizer(self, folder: Path) -> None:
        for name in TOKENIZER_FILES + (CHAT_TEMPLATE_FILE,):
            if (self.path / name).is_file():
                shutil.copyfile(self.path / name, folder / name)
        finish_tokenizer_folder(folder, {})

    def identity(self) -> dict:
        files = sorted({*self._files, "config.json"})
        return {name: [(self.path / name).stat().st_size, (self.path / name).stat().st_mtime_ns] for name in files}

    # ----------------------------------------------------------------- checks
    def _weight_files(self) -> list[str]:
        if (self.path / INDEX_FILE).exists():
            weight_map = _read_json(self.path / INDEX_FILE).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{self.path / INDEX_FILE}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                    raise ConversionError(f"{self.path / INDEX_FILE}: {name!r} is not a .safetensors file in the folder")
            self._index = weight_map
            return files
        self._index = None
        if (self.path / SINGLE_FILE).exists():
            return [SINGLE_FILE]
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(f"{self.path}: weights are in {', '.join(pickles)}. {PICKLE_ADVICE}")
        raise ConversionError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (the weights are missing)")

    def _open(self, name: str) -> SafetensorsFile:
        if not (self.path / name).is_file():
            raise ConversionError(f"{self.path / name}: missing (named by the checkpoint's index)")
        try:
            return SafetensorsFile(self.path / name)
        except FormatError as error:
            raise ConversionError(f"unreadable checkpoint file: {error}") from error

    def _locate_tensors(self) -> dict[str, str]:
        where: dict[str, str] = {}
        for file_name, handle in self._files.items():
            for tensor in handle.names:
                if tensor in where:
                    raise ConversionError(f"{self.path}: tensor {tensor!r} is in both {where[tensor]} and {file_name}")
                if self._index is not None and self._index.get(tensor) != file_name:
                    raise ConversionError(f"{self.path / INDEX_FILE}: places {tensor!r} in {self._index.get(tensor)}, but it is in {file_name}")
                where[tensor] = file_name
        return where

    def _check_tensors(self) -> None:
        present = {n for n in self._where if not n.endswith(IGNORED_SUFFIXES)}
        if self.dims.tied:
            present.discard(LM_HEAD)  # some tied checkpoints also store the head: the embedding is used
        missing = sorted(set(self.shapes) - present)
        extra = sorted(present - set(self.shapes))
        if missing:
            raise ConversionError(f"{self.path}: missing tensors {_few(missing)} that config.json implies")
        if extra:
            raise ConversionError(f"{self.path}: unexpected tensors {_few(extra)} for a Llama model with this config.json")
        for name, shape in self.shapes.items():
            entry = self._files[self._where[name]].entries[name]
            if entry.shape != shape:
                raise ConversionError(f"{self.path}: tensor {name!r} has shape {list(entry.shape)}, config.json implies {list(shape)}")
            if entry.dtype not in FLOAT_DTYPES:
                raise ConversionError(f"{self.path}: tensor {name!r} is {entry.dtype}; expected float32, float16 or bfloat16")


def _read_json(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise ConversionError(f"{path}: larger than {MAX_JSON_BYTES} bytes, refusing to parse")
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise ConversionError(f"{path}: missing (a Hugging Face checkpoint folder needs it)") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{path}: not readable JSON ({error})") from error
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return value


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
