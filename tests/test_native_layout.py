"""The CPU kernels on the weight as stored (issue 19: no widened copies): every scale storage
(float32, float16, double-quantized) and outlier storage (uint16 / int32 columns, float16 / float32
values) through every instruction set, against the float64 reference of test_native (the same
derived tolerance); the CSR checks the kernels make as they read it; the layout's memory."""
from __future__ import annotations

import ctypes
from dataclasses import replace

import pytest
import torch

from quantlite.kernels import native
from quantlite.kernels.prepared import compute_ready, layout_extra_nbytes, prepare
from quantlite.qweight import QWeight

from test_native import assert_matches_reference, random_weight
from test_native_helpers import ISAS, library_built  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("library_built")

SCALE_STORAGE = {"float32": dict(scale_dtype=torch.float32, double_quant=False),
                 "float16": dict(scale_dtype=torch.float16, double_quant=False),
                 "double-quantized": dict(double_quant=True)}


def stored_weight(generator, n, k, block_size, scales, outlier_frac=0.02) -> QWeight:
    from quantlite.quantizer import quantize

    w = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator).add(0.1)
    w += (torch.rand(n, k, generator=generator) < 0.01) * torch.randn(n, k, generator=generator) * 8
    qw = quantize(w, block_size=block_size, outlier_frac=outlier_frac, **SCALE_STORAGE[scales])
    assert (qw.scales is None) == (scales == "double-quantized")
    return qw


def run_layout(layout, x: torch.Tensor, isa: str) -> torch.Tensor:
    """y = x @ W^T through the library on an explicit layout (its struct built here)."""
    weight = native._struct(layout)
    y = torch.full((x.shape[0], layout.n), float("nan"))
    status = native._cpu_library().ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), x.shape[0], x.shape[1],
                                                  y.data_ptr(), layout.n, 0, native.ISA_TAGS[isa], 2)
    assert status == 0, native._cpu_library().ql_error_string(status).decode()
    return y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("scales", SCALE_STORAGE)
@pytest.mark.parametrize("n, k, block_size", [(37, 127, 64), (70, 576, 64), (33, 383, 128), (5, 1024, 256)])
def test_every_scale_storage_read_as_stored(generator, isa, scales, n, k, block_size):
    # odd N, K around block / strip multiples; > 256 scales so double quantization has several groups
    qw = stored_weight(generator, n, k, block_size, scales)
    stored, widened = prepare(qw, "cpu"), prepare(qw, "cpu", widened=True)
    assert stored.cols.dtype == torch.uint16 and stored.vals.dtype == torch.float16
    assert widened.cols.dtype == torch.int32 and widened.vals.dtype == torch.float32
    for m in (1, 2, 3, 4, 5, 9, 40, 70):
        x = torch.randn(m, k, generator=generator)
        y = native.qmatmul_cpu(x, qw, isa=isa)
        assert_matches_reference(y, x, qw)
        # the widened layout (float32 scales, int32 columns, float32 values) gives the same sums
        assert_matches_reference(run_layout(widened, x, isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
def test_many_outliers_span_the_kernels_pieces(generator, isa):
    # more outliers in a chunk of 32 rows than the 1024 products buffered at a time (chunk.h): 2500 in
    # one row among empty ones, and ~90 in every row (rows straddling a piece's end)
    qw = stored_weight(generator, 40, 6000, 64, "float16", outlier_frac=0.0)
    row_ptr = torch.zeros(41, dtype=torch.int32)
    row_ptr[6:] = 2500
    cols = torch.arange(0, 6000, 2, dtype=torch.int32)[:2500].to(torch.uint16)
    vals = torch.randn(2500, generator=generator).to(torch.float16)
    one_long_row = QWeight(**{**qw.__dict__, "outlier_row_ptr": row_ptr, "outlier_cols": cols, "outlier_vals": vals})
    every_row = stored_weight(generator, 40, 6000, 64, "double-quantized", outlier_frac=0.015)
    for weight in (one_long_row, every_row):
        for m in (1, 3):
            x = torch.randn(m, 6000, generator=generator)
            assert_matches_reference(native.qmatmul_cpu(x, weight, isa=isa), x, weight)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 3, 20])  # 20: the GEMMs, which add outliers to their decoded panels
