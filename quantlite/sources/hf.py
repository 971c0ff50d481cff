"""A Hugging Face checkpoint folder of a Llama-family model (quantlite.model_config.FAMILIES): config.json, model.safetensors or sharded *.safetensors with
model.safetensors.index.json, and tokenizer files. Tensors are read one at a time (SafetensorsFile)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from quantlite.errors import ConversionError, FormatError
from quantlite.sources import PICKLE_ADVICE, PICKLE_SUFFIXES
from quantlite.model_config import LM_HEAD, ModelConfig, all_shapes, read_model_config
from quantlite.sources.safetensors_file import SafetensorsFile
from quantlite.sources.tokenizer_files import CHAT_TEMPLATE_FILE, TOKENIZER_FILES, finish_tokenizer_folder
from quantlite.untrusted import check_regular_file, read_json

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # old checkpoints saved this buffer; it is recomputed


class HFCheckpoint:
    kind = "hf"

    def __init__(self, folder: Path):
        self.path = Path(folder)
        self.config = _read_json(self.path / "config.json", self.path)
        self.model_config: ModelConfig = read_model_config(self.config, lambda m: ConversionError(f"{self.path / 'config.json'}: {m}"))
        self._files = {name: self._open(name) for name in self._weight_files()}
        self._where = self._locate_tensors()
        self.shapes = all_shapes(self.model_config)
        self._check_tensors()

    # ----------------------------------------------------------------- the source surface
    def itemsize(self, name: str) -> int:
        return self._files[self._where[name]].entries[name].dtype.itemsize

    def read(self, name: str) -> torch.Tensor:
        return self._files[self._where[name]].read(name)

    def write_tokenizer(self, folder: Path) -> None:
        for name in self._tokenizer_files():  # the bytes are copied, never a link
            shutil.copyfile(self.path / name, folder / name, follow_symlinks=True)
        finish_tokenizer_folder(folder, {})

    def has_tokenizer(self) -> bool:
        """A tokenizer.json the `tokenizers` library reads (what the runtime and random calibration use)."""
        if not self._is_file("tokenizer.json"):
            return False
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(self.path / "tokenizer.json"))
        except Exception:  # the library raises plain Exception for a file it cannot use
            return False
        return True

    def tokenizer_nbytes(self) -> int:
        return sum((self.path / name).stat().st_size for name in self._tokenizer_files())

    def _tokenizer_files(self) -> list[str]:
        return [name for name in TOKENIZER_FILES + (CHAT_TEMPLATE_FILE,) if self._is_file(name)]

    def _is_file(self, name: str) -> bool:
        """Whether the folder has `name` as a regular file (a symlink must resolve inside the folder,
        or into a Hugging Face cache's blobs/); raises ConversionError for anything else under that name."""
        return check_regular_file(self.path / name, self.path, ConversionError, follow_links=True)

    def identity(self) -> dict:
        files = sorted({*self._files, "config.json"})
        return {name: [(self.path / name).stat().st_size, (self.path / name).stat().st_mtime_ns] for name in files}

    # ----------------------------------------------------------------- checks
    def _weight_files(self) -> list[str]:
        if self._is_file(INDEX_FILE):
            weight_map = _read_json(self.path / INDEX_FILE, self.path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{self.path / INDEX_FILE}: no 'weight_map'")
            files = sorted(set(weight_map.values()))
            for name in files:
                if not isinstance(name, str) or Path(name).name != name or not name.endswith(".safetensors"):
                    raise ConversionError(f"{self.path / INDEX_FILE}: {name!r} is not a .safetensors file in the folder")
            self._index = weight_map
            return files
        self._index = None
        if self._is_file(SINGLE_FILE):
            return [SINGLE_FILE]
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(f"{self.path}: weights are in {', '.join(pickles)}. {PICKLE_ADVICE}")
        raise ConversionError(f"{self.path}: no {SINGLE_FILE} or {INDEX_FILE} (the weights are missing)")

    def _open(self, name: str) -> SafetensorsFile:
        if not self._is_file(name):
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
        if self.model_config.tie_word_embeddings:
            present.discard(LM_HEAD)  # some tied checkpoints also store the head: the embedding is used
        missing = sorted(set(self.shapes) - present)
        extra = sorted(present - set(self.shapes))
        if missing:
            raise ConversionError(f"{self.path}: missing tensors {_few(missing)} that config.json implies")
        if extra:
            raise ConversionError(f"{self.path}: unexpected tensors {_few(extra)} for a {self.model_config.family} model with this config.json")
        for name, shape in self.shapes.items():
            entry = self._files[self._where[name]].entries[name]
            if entry.shape != shape:
                raise ConversionError(f"{self.path}: tensor {name!r} has shape {list(entry.shape)}, config.json implies {list(shape)}")
            if entry.dtype not in FLOAT_DTYPES:
                raise ConversionError(f"{self.path}: tensor {name!r} is {entry.dtype}; expected float32, float16 or bfloat16")


def _read_json(path: Path, folder: Path) -> dict:
    if not check_regular_file(path, folder, ConversionError, follow_links=True):
        raise ConversionError(f"{path}: missing (a Hugging Face checkpoint folder needs it)")
    value = read_json(path, ConversionError)
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return value


def _few(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
