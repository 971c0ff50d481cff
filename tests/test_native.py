"""The native CPU library (csrc/cpu via quantlite.kernels.native) against the float64 reference.

Tolerance, and where it comes from: each output is a K-term float32 dot product of float32 weights
(level * scale, one rounding) with x, so its error is at most about (K + 2) * 2**-24 times
sum_k |x_k * W_nk| (the standard bound for recursive summation; we allow twice that), plus one
rounding of the result into x's dtype (2**-11 relative for float16, 2**-8 for bfloat16). The bound
is computed per element, so a wrong code, scale or outlier anywhere shows (test_a_wrong_code_is_caught).
"""
from __future__ import annotations

import ctypes
import multiprocessing

import pytest
import torch

from quantlite.kernels import native
from quantlite.kernels.native import NativeKernelError
from quantlite.kernels.prepared import prepare
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize

from test_native_helpers import ISAS, library_built  # noqa: F401 (a fixture)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OUTPUT_ROUNDING = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


pytestmark = pytest.mark.usefixtures("library_built")


def random_weight(generator, n, k, block_size=64, outlier_frac=0.01, method="quantlite") -> QWeight:
    # heavy-tailed weights (a few large ones per row) so scales and outliers both matter
    w = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator).add(0.1)
    w += (torch.rand(n, k, generator=generator) < 0.01) * torch.randn(n, k, generator=generator) * 8
    return quantize(w, block_size=block_size, method=method, outlier_frac=outlier_frac)


