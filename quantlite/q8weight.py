"""Q8Weight: a weight in block-scaled int8, and quantize_int8(w) that makes one (docs/FORMAT.md, section 1b).

For W (N, K), block size B along K, K padded up to Kp = ceil(K/B)*B:

    W[n, k] ~= qs[n, k] * scales[n, k // B]        for k < K

symmetric: scale = absmax(block) / 127 rounded to float16, qs = round(w / scale) in [-127, 127];
padding columns hold 0. This is llama.cpp's Q8_0 with a free block size. It is the default width of the
output head and the embedding (docs/accuracy.md: the 4-bit head costs more than 1 % perplexity on both
models measured, int8 about 0.1 %).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import torch

from quantlite.errors import QuantizationInputError
from quantlite.qweight import (
    MAX_META_BYTES, BlockQuantized, QWeight, _expect, block_size_problem,
    field_reader, parse_meta,
)

FORMAT_NAME = "quantlite.q8weight"
FORMAT_VERSION = 1
QMAX = 127  # symmetric: -128 is never written, so -w quantizes to -q
METHOD = "int8"


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, like QWeight
class Q8Weight(BlockQuantized):
    shape: tuple[int, int]   # (N, K) of the original weight
    block_size: int          # B: weights per scale, along K
    qs: torch.Tensor         # (N, Kp) int8, in [-127, 127], padding columns 0
    scales: torch.Tensor     # (N, Kp // B) float16, finite, >= 0

    method = METHOD          # what the manifest and repr call it
    n_outliers = 0           # the interface QWeight offers to size reports

    def __post_init__(self) -> None:
        self._check_tensors(lambda: {"qs": ((self.shape[0], self.padded_k), (torch.int8,)),
                                     "scales": ((self.shape[0], self.n_blocks), (torch.float16,))})

    @property
    def device(self) -> torch.device:
        return self.qs.device

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(N, K) tensor of the given dtype, computed in float32 (float64 if asked)."""
        return self.dequantize_rows(None, dtype)

    def dequantize_rows(self, rows: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(len(rows), K): the selected rows of dequantize() (all rows for None), without the others."""
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        qs, scales = (self.qs, self.scales) if rows is None else (self.qs[rows], self.scales[rows])
        dense = qs.to(compute).reshape(qs.shape[0], self.n_blocks, self.block_size) * scales.to(compute)[..., None]
        return dense.reshape(qs.shape[0], self.padded_k)[:, :self.shape[1]].to(dtype)

    def to(self, device: torch.device | str) -> "Q8Weight":
        return replace(self, qs=self.qs.to(device), scales=self.scales.to(device))

    # ----------------------------------------------------------------- flat dict
    def to_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        meta = json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION, "shape": list(self.shape),
                           "block_size": self.block_size}, sort_keys=True).encode()
        out = {"meta": torch.frombuffer(bytearray(meta), dtype=torch.uint8), "qs": self.qs, "scales": self.scales}
        return {prefix + name: tensor.contiguous() for name, tensor in out.items()}

    @classmethod
    def from_dict(cls, tensors: dict[str, torch.Tensor], prefix: str = "", name: str | None = None,
                  check_values: bool = True) -> "Q8Weight":
        """Validate (docs/FORMAT.md, section 1b) and build. Raises FormatError naming the tensor.
        check_values=False checks the structure only (as QWeight.from_dict)."""
        fail, get = field_reader(tensors, prefix, name or prefix.rstrip(".") or "q8weight")
        meta = parse_meta(get("meta"), fail, FORMAT_NAME, FORMAT_VERSION)
        (n, k), block = meta["shape"], meta["block_size"]
        n_blocks = -(-k // block)
        qs, scales = get("qs"), get("scales")
        _expect(qs, (n, n_blocks * block), (torch.int8,), "qs", fail)
        _expect(scales, (n, n_blocks), (torch.float16,), "scales", fail)
        if check_values:
            if bool((qs == -128).any()):
                raise fail(f"qs holds -128; the symmetric range is [-{QMAX}, {QMAX}]")
            lowest, highest = torch.aminmax(scales.float())  # a NaN makes both NaN
            if not (math.isfinite(float(highest)) and float(lowest) >= 0):
                raise fail("scales must be finite and non-negative")
        return cls(shape=(n, k), block_size=block, qs=qs, scales=scales)

    def __repr__(self) -> str:
        return (f"Q8Weight(shape={self.shape}, block_size={self.block_size}, "
                f"bits_per_weight={self.bits_per_weight:.3f})")


def quantize_int8(w: torch.Tensor, block_size: int = 64, name: str | None = None) -> Q8Weight:
    """W (N, K) float -> Q8Weight: per block of `block_size` along K, scale = absmax / 127 (float16),
    q = round(w / scale) clamped to [-127, 127] (the float16 rounding of the scale may put |w / scale|
    a hair above 127). Computed in float64 so the result does not depend on the input's dtype."""
    label = f"{name}: " if name else ""
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or not w.is_floating_point() or w.numel() == 0:
        raise QuantizationInputError(f"{label}quantize_int8 needs a non-empty 2-D float tensor, got "
                                     f"{getattr(w, 'shape', type(w).__name__)}")
    if problem := block_size_problem(block_size):
        raise QuantizationInputError(f"{label}{problem}")
    if not bool(torch.isfinite(w).all()):
        raise QuantizationInputError(f"{label}the weight holds NaN or infinity")
    n, k = w.shape
    n_blocks = -(-k // block_size)
    blocks = torch.nn.functional.pad(w.detach().cpu().double(), (0, n_blocks * block_size - k))
    blocks = blocks.reshape(n, n_blocks, block_size)  # (N, nb, B) float64
    scales = (blocks.abs().amax(-1) / QMAX).to(torch.float16)  # (N, nb)
    if not bool(torch.isfinite(scales).all()):
        raise QuantizationInputError(f"{label}a weight beyond {127 * 65504:.3g} does not fit int8 with a float16 scale")
    divisor = scales.double().clamp_min(torch.finfo(torch.float16).smallest_normal * 2**-10)[..., None]
    qs = (blocks / divisor).round().clamp(-QMAX, QMAX).to(torch.int8)
    return Q8Weight(shape=(n, k), block_size=block_size, qs=qs.reshape(n, -1), scales=scales)


def read_quantized(tensors: dict[str, torch.Tensor], prefix: str, name: str, check_values: bool = True) -> QWeight | Q8Weight:
    """The quantized weight stored under `prefix` (its `meta` says which format), validated."""
    meta = tensors.get(prefix + "meta")
    try:
        kind = json.loads(bytes(meta.tolist()).decode("utf-8")).get("format") if meta.numel() <= MAX_META_BYTES else None
    except (AttributeError, TypeError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError):
        kind = None  # QWeight.from_dict names what is wrong with it
    return (Q8Weight if kind == FORMAT_NAME else QWeight).from_dict(tensors, prefix=prefix, name=name, check_values=check_values)
