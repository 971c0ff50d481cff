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

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from quantlite.errors import FormatError
from quantlite.model_config import EMBEDDING, ModelConfig, final_shapes, layer_shapes, read_model_config
from quantlite.q8weight import Q8Weight, read_quantized
from quantlite.qweight import SCALE_GROUP_SIZE, QWeight
from quantlite.sources.arena import ArenaRead, arena_layout
from quantlite.sources.checksum import sha256_file
from quantlite.sources.safetensors_file import SafetensorsFile
from quantlite.sources.tokenizer_files import TOKENIZER_FILES
from quantlite.untrusted import check_regular_file, read_json

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


def group_tensors(tensors: dict[str, torch.Tensor], where: str, check_values: bool = True, ready=None,
                  then=None) -> dict[str, torch.Tensor | QWeight | Q8Weight]:
    """Flat shard tensors -> {name: Tensor or QWeight}: every `X.meta` starts a quantized weight named X (QWeight or
    Q8Weight, as its meta says), whose
    fields are the tensors `X.<field>`. Linear in the number of tensors (a shard may hold thousands).
    check_values: see QWeight.from_dict. ready(names), if given, is called before the values of those
    tensors are used, weight after weight in the order their last tensor comes in `tensors` (file
    order for an arena read, so the first weights are checked while the disk delivers the rest);
    then(name, value), if given, maps each value as soon as it is built."""
    fields: dict[str, dict[str, torch.Tensor]] = {m.group(1): {} for m in map(QWEIGHT_FIELD.fullmatch, tensors) if m}
    last: dict[str, int] = {}  # weight or plain tensor -> position of its last tensor
    for position, name in enumerate(tensors):
        prefix = name.rpartition(".")[0]
        if prefix in fields:
            fields[prefix][name] = tensors[name]
            last[prefix] = position
        elif name in fields:
            raise FormatError(f"{where}: {name!r} is stored both plain and quantized")
        else:
            last[name] = position
    grouped: dict[str, torch.Tensor | QWeight | Q8Weight] = {}
    for name in sorted(last, key=last.__getitem__):
        group = fields[name] if name in fields else {name: tensors[name]}
        if ready is not None:
            ready(group)
        value = (read_quantized(group, prefix=name + ".", name=f"{where}: {name}", check_values=check_values)
                 if name in fields else tensors[name])
        grouped[name] = value if then is None else then(name, value)
    return grouped


