"""Block-diagonal random-sign Hadamard rotation along K, for the data-free study only (issue 16).

For W (N, K) and an orthogonal T = diag(signs) · H_B / sqrt(B) applied to each full block of B
columns (a tail shorter than B is left as it is):

    y = x W^T = (x T)(W T)^T,

so a kernel that rotates x per block the same way computes with the rotated weight W T. The study
quantizes W T and maps the dequantized result back (· T^T), which is the weight such a kernel
effectively uses. It is not part of the product: docs/accuracy.md ("Data-free: what each part buys")
measured that it makes the data-free default worse on SmolLM2 and no better on stories260K.
"""
from __future__ import annotations

import math

import torch


def hadamard(size: int) -> torch.Tensor:
    """(size, size) float64 Sylvester Hadamard matrix divided by sqrt(size): orthogonal and symmetric."""
    if size < 1 or size & (size - 1):
        raise ValueError(f"a Hadamard size must be a power of two, got {size}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(size)


def random_signs(k: int, seed: int = 0) -> torch.Tensor:
    """(k,) float64 of +-1, one per input column, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 2, (k,), generator=generator) * 2 - 1).to(torch.float64)


def rotate(w: torch.Tensor, block: int = 64, seed: int = 0, inverse: bool = False) -> torch.Tensor:
    """w (N, K) -> w T (inverse: w T^T), float64; columns past the last full block unchanged."""
    n, k = w.shape
    full = k // block * block
    h, signs = hadamard(block), random_signs(full, seed)
    out = w.to(torch.float64).clone()
    if inverse:
        out[:, :full] = (out[:, :full].view(n, -1, block) @ h.T).reshape(n, full) * signs
    else:
        out[:, :full] = ((out[:, :full] * signs).view(n, -1, block) @ h).reshape(n, full)
    return out


def rotated_quantizer(quantize_one, block: int = 64, tensor_types: tuple[str, ...] | None = None):
    """Wrap quantize_one(w, name) -> QWeight so the listed tensor types (e.g. "v_proj"; None: all) are
    quantized in the rotated basis. The returned object's dequantize() maps back to the original basis."""

    def quantize_rotated(w: torch.Tensor, name: str):
        if tensor_types is not None and not any(t in name for t in tensor_types):
            return quantize_one(w, name)
        return _Rotated(quantize_one(rotate(w, block).to(torch.float32), name), block)

    return quantize_rotated


class _Rotated:
    """A QWeight of W T behind the attributes fake quantization reads (nbytes, n_outliers, dequantize)."""

    def __init__(self, qweight, block: int):
        self.qweight, self.block = qweight, block
        self.nbytes, self.n_outliers = qweight.nbytes, qweight.n_outliers

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return rotate(self.qweight.dequantize(torch.float32), self.block, inverse=True).to(dtype)
