"""The block-size rule is stated once in Python (qweight.block_size_problem) and once in C
(csrc/include/quantlite_checks.h): both accept exactly the same sizes, and every entry point that takes
a block size (quantize, quantize_int8, convert, the QWeight reader, the C library) asks that rule."""
import re

import pytest
import torch

from quantlite.codebook import nf4_codebook
from quantlite.errors import ConversionError, QuantizationInputError
from quantlite.q8weight import quantize_int8
from quantlite.quantizer import MAX_OUTLIER_FRAC, outlier_frac_problem, quantize
from quantlite.qweight import MAX_BLOCK_SIZE, block_size_problem

SIZES = range(0, 2 * MAX_BLOCK_SIZE + 33, 8)


def test_python_and_the_c_library_accept_the_same_block_sizes():
    native = pytest.importorskip("quantlite.kernels.native")
    if native.cpu_status() is not None:
        pytest.skip(f"native CPU library not available: {native.cpu_status()}")
    codebook = nf4_codebook().float()
    for size in SIZES:
        width = max(size, 8)
        try:
            native.encode_codes(torch.zeros(2, width), torch.ones(2, 1), codebook, width)
            c_accepts = size == width
        except native.NativeKernelError as error:
            assert "block_size must be a multiple of 16" in str(error)
            c_accepts = False
        assert c_accepts == (block_size_problem(size) is None), size


@pytest.mark.parametrize("size", [16, 24, 40, 272, 4096])
def test_every_python_entry_point_refuses_what_the_rule_refuses(size, tmp_path):
    import quantlite

    w = torch.randn(4, 64)
    message = block_size_problem(size)
    assert message is not None
    with pytest.raises(QuantizationInputError, match=re.escape(message)):
        quantize(w, block_size=size)
    with pytest.raises(QuantizationInputError, match=f"block_size {size} "):
        quantize_int8(w, size)
    with pytest.raises(ConversionError, match=f"block_size {size} "):
        quantlite.convert(tmp_path / "missing", tmp_path / "out", block_size=size, progress=False)
    assert not (tmp_path / "out").exists()


def test_outlier_fraction_rule():
    assert outlier_frac_problem(0.0) is None and outlier_frac_problem(MAX_OUTLIER_FRAC) is None
    assert outlier_frac_problem(MAX_OUTLIER_FRAC + 1e-9) and outlier_frac_problem(-1e-9)
    with pytest.raises(QuantizationInputError, match="outlier_frac"):
        quantize(torch.randn(4, 64), outlier_frac=0.5)