class PackedModel:
    """A validated packed directory. Construct with PackedModel.open(path)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.config: dict = manifest["config"]
        self.model_config: ModelConfig = read_model_config(self.config, lambda m: FormatError(f"{path / MANIFEST}: config: {m}"))
        self.num_layers: int = self.model_config.num_layers
        # shard name -> SafetensorsFile.identity of its last read whose values passed every check
        self._values_checked: dict[str, tuple] = {}
        self._embedding_index: tuple | None = None  # (file identity, the embedding QWeight's small tensors)

    @property
    def _embedding_shape(self) -> tuple[int, int]:
        return (self.model_config.vocab_size, self.model_config.hidden_size)

    @classmethod
    def open(cls, path: str | Path) -> "PackedModel":
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir() or not check_regular_file(manifest_path, path, FormatError):
            hint = " (an interrupted conversion: rerun the same convert command to finish it)" if path.is_dir() and any(path.iterdir()) else ""
            raise FormatError(f"{path}: no {MANIFEST}, so not a packed quantlite model{hint}")
        manifest = read_json(manifest_path, FormatError, MAX_MANIFEST_BYTES)
        model = cls(path, _check_manifest(manifest, manifest_path))
        model._check_files_present()
        for problem in model.path_problems():
            raise FormatError(f"{path}/{problem}")
        return model

    # ----------------------------------------------------------------- contract
    def layer_nbytes(self, index: int) -> int:
        return self.manifest["files"][self._layer_name(index)]["size"]

    def load_layer(self, index: int, into: torch.Tensor | None = None, direct: bool = False, prepare=None,
                   kept: dict | None = None) -> dict[str, torch.Tensor | QWeight]:
        """Tensors of model.layers.{index}, names relative to `model.layers.{index}.`.
        into: an arena (sources.arena) that every tensor then views, as stored (the streaming runtime's
        reused buffers, at least `arena_layout(shard).nbytes`); direct: read it O_DIRECT; prepare(value):
        applied to each weight of an arena read as soon as its bytes are in (the runtime builds the
        kernel layout there, overlapping the read).
        kept: a dict the caller keeps beside the arena `into` (KeptUnit); see KeptUnit."""
        prefix = f"model.layers.{index}."
        loaded = self._load(self._layer_name(index), into, direct, prepare, kept)
        expected = {prefix + name: shape for name, shape in layer_shapes(self.model_config).items()}
        self._check_names_and_shapes(self._layer_name(index), loaded, expected)
        return {name[len(prefix):]: value for name, value in loaded.items()}

    def load_embedding(self, into: torch.Tensor | None = None, direct: bool = False, prepare=None,
                       kept: dict | None = None) -> torch.Tensor | QWeight:
        expected = {EMBEDDING: self._embedding_shape}
        loaded = self._load(EMBEDDING_FILE, into, direct, prepare, kept)
        self._check_names_and_shapes(EMBEDDING_FILE, loaded, expected)
        return loaded[EMBEDDING]

    def load_final(self, into: torch.Tensor | None = None, direct: bool = False, prepare=None,
                   kept: dict | None = None) -> dict[str, torch.Tensor | QWeight]:
        loaded = self._load(FINAL_FILE, into, direct, prepare, kept)
        self._check_names_and_shapes(FINAL_FILE, loaded, final_shapes(self.model_config))
        return loaded

    def load_embedding_rows(self, rows: torch.Tensor) -> torch.Tensor | QWeight | Q8Weight:
        """rows (r,) int64 -> the embedding table restricted to those rows, (r, hidden): a tensor, a
        Q8Weight of r rows, or a QWeight of r rows (scales decoded to float32, outliers of those rows only), every value
        checked. Reads only those rows' bytes (positioned reads), never the whole table."""
        file_path = self.path / EMBEDDING_FILE
        shard = SafetensorsFile(file_path)
        where = f"{file_path}: {EMBEDDING}"
        if shard.file_size != self.manifest["files"][EMBEDDING_FILE]["size"]:
            raise FormatError(f"{file_path}: {shard.file_size} bytes, the manifest says {self.manifest['files'][EMBEDDING_FILE]['size']}")
        ranges = [(row, row + 1) for row in rows.tolist()]
        if EMBEDDING in shard.entries:  # a plain table
            self._check_names_and_shapes(EMBEDDING_FILE, {EMBEDDING: _stand_in(shard.entries[EMBEDDING])},
                                         {EMBEDDING: self._embedding_shape})
            rows_read = shard.read_slices(EMBEDDING, ranges)
            _check_finite(rows_read, f"{where} rows")
            return rows_read
        if f"{EMBEDDING}.qs" in shard.entries:  # a Q8Weight table: each row's int8 values and scales
            fields = {name: shard.read_slices(f"{EMBEDDING}.{name}", ranges) for name in ("qs", "scales")}
            header = self._embedding_table(shard)
            subset = Q8Weight(shape=(len(ranges), header.shape[1]), block_size=header.block_size, **fields)
            return Q8Weight.from_dict(subset.to_dict(), name=f"{where} rows")  # every value of these rows checked
        table = self._embedding_table(shard)  # the whole table's small tensors, checked

        def field(name: str) -> str:
            return f"{EMBEDDING}.{name}"

        if table.scales is not None:
            scales = shard.read_slices(field("scales"), ranges).float()
        else:
            codes = shard.read_slices(field("scale_codes"), ranges)  # (r, nb) uint8
            # qweight.decode_double_quant for these rows: a scale's group is its row-major index // 256
            index = rows[:, None] * codes.shape[1] + torch.arange(codes.shape[1])
            group = index // SCALE_GROUP_SIZE
            scales = table.scale_group_min[group] + codes.float() * table.scale_group_step[group]
        ptr = table.outlier_row_ptr.long()
        spans = [(int(ptr[row]), int(ptr[row + 1])) for row in rows.tolist()]
        counts = torch.tensor([end - start for start, end in spans], dtype=torch.int32)
        has_outliers = field("outlier_cols") in shard.entries
        subset = QWeight(
            shape=(len(ranges), table.shape[1]), block_size=table.block_size, method=table.method, codebook=table.codebook,
            codes=shard.read_slices(field("codes"), ranges),
            outlier_row_ptr=torch.cat([torch.zeros(1, dtype=torch.int32), counts.cumsum(0, dtype=torch.int32)]),
            outlier_cols=shard.read_slices(field("outlier_cols"), spans) if has_outliers else table.outlier_cols,
            outlier_vals=shard.read_slices(field("outlier_vals"), spans) if has_outliers else table.outlier_vals,
            scales=scales,
        )
        return QWeight.from_dict(subset.to_dict(), name=f"{where} rows")  # every value of these rows checked

    def _embedding_table(self, shard: SafetensorsFile) -> QWeight | Q8Weight:
        """The quantized embedding's small tensors (meta; for a QWeight also the codebook, scale groups
        and outlier row pointers), read and checked once per file state; the row-sized tensors are
        one-element stand-ins."""
        if self._embedding_index is not None and self._embedding_index[0] == shard.identity:
            return self._embedding_index[1]
        prefix = EMBEDDING + "."
        if prefix + "qs" in shard.entries:  # a Q8Weight: the meta is all there is besides the rows
            header = Q8Weight.from_dict({**shard.read_all([prefix + "meta"]), **{
                prefix + name: _stand_in(shard.entries[prefix + name]) for name in ("qs", "scales")}},
                prefix=prefix, name=f"{shard.path}: {EMBEDDING}", check_values=False)
            self._check_names_and_shapes(EMBEDDING_FILE, {EMBEDDING: header}, {EMBEDDING: self._embedding_shape})
            self._embedding_index = (shard.identity, header)
            return header
        small = ("meta", "codebook", "scale_group_min", "scale_group_step", "outlier_row_ptr")
        fields = shard.read_all([prefix + name for name in small if prefix + name in shard.entries])
        # stand-ins of the right shapes and dtypes for the big fields, so that from_dict checks the rest
        for name in ("codes", "scales", "scale_codes", "outlier_cols", "outlier_vals"):
            entry = shard.entries.get(prefix + name)
            if entry is not None:
                fields[prefix + name] = _stand_in(entry)
        table = QWeight.from_dict(fields, prefix=prefix, name=f"{shard.path}: {EMBEDDING}", check_values=False)
        self._check_names_and_shapes(EMBEDDING_FILE, {EMBEDDING: table}, {EMBEDDING: self._embedding_shape})
        ptr = table.outlier_row_ptr.long()
        nnz = shard.entries[prefix + "outlier_vals"].shape[0] if prefix + "outlier_vals" in shard.entries else 0
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
            raise FormatError(f"{shard.path}: {EMBEDDING}: outlier_row_ptr must rise from 0 to nnz={nnz}")
        for label in ("scale_group_min", "scale_group_step"):
            tensor = getattr(table, label)
            if tensor is not None and not (torch.isfinite(tensor).all() and bool((tensor >= 0).all())):
                raise FormatError(f"{shard.path}: {EMBEDDING}: {label} must be finite and non-negative")
        self._embedding_index = (shard.identity, table)
        return table

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR

    def path_problems(self) -> list[str]:
        """Listed files that exist but are not regular files reached without a symlink (a link out of the
        folder, a FIFO that would block the reader): checked when the folder is opened, and by verify."""
        problems = [f"{TOKENIZER_DIR}: is a symbolic link; quantlite reads only regular files inside {self.path}"
                    ] if os.path.islink(self.path / TOKENIZER_DIR) else []
        for name in self.manifest["files"]:
            try:
                check_regular_file(self.path / name, self.path, FormatError)
            except FormatError as error:
                problems.append(f"{name}: {str(error).replace(str(self.path / name) + ' ', '')}")
        return problems

    # ----------------------------------------------------------------- verification
    def verify(self, progress: bool = False) -> list[str]:
        """Every problem found, one message per file naming it (empty when all is well): missing or extra
        files, sizes, sha256 against the manifest, and each shard's structure against the config."""
        from tqdm import tqdm

        problems = self.path_problems()
        files = self.manifest["files"]
        for name in tqdm(sorted(files), desc="verify", unit="file", disable=not progress):
            file_path = self.path / name
            if any(problem.startswith(name + ":") for problem in problems):
                continue
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
        listed = set(files) | {MANIFEST}
        for folder, subfolders, names in os.walk(self.path):  # symlinks are listed, not followed
            relative = Path(folder).relative_to(self.path).as_posix()
            strays = [name for name in names + [d for d in subfolders if os.path.islink(os.path.join(folder, d))]
                      if (name if relative == "." else f"{relative}/{name}") not in listed]
            problems.extend(f"{name if relative == '.' else f'{relative}/{name}'}: not listed in the manifest"
                            for name in sorted(strays))
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

    def _load(self, name: str, into: torch.Tensor | None = None, direct: bool = False, prepare=None,
              kept: dict | None = None) -> dict[str, torch.Tensor | QWeight]:
        file_path = self.path / name
        size = file_path.stat().st_size if file_path.is_file() else None
        if size != self.manifest["files"][name]["size"]:
            raise FormatError(f"{file_path}: {'missing' if size is None else f'{size} bytes'}, the manifest says {self.manifest['files'][name]['size']}")
        shard = SafetensorsFile(file_path)
        again = kept.pop(name, None) if kept is not None and into is not None else None
        if again is not None and again.identity == shard.identity and (again.entries is shard.entries or again.entries == shard.entries):
            # the same bytes into the same places: the weights built from the last read view them again
            ArenaRead(shard, into, arena_layout(shard), direct).finish()
            kept[name] = again
            return again.grouped
        # the values (scales, codebook, outlier table) are checked in full on the first read of a shard;
        # a later read of the same file unchanged (same inode, size, mtime and ctime; the header is
        # parsed and checked again) checks the structure only: a streamed layer is re-read every token
        unchanged = self._values_checked.get(name) == shard.identity
        if into is None:
            grouped = group_tensors(shard.read_all(), str(file_path), check_values=not unchanged)
        else:
            layout = arena_layout(shard)
            reading = ArenaRead(shard, into, layout, direct)
            try:
                grouped = group_tensors(reading.views(), str(file_path), check_values=not unchanged, ready=reading.wait,
                                        then=None if prepare is None else lambda _, value: prepare(value))
            finally:
                reading.finish(raising=False)
        if not unchanged:
            for tensor_name, value in grouped.items():
                _check_finite(value, f"{file_path}: {tensor_name}")
        self._values_checked[name] = shard.identity
        if kept is not None and into is not None:
            kept[name] = KeptUnit(shard.identity, shard.entries, grouped)
        return grouped

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


@dataclass(frozen=True)
class KeptUnit:
    """What an arena read of a shard built (`load_*(into=arena, kept=d)` stores it in d[shard name]),
    kept for the next read of that shard into the same arena: if the file is still in the state that
    read saw (`identity`, the header's `entries`), its bytes are read into the same places again and
    `grouped` (the weights viewing them, as `prepare` made them) is returned as it is: no views,
    checks or kernel layouts built again. The caller keeps one dict per arena, and drops an entry
    whose weights hold memory outside the arena (a kernel layout's copies: kept, they would stay
    alive between reads, outside the arena the budget counts)."""
    identity: tuple
    entries: dict
    grouped: dict


def _check_finite(value: torch.Tensor | QWeight | Q8Weight, where: str) -> None:
    """docs/FORMAT.md: plain float tensors must be finite (a quantized weight's values are its from_dict's)."""
    if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise FormatError(f"{where} holds NaN or Inf (docs/FORMAT.md: plain tensors must be finite)")


def _stand_in(entry) -> torch.Tensor:
    """One element viewed as a safetensors entry's shape and dtype: enough for the structure checks."""
    return torch.empty((), dtype=entry.dtype).expand(entry.shape)


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