def assert_matches_reference(y: torch.Tensor, x: torch.Tensor, qw: QWeight) -> None:
    weight = qw.dequantize(torch.float64)                       # (N, K) float64
    x64 = x.reshape(-1, qw.shape[1]).double()                   # (M, K)
    reference = x64 @ weight.T                                  # (M, N)
    magnitude = x64.abs() @ weight.abs().T
    k = qw.shape[1]
    bound = 2 * (k + 2) * 2.0**-24 * magnitude + OUTPUT_ROUNDING[x.dtype] * reference.abs() + 1e-30
    got = y.reshape(-1, qw.shape[0]).double()
    assert torch.isfinite(got).all(), "NaN/Inf in the output (an element was not written?)"
    excess = (got - reference).abs() / bound
    worst = int(excess.argmax())
    row, col = divmod(worst, qw.shape[0])
    assert excess.max() <= 1.0, (
        f"y[{row}, {col}] = {got[row, col].item()} vs reference {reference[row, col].item()} "
        f"(bound {bound[row, col].item():.3g})"
    )


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qmatmul_sweep_m_and_odd_shapes(generator, isa, dtype):
    # N odd, K = 2B - 1 (padding inside the last block), M over the GEMV / GEMM switch (4 / 5) and
    # past the 3-row register tile and 64.
    qw = random_weight(generator, n=37, k=127, block_size=64)
    for m in (1, 2, 3, 4, 5, 6, 8, 13, 64, 67):
        x = torch.randn(m, 127, generator=generator).to(dtype)
        out = torch.full((m, 37), float("nan"), dtype=dtype)
        y = native.qmatmul_cpu(x, qw, out=out, isa=isa)
        assert y.data_ptr() == out.data_ptr()
        assert_matches_reference(y, x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_qmatmul_every_m_up_to_70(generator, isa, dtype):
    # Every M from 1 to 70: each register tile, the AVX-512 kernel's x tiles of 8 rows with every
    # remainder, the AVX2 switches (4 / 5, 8 / 9), the switch to either GEMM (15 / 16) and its groups
    # of 16 (AVX-512) or 8 (AVX2) rows with every remainder and blocks of 1-3 groups. K = 300 (B = 64): 3 strips of 128 columns, the last short,
    # and padding inside the last block; N = 37: an odd number of rows (a weight row tile of 2 plus
    # a single row), no outliers in some rows.
    qw = random_weight(generator, n=37, k=300, block_size=64, outlier_frac=0.003)
    for m in range(1, 71):
        x = torch.randn(m, 300, generator=generator).to(dtype)
        assert_matches_reference(native.qmatmul_cpu(x, qw, isa=isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size, k", [(32, 32), (32, 33), (48, 95), (48, 96), (64, 65), (128, 200), (256, 255),
                                           (64, 127), (64, 128), (64, 129), (32, 256), (48, 384), (48, 431),
                                           (128, 1000), (256, 513)])
def test_qmatmul_block_sizes_and_k_around_block_multiples(generator, isa, block_size, k):
    # B = 48 leaves 8 bytes per block after the 16-byte steps: the AVX2 kernel's narrow tail, and its
    # blocks straddle the AVX-512 kernel's 128-column strips. K around 128 and 256: whole strips, one
    # column more or less.
    qw = random_weight(generator, n=19, k=k, block_size=block_size)
    for m in (1, 3, 7, 40):  # 40: the GEMM (M >= 16)
        x = torch.randn(m, k, generator=generator)
        assert_matches_reference(native.qmatmul_cpu(x, qw, isa=isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size, k", [(32, 2100), (48, 2201), (64, 3137), (128, 2500), (256, 4000)])
def test_qmatmul_k_slices_of_the_register_path(generator, isa, block_size, k):
    # The AVX2 register path (M <= 8) cuts K into slices of 32 KiB of x once M > 4 (1024 columns at
    # M = 8, rounded down to whole blocks: 2-4 slices here, the last one short). M = 4 / 5 is
    # its switch from scaled sums to scaled levels, 8 / 9 the switch to the GEMM. N = 70 leaves a
    # partial chunk of 32 rows; 2 % outliers give 40-80 per row.
    qw = random_weight(generator, n=70, k=k, block_size=block_size, outlier_frac=0.02)
    for m in (4, 5, 7, 8, 9, 33):  # 33: the GEMM over many K slices
        x = torch.randn(m, k, generator=generator)
        assert_matches_reference(native.qmatmul_cpu(x, qw, isa=isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("outlier_frac", [0.0, 0.2])
@pytest.mark.parametrize("method", ["nf4", "rtn", "quantlite"])
def test_qmatmul_methods_and_outliers(generator, isa, outlier_frac, method):
    # none, or many outliers per row; fp32 / fp16 / double-quantized scales; NF4 and int4 codebooks
    qw = random_weight(generator, n=41, k=160, outlier_frac=outlier_frac, method=method)
    assert qw.n_outliers == round(outlier_frac * 41 * 160)
    for m in (1, 9):
        x = torch.randn(m, 160, generator=generator).to(torch.bfloat16)
        assert_matches_reference(native.qmatmul_cpu(x, qw, isa=isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, k, block_size", [(3, 70001, 64), (1, 10, 256)])
def test_wide_rows_with_int32_columns_and_a_single_short_row(generator, isa, n, k, block_size):
    # K > 65536 stores outlier columns as int32; K < B leaves a single, mostly padded block
    qw = random_weight(generator, n=n, k=k, block_size=block_size, outlier_frac=0.01)
    for m in (1, 6):
        x = torch.randn(m, k, generator=generator)
        assert_matches_reference(native.qmatmul_cpu(x, qw, isa=isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
def test_strided_x_and_out_leave_the_gaps_alone(generator, isa):
    qw = random_weight(generator, n=23, k=100)
    for m in (6, 20):  # 20: the GEMM's packing of x
        wide_x = torch.randn(m, 130, generator=generator)
        x = wide_x[:, 10:110]                              # (m, 100), row stride 130
        wide_out = torch.full((m, 31), float("nan"))
        out = wide_out[:, 4:27]                            # (m, 23), row stride 31
        native.qmatmul_cpu(x, qw, out=out, isa=isa)
        assert_matches_reference(out, x, qw)
        assert torch.isnan(wide_out[:, :4]).all() and torch.isnan(wide_out[:, 27:]).all()


def test_leading_dimensions_and_empty_input(generator):
    qw = random_weight(generator, n=29, k=70)
    x = torch.randn(2, 3, 70, generator=generator).to(torch.float16)
    y = native.qmatmul_cpu(x, qw)
    assert y.shape == (2, 3, 29) and y.dtype == torch.float16
    assert_matches_reference(y, x, qw)
    assert native.qmatmul_cpu(torch.empty(0, 70), qw).shape == (0, 29)


@pytest.mark.parametrize("isa", ISAS)
def test_thread_counts_give_identical_results(generator, isa):
    # each output element is computed by one thread in a fixed order: bitwise equal for any count
    # (M = 16, 40, 130: the GEMM, whose blocks of 256 rows each thread cuts differently)
    qw = random_weight(generator, n=700, k=512)  # 700 * 512 weights: above the parallel threshold
    for m in (1, 6, 16, 40, 130):
        x = torch.randn(m, 512, generator=generator)
        results = [native.qmatmul_cpu(x, qw, isa=isa, n_threads=t) for t in (1, 2, 3)]
        assert all(torch.equal(results[0], r) for r in results[1:])
        assert_matches_reference(results[0], x, qw)


@pytest.mark.parametrize("isa", ISAS)
def test_shrinking_chunks_cover_every_row(generator, isa):
    # The pool hands out 1 / (4 x threads) of the rows left, at least one grain (64 rows; the GEMM's
    # 256): with 4100 rows the first chunks span several grains and the last grain is part full.
    qw = random_weight(generator, n=4100, k=128)
    for m in (1, 16):  # the GEMV's grain, the GEMM's
        x = torch.randn(m, 128, generator=generator)
        results = [native.qmatmul_cpu(x, qw, isa=isa, n_threads=t) for t in (1, 2, 3)]
        assert all(torch.equal(results[0], r) for r in results[1:]), f"M = {m}"
        assert_matches_reference(results[0], x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemm_x_packed_by_every_thread(generator, isa, dtype):
    # The GEMM's x is packed by the pool, a chunk of groups of 16 (AVX-512) or 8 (AVX2) rows each:
    # M around those multiples (a last group part full), K = 2B - 1 (padding columns) and 1000 (not a
    # multiple of the 16-column packing tiles), x strided, 1-3 threads; bitwise equal across counts.
    for k in (127, 1000):
        qw = random_weight(generator, n=520, k=k)  # over the parallel threshold at these M
        for m in (16, 17, 24, 31, 33, 48, 49, 70):
            wide_x = torch.randn(m, k + 9, generator=generator).to(dtype)
            x = wide_x[:, 5:5 + k]                                    # (m, k), row stride k + 9
            results = [native.qmatmul_cpu(x, qw, isa=isa, n_threads=t) for t in (1, 2, 3)]
            assert all(torch.equal(results[0], r) for r in results[1:]), f"M = {m}, K = {k}"
            assert_matches_reference(results[0], x, qw)


def _qmatmul_in_child(queue, qw, x):
    queue.put(native.qmatmul_cpu(x, qw, n_threads=2).tolist())  # a list: no tensor sharing across processes


def test_forked_child_can_use_the_pool(generator):
    # the parent's workers do not exist in a fork; the library must start its own, not wait forever
    qw = random_weight(generator, n=700, k=512)
    x = torch.randn(1, 512, generator=generator)
    expected = native.qmatmul_cpu(x, qw, n_threads=2)  # starts the parent's pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_qmatmul_in_child, args=(queue, qw, x))
    child.start()
    result = queue.get(timeout=60)  # before join: a child blocks in exit until its queue is drained
    child.join(timeout=10)
    assert child.exitcode == 0, "the forked child crashed"
    assert result == expected.tolist()


@pytest.mark.parametrize("isa", ISAS)
def test_codes_ending_at_a_page_boundary_are_not_overread(generator, isa):
    # The AVX-512 kernel loads 64 bytes at byte offsets 0..3; it must never touch a byte past the last
    # row's codes. The codes are copied to end exactly at an inaccessible page: a read past them
    # would kill the process (run in a child so that a crash fails this test, not the session).
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    qw = random_weight(generator, n=5, k=448, block_size=64, outlier_frac=0.0)  # 224 bytes a row: 3.5 strips
    for m in (3, 17):  # 17: the GEMM, whose last K slice (448 = 3 x 128 + 64) is short
        x = torch.randn(m, 448, generator=generator)
        child = context.Process(target=_qmatmul_with_guarded_codes, args=(queue, qw, x, isa))
        child.start()
        child.join(timeout=60)
        assert child.exitcode == 0, f"the child died (exit code {child.exitcode}): a read past the codes?"
        assert_matches_reference(torch.tensor(queue.get(timeout=10)), x, qw)


def _qmatmul_with_guarded_codes(queue, qw, x, isa):
    import mmap

    page = mmap.PAGESIZE
    codes = qw.codes.contiguous().numpy().tobytes()
    pages = (len(codes) + page - 1) // page + 1
    region = mmap.mmap(-1, pages * page, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(region))
    libc = ctypes.CDLL(None)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    guard = base + (pages - 1) * page
    start = guard - len(codes)
    ctypes.memmove(start, codes, len(codes))
    assert libc.mprotect(guard, page, 0) == 0  # PROT_NONE
    prepared = prepare(qw, "cpu")
    weight = native._struct(prepared)
    weight.codes = start
    y = torch.empty(x.shape[0], prepared.n)
    library = native._cpu_library()
    status = library.ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), x.shape[0], x.shape[1], y.data_ptr(),
                                    prepared.n, 0, native.ISA_TAGS[isa], 2)
    queue.put(y.tolist() if status == 0 else status)


def test_auto_is_the_best_isa_bitwise(generator):
    qw = random_weight(generator, n=70, k=700)
    for m in (1, 5, 12):
        x = torch.randn(m, 700, generator=generator)
        assert torch.equal(native.qmatmul_cpu(x, qw), native.qmatmul_cpu(x, qw, isa=native.cpu_isa()))


def test_an_instruction_set_past_the_cpus_is_refused(generator):
    # QL_ISA_AVX512 + 1 exists on no CPU; asking the library for it directly must fail cleanly
    qw = random_weight(generator, n=4, k=64)
    prepared = prepare(qw, "cpu")
    weight = native._struct(prepared)
    x, y = torch.randn(1, 64), torch.empty(1, 4)
    library = native._cpu_library()
    too_high = max(native.ISA_TAGS.values()) + 1
    assert library.ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), 1, 64, y.data_ptr(), 4, 0, too_high, 1) == 6
    assert library.ql_cpu_qmatmul(ctypes.byref(weight), x.data_ptr(), 1, 64, y.data_ptr(), 4, 0, -1, 1) == 6


def test_a_wrong_code_is_caught(generator):
    # the tolerance is tight enough that one changed nibble in one row shows
    qw = random_weight(generator, n=16, k=64, outlier_frac=0.0)
    x = torch.randn(1, 64, generator=generator).abs() + 0.5
    codes = qw.codes.clone()
    codes[5, 3] ^= 0x08  # column 6's level moves by 8 steps
    broken = QWeight(**{**qw.__dict__, "codes": codes})
    with pytest.raises(AssertionError, match=r"y\[0, 5\]"):
        assert_matches_reference(native.qmatmul_cpu(x, broken), x, qw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_qweight(generator, dtype):
    qw = random_weight(generator, n=33, k=150, block_size=48, outlier_frac=0.05)
    assert torch.equal(native.dequantize_cpu(qw, dtype), qw.dequantize(torch.float32).to(dtype))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, k, block_size", [(33, 150, 48), (20, 33, 32), (3, 70001, 64)])
def test_dequantize_row_ranges_every_isa(generator, isa, dtype, n, k, block_size):
    # bit-identical with QWeight.dequantize: level * scale in float32, then the outliers, then dtype
    qw = random_weight(generator, n=n, k=k, block_size=block_size, outlier_frac=0.05)
    dense = qw.dequantize(torch.float32).to(dtype)
    for begin, end in ((0, n), (1, n - 1), (n - 1, n)):  # every n parametrized here is >= 3
        wide = torch.full((end - begin, k + 5), float("nan"), dtype=dtype)
        got = native.dequantize_cpu(qw, dtype, rows=(begin, end), out=wide[:, 2:k + 2], isa=isa)
        assert torch.equal(got, dense[begin:end])
        assert torch.isnan(wide[:, :2]).all() and torch.isnan(wide[:, k + 2:]).all()


def test_dequantize_refuses_bad_row_ranges(generator):
    qw = random_weight(generator, n=8, k=64)
    for rows in ((3, 3), (-1, 2), (0, 9)):
        with pytest.raises(NativeKernelError, match="within the N = 8 rows"):
            native.dequantize_cpu(qw, rows=rows)
    with pytest.raises(NativeKernelError, match=r"out must be a \(2, 64\)"):
        native.dequantize_cpu(qw, rows=(0, 2), out=torch.empty(2, 63))


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_m_up_to_130_through_the_dispatch(generator, dtype):
    # isa="auto" as the runtime calls it: the AVX-512 tiles below QL_GEMM_MIN_M = 16 rows of x, its GEMM
    # from there (groups of 16 rows: every remainder, blocks of 1-3 groups); K = 200 is one 128-column
    # slice of the GEMM's panel plus a short one (K not a multiple of K_C), padding in the last block;
    # N = 45 a partial block of weight rows and of its 8-row micro-tiles; 5 % outliers in both slices.
    qw = random_weight(generator, n=45, k=200, block_size=64, outlier_frac=0.05)
    for m in range(1, 131):
        x = torch.randn(m, 200, generator=generator).to(dtype)
        assert_matches_reference(native.qmatmul_cpu(x, qw), x, qw)
    x = torch.randn(2, 40, 200, generator=generator).to(dtype)  # leading sizes; a strided out
    assert_matches_reference(native.qmatmul_cpu(x, qw), x, qw)
    wide_out = torch.full((80, 50), float("nan"), dtype=dtype)
    native.qmatmul_cpu(x, qw, out=wide_out[:, 2:47])
    assert_matches_reference(wide_out[:, 2:47], x, qw)
    assert torch.isnan(wide_out[:, :2]).all() and torch.isnan(wide_out[:, 47:]).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("n, k, block_size", [(300, 1000, 64), (131, 383, 128), (37, 1056, 48), (9, 4096, 256)])
def test_gemm_sizes_over_its_blocks(generator, isa, n, k, block_size):
    # The GEMM's row blocks (the pool's chunks of these N) and 128-column K slices (1000 =
    # 7 x 128 + 104; 1056 = 8 x 128 + 32 with B = 48 straddling slices), at M = 16, 47 and 100.
    qw = random_weight(generator, n=n, k=k, block_size=block_size, outlier_frac=0.01)
    for m in (16, 47, 100):
        x = torch.randn(m, k, generator=generator)
        assert_matches_reference(native.qmatmul_cpu(x, qw, isa=isa), x, qw)


@pytest.mark.parametrize("isa", ISAS)
def test_gemm_blocks_of_256_rows_within_one_chunk(generator, isa):
    # The calls above split their rows into the pool's chunks (under 256 rows each), so the GEMM's
    # full block of 256 weight rows and a second block in one chunk come only from a chunk of more than
    # 256 rows: a small call in one chunk (300 x 32 at M = 16: under the pool's 2^18), and one thread
    # over 1100 rows (chunks of 288 = 256 + 32).
    small = random_weight(generator, n=300, k=32, block_size=32, outlier_frac=0.03)
    x = torch.randn(16, 32, generator=generator)
    assert_matches_reference(native.qmatmul_cpu(x, small, isa=isa), x, small)
    tall = random_weight(generator, n=1100, k=200, outlier_frac=0.01)
    x = torch.randn(17, 200, generator=generator)
    assert_matches_reference(native.qmatmul_cpu(x, tall, isa=isa, n_threads=1), x, tall)


@pytest.mark.skipif(not {"avx2", "avx512"} <= set(native.cpu_isas()), reason="needs a CPU with AVX2 and AVX-512")
def test_the_two_gemms_agree_bitwise(generator):
    # gemm_avx2.c and gemm_avx512.c run one plan (gemm.h): the same float32 weights and one FMA chain
    # over k in order per output, so their results are equal to the bit for any M from the switch on
    # (groups of 8 and of 16 rows, every remainder), outliers, a short last K slice, double-quantized
    # ("quantlite") and float16 / float32 scales.
    double_quantized = random_weight(generator, n=300, k=1000, block_size=64, outlier_frac=0.02, method="quantlite")
    plain = random_weight(generator, n=300, k=1000, block_size=64, outlier_frac=0.02, method="nf4")  # float32 scales
    half = QWeight(**{**plain.__dict__, "scales": plain.scales.to(torch.float16)})
    for weight in (double_quantized, plain, half):
        for m in (16, 17, 24, 33, 47, 64, 70):
            x = torch.randn(m, 1000, generator=generator)
            avx2 = native.qmatmul_cpu(x, weight, isa="avx2")
            assert torch.equal(avx2, native.qmatmul_cpu(x, weight, isa="avx512")), f"M = {m}"
            assert_matches_reference(avx2, x, weight)


def test_bad_arguments_name_the_sizes(generator):
    qw = random_weight(generator, n=8, k=64)
    with pytest.raises(NativeKernelError, match=r"shape \(2, 63\).*K=64.*8 x 64"):
        native.qmatmul_cpu(torch.randn(2, 63), qw)
    with pytest.raises(NativeKernelError, match="float64"):
        native.qmatmul_cpu(torch.randn(2, 64, dtype=torch.float64), qw)
    with pytest.raises(NativeKernelError, match="isa 'sse9'"):
        native.qmatmul_cpu(torch.randn(2, 64), qw, isa="sse9")
    with pytest.raises(NativeKernelError, match=r"out must be a \(2, 8\)"):
        native.qmatmul_cpu(torch.randn(2, 64), qw, out=torch.empty(2, 9))


def test_library_rejects_a_malformed_outlier_table(generator):
    # QWeight() skips from_dict's checks; the C library must still refuse to index x with a bad column
    qw = random_weight(generator, n=4, k=64, outlier_frac=0.02)
    cols = qw.outlier_cols.to(torch.int32).clone()
    cols[0] = 64
    broken = QWeight(**{**qw.__dict__, "outlier_cols": cols})
    with pytest.raises(NativeKernelError, match=r"M=1, N=4, K=64.*outlier CSR is malformed"):
        native.qmatmul_cpu(torch.randn(1, 64), broken)


def test_error_strings_cover_every_status():
    library = ctypes.CDLL(str(native.CPU_LIBRARY))
    library.ql_error_string.restype = ctypes.c_char_p
    messages = [library.ql_error_string(code).decode() for code in range(13)]
    assert messages[0] == "success"
    assert "unknown" not in " ".join(messages[1:]) and len(set(messages)) == 13
    assert "unknown" in library.ql_error_string(99).decode()


def test_status_reports():
    assert native.cpu_status() is None
    assert native.cpu_isa() in ("avx512", "avx2", "scalar")
    assert native.cpu_isas()[0] == "scalar" and native.cpu_isas()[-1] == native.cpu_isa()
    reason = native.cuda_status()
    assert reason is None or isinstance(reason, str) and reason
