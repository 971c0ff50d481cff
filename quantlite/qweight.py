"""QWeight: the whole quantized state of one Linear weight, and its flat-dict form (docs/FORMAT.md).

For W (N, K) = (out_features, in_features), block size B along K, K padded up to Kp = ceil(K/B)*B:

    W[n, k] ~= codebook[code(n, k)] * scale(n, k // B) + S[n, k]        for k < K

where S is a sparse matrix of fp16 outliers in CSR form. At an outlier the dense code is the zero
level, so S holds the whole value and the weight dequantizes to it exactly. Padding columns
(K <= k < Kp) hold the zero code and are never part of the result. A weight without outliers
stores no CSR tensors at all (in memory it still has an all-zero row_ptr, which kernels read).

Scales are stored one of two ways:
  * plain: `scales` (N, Kp/B) float16 or float32;
  * double-quantized (QLoRA): `scale_codes` (N, Kp/B) uint8, decoded per group of 256 consecutive
    scales (row-major order) as `scale_group_min[g] + code * scale_group_step[g]`, both float32.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from quantlite.codebook import zero_code
from quantlite.errors import FormatError

FORMAT_NAME = "quantlite.qweight"
FORMAT_VERSION = 1
# The block sizes the format allows; csrc/include/quantlite_checks.h (QL_*_BLOCK_SIZE) says the same.
MIN_BLOCK_SIZE, MAX_BLOCK_SIZE, BLOCK_SIZE_MULTIPLE = 32, 256, 16
SCALE_GROUP_SIZE = 256  # scales per fp32 (min, step) pair in double quantization
MAX_META_BYTES = 4096   # a reader refuses a larger `meta` before parsing it
# Stored together, or (when there are no outliers) not at all.
OUTLIER_FIELDS = ("outlier_row_ptr", "outlier_cols", "outlier_vals")
OUTLIER_CHECK_CHUNK = 1 << 20  # outliers a reader checks at a time (a 405B MLP matrix has 10 M: ~0.4 GB of temporaries at once)


class BlockQuantized:
    """The sizes every block-quantized weight (QWeight, quantlite.q8weight.Q8Weight) derives from its
    shape, block size and flat dict."""

    shape: tuple[int, int]
    block_size: int

    @property
    def n_blocks(self) -> int:
        return -(-self.shape[1] // self.block_size)

    @property
    def padded_k(self) -> int:
        return self.n_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        """Every stored byte: all tensors of to_dict(), metadata included."""
        return sum(t.numel() * t.element_size() for t in self.to_dict().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def _check_tensors(self, expected) -> None:
        """Sizes and dtypes every kernel relies on, checked however the weight was built (a hand-built
        one whose tensors are smaller than its shape would make a native kernel read out of bounds).
        expected() -> {field: (shape, dtypes)}, asked once the shape and block size are sane. Values
        (scales, outliers' columns) are from_dict's to check; this costs no pass over the data."""
        kind = type(self).__name__
        if not (isinstance(self.shape, tuple) and len(self.shape) == 2 and all(isinstance(d, int) and d > 0 for d in self.shape)):
            raise FormatError(f"{kind} shape {self.shape!r} must be two positive integers")
        where = f"{kind}{tuple(self.shape)}"
        if not (isinstance(self.block_size, int) and self.block_size > 0 and self.block_size % 2 == 0):
            raise FormatError(f"{where}: block_size {self.block_size!r} must be a positive even integer")
        device = None
        for field, (shape, dtypes) in expected().items():
            tensor = getattr(self, field)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype not in dtypes:
                got = f"{tuple(tensor.shape)} {tensor.dtype}" if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise FormatError(f"{where}: {field} is {got}, expected {shape} of {', '.join(map(str, dtypes))}")
            device = tensor.device if device is None else device
            if tensor.device != device:
                raise FormatError(f"{where}: {field} is on {tensor.device}, the tensors before it on {device}")


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, so kernels can cache per weight
class QWeight(BlockQuantized):
    shape: tuple[int, int]           # (N, K) of the original weight
    block_size: int                  # B: weights per scale, along K
    method: str                      # "quantlite", "nf4" or "rtn": informational, the math is below
    codebook: torch.Tensor           # (16,) float32, ascending, contains 0.0 exactly once
    codes: torch.Tensor              # (N, Kp // 2) uint8, two codes per byte, low nibble = even column
    outlier_row_ptr: torch.Tensor    # (N + 1,) int32, CSR row pointers into outlier_cols/vals
    outlier_cols: torch.Tensor       # (nnz,) uint16 when K <= 65536 else int32, ascending in a row
    outlier_vals: torch.Tensor       # (nnz,) float16, the whole weight value at that position
    scales: torch.Tensor | None = None            # (N, Kp // B) float16 or float32; None if double-quantized
    scale_codes: torch.Tensor | None = None       # (N, Kp // B) uint8, double-quantized scales
    scale_group_min: torch.Tensor | None = None   # (ceil(N * Kp/B / 256),) float32
    scale_group_step: torch.Tensor | None = None  # (ceil(N * Kp/B / 256),) float32

    def __post_init__(self) -> None:
        self._check_tensors(self._expected_tensors)

    def _expected_tensors(self) -> dict[str, tuple[tuple, tuple]]:
        """{field: (shape, dtypes)} of a QWeight of this shape and block size (docs/FORMAT.md, section 1)."""
        n, nb = self.shape[0], self.n_blocks
        expected = {"codebook": ((16,), (torch.float32,)), "codes": ((n, self.padded_k // 2), (torch.uint8,)),
                    "outlier_row_ptr": ((n + 1,), (torch.int32,)),
                    "outlier_cols": ((self.outlier_vals.numel(),), (torch.uint16, torch.int32)),
                    "outlier_vals": ((self.outlier_cols.numel(),), (torch.float16,))}
        if self.scales is not None:
            expected["scales"] = ((n, nb), (torch.float16, torch.float32))
        else:
            groups = -(-(n * nb) // SCALE_GROUP_SIZE)
            expected.update(scale_codes=((n, nb), (torch.uint8,)), scale_group_min=((groups,), (torch.float32,)),
                            scale_group_step=((groups,), (torch.float32,)))
        return expected

    # ----------------------------------------------------------------- derived sizes
    @property
    def double_quant(self) -> bool:
        return self.scales is None

    @property
    def n_outliers(self) -> int:
        return int(self.outlier_vals.numel())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    # ----------------------------------------------------------------- math
    def block_scales(self) -> torch.Tensor:
        """(N, Kp // B) float32: the scales the math uses, decoded from double quantization if needed.
        This is also the layout every kernel takes."""
        if self.scales is not None:
            return self.scales.float()
        return decode_double_quant(self.scale_codes, self.scale_group_min, self.scale_group_step)

    def unpacked_codes(self) -> torch.Tensor:
        """(N, Kp) uint8, one code per weight (padding columns included)."""
        low = self.codes & 0x0F
        high = self.codes >> 4
        return torch.stack([low, high], dim=-1).reshape(self.shape[0], self.padded_k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) tensor of the given dtype. Computed in float32 (float64 if asked), outliers exact."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        n, k = self.shape
        levels = self.codebook.to(compute)[self.unpacked_codes().long()]
        scales = self.block_scales().to(compute).repeat_interleave(self.block_size, dim=1)
        dense = (levels * scales)[:, :k]
        if self.n_outliers:
            rows = torch.repeat_interleave(
                torch.arange(n, device=self.device), torch.diff(self.outlier_row_ptr.long())
            )
            dense[rows, self.outlier_cols.long()] += self.outlier_vals.to(compute)
        return dense.to(dtype)

    def dequantize_rows(self, rows: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(rows), K): the rows (r,) int64 of dequantize(), bit for bit, decoding those rows only."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        n_blocks = self.padded_k // self.block_size
        codes = self.codes[rows]  # (r, Kp // 2) uint8, low nibble = even column
        levels = self.codebook.to(compute)[torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(len(rows), -1).long()]
        if self.scales is not None:
            scales = self.scales[rows].float()
        else:  # decode_double_quant for these rows: a scale's group is its row-major index // 256
            group = (rows[:, None] * n_blocks + torch.arange(n_blocks, device=rows.device)) // SCALE_GROUP_SIZE
            scales = self.scale_group_min[group] + self.scale_codes[rows].float() * self.scale_group_step[group]
        dense = (levels * scales.to(compute).repeat_interleave(self.block_size, dim=1))[:, : self.shape[1]]
        row_ptr = self.outlier_row_ptr.long()
        for i, row in enumerate(rows.tolist()):
            start, end = int(row_ptr[row]), int(row_ptr[row + 1])
            if end > start:
                dense[i, self.outlier_cols[start:end].long()] += self.outlier_vals[start:end].to(compute)
        return dense.to(dtype)

    def to(self, device: torch.device | str) -> "QWeight":
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
        return replace(self, **{k: v for k, v in moved.items() if isinstance(v, torch.Tensor)})

    # ----------------------------------------------------------------- flat dict
    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat {name: tensor}; names are prefix + the field names of docs/FORMAT.md. Without
        outliers the three CSR tensors are left out (they would hold nothing but N + 1 zeros)."""
        meta = _meta_json(self.shape, self.block_size, self.method)
        out = {"meta": torch.frombuffer(bytearray(meta), dtype=torch.uint8)}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and not (f.name in OUTLIER_FIELDS and self.n_outliers == 0):
                out[f.name] = value
        return {prefix + name: tensor.contiguous() for name, tensor in out.items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "", name: str | None = None,
                  check_values: bool = True) -> "QWeight":
        """Validate (docs/FORMAT.md, "What a reader must reject") and build. Raises FormatError.
        check_values=False checks the structure only (meta, names, shapes, dtypes), not the values
        (codebook, scales, outlier table): for bytes that already passed the full check, e.g. a shard
        re-read unchanged (quantlite.packed)."""
        fail, get = field_reader(tensors, prefix, name or prefix.rstrip(".") or "qweight")
        meta = parse_meta(get("meta"), fail)
        if not isinstance(meta.get("method"), str):
            raise fail("'meta' must name the method")
        n, k = meta["shape"]
        block = meta["block_size"]
        n_blocks = -(-k // block)
        kp = n_blocks * block

        codebook = get("codebook")
        _expect(codebook, (16,), (torch.float32,), "codebook", fail)
        if check_values and (not torch.isfinite(codebook).all() or not bool((codebook[1:] > codebook[:-1]).all())):
            raise fail("codebook must be 16 finite ascending float32 levels")
        if check_values and int((codebook == 0).sum()) != 1:
            raise fail("codebook must contain the level 0.0 exactly once")

        codes = get("codes")
        _expect(codes, (n, kp // 2), (torch.uint8,), "codes", fail)

        scales = get("scales", required=False)
        scale_codes = get("scale_codes", required=False)
        group_min = get("scale_group_min", required=False)
        group_step = get("scale_group_step", required=False)
        if (scales is None) == (scale_codes is None):
            raise fail("exactly one of 'scales' and 'scale_codes' must be present")
        if scales is not None:
            _expect(scales, (n, n_blocks), (torch.float16, torch.float32), "scales", fail)
        if scales is not None and check_values:
            lowest, highest = torch.aminmax(scales)  # one pass; a NaN makes both NaN
            if not (math.isfinite(float(highest)) and float(lowest) >= 0):
                raise fail("scales must be finite and non-negative")
        if scales is None:
            n_groups = -(-(n * n_blocks) // SCALE_GROUP_SIZE)
            _expect(scale_codes, (n, n_blocks), (torch.uint8,), "scale_codes", fail)
            for label, tensor in (("scale_group_min", group_min), ("scale_group_step", group_step)):
                if tensor is None:
                    raise fail(f"double-quantized scales need '{prefix + label}'")
                _expect(tensor, (n_groups,), (torch.float32,), label, fail)
                if check_values and (not torch.isfinite(tensor).all() or bool((tensor < 0).any())):
                    raise fail(f"{label} must be finite and non-negative (scales decode to min + code * step)")
            if not torch.isfinite(group_min + 255 * group_step).all():  # the largest code, in float32 as decoded
                raise fail("double-quantized scales decode to Inf (scale_group_min + 255 * scale_group_step overflows)")

        col_dtype = torch.uint16 if k <= 65536 else torch.int32
        row_ptr, cols, vals = (get(field, required=False) for field in OUTLIER_FIELDS)
        present = [field for field, tensor in zip(OUTLIER_FIELDS, (row_ptr, cols, vals)) if tensor is not None]
        if not present:  # no outliers: nothing stored
            row_ptr = torch.zeros(n + 1, dtype=torch.int32)
            cols, vals = torch.zeros(0, dtype=col_dtype), torch.zeros(0, dtype=torch.float16)
        elif len(present) < len(OUTLIER_FIELDS):
            missing = [prefix + field for field in OUTLIER_FIELDS if field not in present]
            raise fail(f"the outlier tensors come all three or not at all; missing {', '.join(repr(m) for m in missing)}")
        _expect(row_ptr, (n + 1,), (torch.int32,), "outlier_row_ptr", fail)
        if cols.dim() != 1 or vals.dim() != 1 or cols.numel() != vals.numel():
            raise fail(f"outlier_cols {tuple(cols.shape)} and outlier_vals {tuple(vals.shape)} must be 1-D of one length")
        _expect(cols, (cols.numel(),), (col_dtype,), "outlier_cols", fail)
        _expect(vals, (vals.numel(),), (torch.float16,), "outlier_vals", fail)
        nnz = vals.numel()

        def build() -> "QWeight":
            return cls(
                shape=(n, k), block_size=block, method=meta["method"], codebook=codebook, codes=codes,
                outlier_row_ptr=row_ptr, outlier_cols=cols, outlier_vals=vals, scales=scales,
                scale_codes=scale_codes, scale_group_min=group_min, scale_group_step=group_step,
            )

        if not check_values:
            return build()
        ptr = row_ptr.long()
        if int(ptr[0]) != 0 or int(ptr[-1]) != nnz:
            raise fail(f"outlier_row_ptr must start at 0 and end at nnz={nnz}, got {int(ptr[0])}..{int(ptr[-1])}")
        if bool((ptr[1:] < ptr[:-1]).any()):
            raise fail("outlier_row_ptr decreases")
        zero, first = zero_code(codebook), 0
        while first < n:  # rows holding up to OUTLIER_CHECK_CHUNK outliers (or one row) at a time: bounded temporaries
            last = min(n, max(first + 1, int(torch.searchsorted(ptr, ptr[first] + OUTLIER_CHECK_CHUNK, right=True)) - 1))
            begin, end = int(ptr[first]), int(ptr[last])
            _check_outlier_rows(codes[first:last], ptr[first : last + 1] - begin, cols[begin:end], vals[begin:end], k, zero, fail)
            first = last
        return build()

    def save(self, path: str | Path) -> None:
        """One QWeight as a safetensors file (names without prefix)."""
        from safetensors.torch import save_file

        save_file({k: v.cpu() for k, v in self.to_dict().items()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> "QWeight":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise FormatError(f"{path}: not a readable safetensors file ({error})") from error
        return cls.from_dict(tensors, name=str(path))

    def __repr__(self) -> str:
        scales = "double-quantized" if self.double_quant else str(self.scales.dtype).replace("torch.", "")
        return (
            f"QWeight(shape={self.shape}, method={self.method!r}, block_size={self.block_size}, "
            f"scales={scales}, outliers={self.n_outliers}, bits_per_weight={self.bits_per_weight:.3f})"
        )


def _check_outlier_rows(codes: torch.Tensor, ptr: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, k: int, zero: int, fail) -> None:
    """from_dict's checks of the outliers of some rows: codes (r, Kp // 2) uint8, ptr (r + 1,) int64
    from 0 (non-decreasing, checked), cols and vals (ptr[-1],) as stored."""
    nnz = cols.numel()
    if not nnz:
        return
    col = cols.long() if cols.dtype != torch.uint16 else cols.to(torch.int32).long()
    if int(col.min()) < 0 or int(col.max()) >= k:
        raise fail(f"an outlier column is outside [0, {k})")
    same_row = torch.ones(nnz, dtype=torch.bool)
    same_row[ptr[1:-1][ptr[1:-1] < nnz]] = False  # first entry of each row starts a new run
    if bool(((col[1:] <= col[:-1]) & same_row[1:]).any()):
        raise fail("outlier columns must be strictly ascending within a row")
    if not torch.isfinite(vals).all():
        raise fail("outlier values must be finite")
    rows = torch.repeat_interleave(torch.arange(codes.shape[0]), torch.diff(ptr))
    under = (codes[rows, col // 2] >> (4 * (col % 2)).to(torch.uint8)) & 0x0F
    if bool((under != zero).any()):
        raise fail("the dense code under an outlier must be the zero level's code")


def concat_rows(parts: list[QWeight]) -> QWeight:
    """One QWeight whose rows are the rows of `parts` in order: the same dequantized values.

    The parts must share K, the block size and the codebook. Double-quantized scales are joined as
    they are when every part but the last holds whole groups of SCALE_GROUP_SIZE scales (the
    converter's row chunks do); otherwise the result keeps decoded float32 scales (the layout the
    kernels use anyway), since a group cannot straddle two parts' (min, step) pairs."""
    first = parts[0]
    for part in parts[1:]:
        if (part.shape[1], part.block_size) != (first.shape[1], first.block_size) or not torch.equal(part.codebook, first.codebook):
            raise ValueError(f"concat_rows: a ({part.shape}, B={part.block_size}) part does not match "
                             f"the first ({first.shape}, B={first.block_size}) in K, block size or codebook")
    if len(parts) == 1:
        return first
    offsets = torch.cumsum(torch.tensor([0] + [p.n_outliers for p in parts[:-1]]), 0)
    row_ptr = torch.cat([first.outlier_row_ptr[:1]] + [
        p.outlier_row_ptr[1:] + int(offset) for p, offset in zip(parts, offsets)
    ]).to(torch.int32)
    groups_align = all(p.scale_codes is not None and p.scale_codes.numel() % SCALE_GROUP_SIZE == 0 for p in parts[:-1])
    if any(p.double_quant for p in parts) and not (all(p.double_quant for p in parts) and groups_align):
        scales = {"scales": torch.cat([p.block_scales() for p in parts])}
    else:
        scales = {name: None if getattr(first, name) is None else torch.cat([getattr(p, name) for p in parts])
                  for name in ("scales", "scale_codes", "scale_group_min", "scale_group_step")}
    return QWeight(
        shape=(sum(p.shape[0] for p in parts), first.shape[1]), block_size=first.block_size, method=first.method,
        codebook=first.codebook, codes=torch.cat([p.codes for p in parts]), outlier_row_ptr=row_ptr,
        outlier_cols=torch.cat([p.outlier_cols for p in parts]), outlier_vals=torch.cat([p.outlier_vals for p in parts]),
        **scales,
    )


def field_reader(tensors: dict[str, torch.Tensor], prefix: str, where: str):
    """(fail, get) for a from_dict: fail(message) is a FormatError naming `where`; get(field,
    required=True) is the tensor stored under prefix + field, or None when absent and not required."""
    def fail(message: str) -> FormatError:
        return FormatError(f"{where}: {message}")

    def get(field: str, required: bool = True) -> torch.Tensor | None:
        tensor = tensors.get(prefix + field)
        if tensor is None and required:
            raise fail(f"missing tensor '{prefix + field}'")
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise fail(f"'{prefix + field}' is not a tensor")
        return tensor

    return fail, get


def decode_double_quant(
    scale_codes: torch.Tensor, scale_group_min: torch.Tensor, scale_group_step: torch.Tensor
) -> torch.Tensor:
    """(N, nb) uint8 codes -> (N, nb) float32 scales: min + code * step of the code's group of 256."""
    flat = scale_codes.reshape(-1).float()
    groups = scale_group_min.numel()
    # as (groups, 256) rows, broadcasting each group's (min, step): no gathered index tensor (the
    # gather cost 64 ms per SmolLM2 tensor on a loaded 2-core machine, the streamed loader's largest cost)
    padded = torch.nn.functional.pad(flat, (0, groups * SCALE_GROUP_SIZE - flat.numel())).view(groups, SCALE_GROUP_SIZE)
    decoded = scale_group_min[:, None] + padded * scale_group_step[:, None]
    return decoded.reshape(-1)[: flat.numel()].reshape(scale_codes.shape)


def stored_nbytes(
    shape: tuple[int, int], block_size: int, method: str, *, double_quant: bool, scale_dtype: torch.dtype,
    n_outliers: int,
) -> int:
    """The bytes a QWeight of these settings stores (its `nbytes`), computed without building it:
    the quantizer sizes the outlier table to a bit budget with this."""
    n, k = shape
    n_blocks = -(-k // block_size)
    size = len(_meta_json(shape, block_size, method)) + 16 * 4 + n * n_blocks * block_size // 2  # meta, codebook, codes
    if double_quant:
        size += n * n_blocks + 2 * 4 * -(-(n * n_blocks) // SCALE_GROUP_SIZE)  # codes + fp32 (min, step) per group
    else:
        size += n * n_blocks * torch.finfo(scale_dtype).bits // 8
    if n_outliers:
        column_bytes = 2 if k <= 65536 else 4
        size += 4 * (n + 1) + n_outliers * (column_bytes + 2)  # int32 row_ptr, columns, fp16 values
    return size


def block_size_problem(block_size: object) -> str | None:
    """Why `block_size` is not a block size the format allows, or None: the one statement of the rule."""
    if _is_int(block_size) and MIN_BLOCK_SIZE <= block_size <= MAX_BLOCK_SIZE and block_size % BLOCK_SIZE_MULTIPLE == 0:
        return None
    return f"block_size {block_size!r} must be a multiple of {BLOCK_SIZE_MULTIPLE} in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}]"


def _meta_json(shape: tuple[int, int], block_size: int, method: str) -> bytes:
    meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "shape": list(shape), "block_size": block_size, "method": method}
    return json.dumps(meta, sort_keys=True).encode()


def parse_meta(meta: torch.Tensor, fail, format_name: str = FORMAT_NAME, version: int = FORMAT_VERSION) -> dict:
    """The checks every quantized format's `meta` shares (JSON, format, version, shape, block size)."""
    if meta.dtype != torch.uint8 or meta.dim() != 1 or meta.numel() > MAX_META_BYTES:
        raise fail(f"'meta' must be 1-D uint8 of at most {MAX_META_BYTES} bytes")
    try:
        parsed = json.loads(bytes(meta.tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise fail(f"'meta' is not UTF-8 JSON ({error})") from error
    if not isinstance(parsed, dict) or parsed.get("format") != format_name:
        raise fail(f"'meta' does not describe a {format_name}")
    if not _is_int(parsed.get("version")) or parsed["version"] != version:
        raise fail(f"{format_name} version {parsed.get('version')!r} is not supported (this reader knows {version})")
    shape = parsed.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and 0 < v < 2**31 for v in shape)):
        raise fail(f"shape {shape!r} must be two positive integers below 2**31")
    block = parsed.get("block_size")
    if problem := block_size_problem(block):
        raise fail(problem)
    if math.prod(shape) > 2**40:
        raise fail(f"shape {shape} is absurdly large")
    return parsed


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(tensor: torch.Tensor, shape: tuple, dtypes: tuple, label: str, fail) -> None:
    if tensor.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise fail(f"{label} has dtype {str(tensor.dtype).replace('torch.', '')}, expected {allowed}")
    if tuple(tensor.shape) != tuple(shape):
        raise fail(f"{label} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")