def test_a_malformed_csr_is_refused_as_it_is_read(generator, isa, m):
    qw = random_weight(generator, n=70, k=64, outlier_frac=0.05)
    bad_col = qw.outlier_cols.clone()
    bad_col[-1] = 64  # == K, in the last chunk
    falling = qw.outlier_row_ptr.clone()
    falling[40] = falling[41] + 1
    for broken in (QWeight(**{**qw.__dict__, "outlier_cols": bad_col}),
                   QWeight(**{**qw.__dict__, "outlier_row_ptr": falling})):
        with pytest.raises(native.NativeKernelError, match="outlier CSR is malformed"):
            native.qmatmul_cpu(torch.randn(m, 64), broken, isa=isa, n_threads=2)
    # the widened layout's int32 columns can be negative (a signed compare must catch them), and a
    # row pointer mid-table can leave [0, nnz]
    widened = prepare(qw, "cpu", widened=True)
    negative = widened.cols.clone()
    negative[len(negative) // 2] = -1
    beyond = widened.row_ptr.clone()
    beyond[35] = int(beyond[-1]) + 5
    for broken in (replace(widened, cols=negative), replace(widened, row_ptr=beyond)):
        weight = native._struct(broken)
        x, y = torch.randn(m, 64), torch.empty(m, 70)
        status = native._cpu_library().ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), m, 64, y.data_ptr(), 70, 0,
                                                      native.ISA_TAGS[isa], 2)
        assert native._cpu_library().ql_error_string(status).decode().startswith("outlier CSR is malformed")
    # no outliers (nnz 0, no columns or values) but a row pointer mid-table that says 5: a kernel that
    # reads the table must refuse it (the GEMM once walked it into the absent columns); one that never
    # reads it may compute the weight's product
    without = random_weight(generator, n=70, k=64, outlier_frac=0.0)
    plain = prepare(without, "cpu", widened=True)
    bogus = plain.row_ptr.clone()
    bogus[35] = 5
    weight = native._struct(replace(plain, row_ptr=bogus))
    x, y = torch.randn(m, 64), torch.empty(m, 70)
    status = native._cpu_library().ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), m, 64, y.data_ptr(), 70, 0,
                                                  native.ISA_TAGS[isa], 2)
    if status != 0:
        assert native._cpu_library().ql_error_string(status).decode().startswith("outlier CSR is malformed")
    else:
        assert_matches_reference(y, x, without)


@pytest.mark.parametrize("isa", [isa for isa in ISAS if isa.values[0] != "scalar"])  # the GEMMs' (gemm.h)
def test_the_gemm_refuses_outlier_columns_out_of_order(generator, isa):
    # The GEMM walks each row's outliers once as its 128-column slices pass, so it relies on the
    # format's ascending columns: a row whose columns fall back to an earlier slice is refused, not
    # summed wrongly or dropped. (The other kernels sum a row's outliers in any order.)
    qw = random_weight(generator, n=40, k=300, outlier_frac=0.0)
    row_ptr = torch.zeros(41, dtype=torch.int32)
    row_ptr[8:] = 2  # row 7: columns 200, then 5
    cols = torch.tensor([200, 5], dtype=torch.int32).to(torch.uint16)
    vals = torch.tensor([1.0, -2.0]).to(torch.float16)
    unsorted = QWeight(**{**qw.__dict__, "outlier_row_ptr": row_ptr, "outlier_cols": cols, "outlier_vals": vals})
    with pytest.raises(native.NativeKernelError, match="outlier CSR is malformed"):
        native.qmatmul_cpu(torch.randn(20, 300), unsorted, isa=isa)
    ordered = QWeight(**{**unsorted.__dict__, "outlier_cols": torch.tensor([5, 200], dtype=torch.int32).to(torch.uint16),
                         "outlier_vals": vals.flip(0)})
    x = torch.randn(20, 300, generator=generator)
    assert_matches_reference(native.qmatmul_cpu(x, ordered, isa=isa), x, ordered)


def test_a_bad_storage_tag_is_refused(generator):
    qw = random_weight(generator, n=4, k=64)
    weight = native._struct(prepare(qw, "cpu"))
    x, y = torch.randn(1, 64), torch.empty(1, 4)
    library = native._cpu_library()
    for field, value in (("scale_kind", 3), ("col_kind", 2), ("val_kind", -1)):
        bad = native._struct(prepare(qw, "cpu"))
        setattr(bad, field, value)
        assert library.ql_cpu_qmatmul(ctypes.byref(bad), x.data_ptr(), 1, 64, y.data_ptr(), 4, 0, 0, 1) == 12
    weight.scale_kind, weight.scale_group_min = 2, None  # double-quantized without its (min, step)
    assert library.ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), 1, 64, y.data_ptr(), 4, 0, 0, 1) == 1


@pytest.mark.parametrize("scales", SCALE_STORAGE)
def test_the_cpu_layout_is_the_stored_tensors(generator, scales):
    qw = stored_weight(generator, 20, 200, 64, scales)
    ready = compute_ready(qw, "cpu")
    layout = prepare(ready, "cpu")
    stored = ready.scales if ready.scales is not None else ready.scale_codes
    for mine, theirs in ((layout.codes, ready.codes), (layout.scales, stored), (layout.cols, ready.outlier_cols),
                         (layout.vals, ready.outlier_vals), (layout.row_ptr, ready.outlier_row_ptr)):
        assert mine.data_ptr() == theirs.data_ptr()
    assert layout_extra_nbytes(ready, "cpu") == 0
    # elsewhere: the widened scales (unless float32), int32 columns and float32 values
    assert layout_extra_nbytes(qw, "cuda") == (0 if scales == "float32" else 4 * 20 * qw.n_blocks) + 8 * qw.n_outliers
