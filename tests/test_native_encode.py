"""encode_codes (the quantizer's fast path) equals the torch computation of quantlite/quantizer.py bit
for bit: normalized = w * r with r = 1 / max(scale, FLT_MIN) for scale > 0 else 0 (a float32 multiply
by the float32 reciprocal), code = the number of float32 midpoints strictly below it, packed two per
byte with the even column in the low nibble. The reference below spells that out in torch, so the
test does not depend on how quantize.py is wired."""
from __future__ import annotations

import pytest
import torch

from quantlite.codebook import int4_codebook, nf4_codebook
from quantlite.kernels import native
from quantlite.kernels.native import NativeKernelError

from test_native_helpers import ISAS, library_built  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("library_built")


def torch_codes(blocks: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, block_size: int) -> torch.Tensor:
    n = blocks.shape[0]
    reciprocal = torch.where(scales > 0, 1.0 / scales.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
    normalized = blocks.view(n, -1, block_size) * reciprocal.unsqueeze(2)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints).to(torch.uint8).reshape(n, -1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def tricky_blocks(generator, n: int, padded_k: int, block_size: int, codebook: torch.Tensor):
    """(blocks, scales): random blocks with absmax scales, plus blocks that hit every edge case."""
    n_blocks = padded_k // block_size
    blocks = torch.randn(n, n_blocks, block_size, generator=generator)
    scales = blocks.abs().amax(dim=2)
    midpoints = (codebook[1:] + codebook[:-1]) / 2
    # an all-zero block with a zero scale, and a zero scale over non-zero weights (-> zero code)
    blocks[0, 0] = 0.0
    scales[0, 0] = 0.0
    scales[1, 0] = 0.0
    # values exactly on every midpoint: a power-of-two scale makes w * (1 / scale) exact
    power = 2.0 ** torch.randint(-8, 8, (1,), generator=generator).item()
    on_midpoints = midpoints.repeat(block_size // 15 + 1)[:block_size] * power
    blocks[2, 0] = on_midpoints
    scales[2, 0] = power
    # +-1 after normalising: the absmax weight itself, and its neighbours one ulp away
    blocks[3, 0, :4] = torch.tensor([1.0, -1.0, 1.0 + 2**-23, -(1.0 - 2**-24)]) * power
    scales[3, 0] = power
    # a subnormal scale (the reciprocal is clamped to 1 / FLT_MIN) and negative zeros
    scales[4, 0] = 1e-40
    blocks[4, 0] = torch.randn(block_size, generator=generator) * 1e-40
    blocks[5, 0, ::2] = -0.0
    return blocks.reshape(n, padded_k).contiguous(), scales.contiguous()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("codebook_name", ["nf4", "int4"])
@pytest.mark.parametrize("block_size", [32, 48, 64, 256])
def test_codes_equal_torch_bit_for_bit(generator, isa, codebook_name, block_size):
    codebook = nf4_codebook() if codebook_name == "nf4" else int4_codebook()
    padded_k = block_size * 3
    blocks, scales = tricky_blocks(generator, 37, padded_k, block_size, codebook)
    codes = native.encode_codes(blocks, scales, codebook, block_size, isa=isa)
    assert codes.shape == (37, padded_k // 2) and codes.dtype == torch.uint8
    assert torch.equal(codes, torch_codes(blocks, scales, codebook, block_size))
    # the (N, Kp / B, B) view quantize.py holds is accepted as well
    assert torch.equal(native.encode_codes(blocks.view(37, 3, block_size), scales, codebook, block_size, isa=isa), codes)


def test_codes_equal_torch_on_a_large_matrix_with_threads(generator):
    codebook = nf4_codebook()
    blocks = torch.randn(513, 1024, generator=generator)
    scales = blocks.view(513, 16, 64).abs().amax(dim=2) * 0.9  # shrunken scales: values beyond +-1 too
    for n_threads in (1, 2):
        codes = native.encode_codes(blocks, scales, codebook, 64, n_threads=n_threads)
        assert torch.equal(codes, torch_codes(blocks, scales, codebook, 64))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weighted", [False, True])
def test_block_errors(generator, isa, weighted):
    # errors are summed in float64 and rounded once; torch's float32 sum differs by a few ulps, so
    # the reference sums in float64 too and the comparison allows 2 ulps of float32.
    codebook = nf4_codebook()
    block_size, padded_k = 64, 320
    blocks, scales = tricky_blocks(generator, 23, padded_k, block_size, codebook)
    weight = torch.rand(padded_k, generator=generator) * 3 if weighted else None
    codes, errors = native.encode_codes(blocks, scales, codebook, block_size, weight, want_errors=True, isa=isa)
    unpacked = torch.stack([codes & 15, codes >> 4], dim=-1).reshape(23, padded_k).long()
    level_times_scale = codebook[unpacked] * scales.repeat_interleave(block_size, dim=1)   # float32, as quantize.py
    squared = (blocks - level_times_scale).double() ** 2
    if weighted:
        squared = squared * weight.double()
    expected = squared.view(23, -1, block_size).sum(dim=2).float()  # rounded once, like the library
    assert errors.shape == (23, padded_k // block_size) and errors.dtype == torch.float32
    torch.testing.assert_close(errors, expected, rtol=2**-22, atol=0.0)
    assert (errors > 0).any()


def test_bad_arguments():
    codebook = nf4_codebook()
    with pytest.raises(NativeKernelError, match="Kp=100 is not a multiple of block_size=64"):
        native.encode_codes(torch.zeros(2, 100), torch.zeros(2, 1), codebook, 64)
    with pytest.raises(NativeKernelError, match=r"scales must be float32 \(2, 2\)"):
        native.encode_codes(torch.zeros(2, 128), torch.zeros(2, 3), codebook, 64)
    with pytest.raises(NativeKernelError, match="blocks must be a 2-D float32"):
        native.encode_codes(torch.zeros(2, 128, dtype=torch.float16), torch.zeros(2, 2), codebook, 64)
    with pytest.raises(NativeKernelError, match=r"column_weight must be float32 \(128,\)"):
        native.encode_codes(torch.zeros(2, 128), torch.zeros(2, 2), codebook, 64, torch.ones(64))
    with pytest.raises(NativeKernelError, match="block_size must be a multiple of 16"):
        native.encode_codes(torch.zeros(2, 120), torch.zeros(2, 5), codebook, 24)
