"""The int8-activation opt-in's prefill GEMM (csrc/cpu/gemm_q8act_avx512.c; ql_cpu_qmatmul_q8act from
QL_Q8ACT_GEMM_MIN_M = 24 rows of x on, where the CPU has AVX-512 VNNI) against the rule and the GEMV kernel.

The GEMM computes the rule's integers exactly (one int32 dot per row, column and activation block)
and sums the float32 terms per block in column order, then the outliers from 0, then their sum: a
chain of Kp / A + nnz(row) + 1 float32 additions, each term 2 roundings (the scale x factor product,
the fused multiply-add). That is shorter than the chain test_native_q8act.py bounds (Kp / 8 +
nnz + 8: the GEMV kernel sums per 8-column lane), and its magnitude S (per 8-column |dots|) bounds
the per-block one from above, so the same derived bound holds (assert_matches_rule). Against the GEMV
kernel (the same x, in slices of fewer than 24 rows, where the GEMV kernel runs): the two differ by
summation order only, so by at most the sum of both bounds; and they must differ somewhere at
M >= 24 (else the GEMM did not run) and agree bit for bit below it (the same kernel).

Inputs are fresh per run (the seed fixture): M around the threshold and up to 300, odd N, K around
block multiples and not a multiple of 32, block sizes 32 / 48 (activation blocks of 16) / 64 / 128,
float16 and double-quantized scales, outliers or none, one and two threads, every ISA level the CPU
has (below AVX-512 the GEMM does not run: the rule's portable code, checked against the rule too).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantlite.kernels import native
from quantlite.kernels.native import NativeKernelError
from quantlite.qweight import QWeight

from test_native_helpers import ISAS, library_built  # noqa: F401 (a fixture)
from test_native_q8act import assert_matches_rule, chain_length, gamma, int8_rule, random_weight, random_x

pytestmark = pytest.mark.usefixtures("library_built")

GEMM_MIN_M = 24  # QL_Q8ACT_GEMM_MIN_M of csrc/cpu/kernels.h
GEMV_ROWS = 8    # rows of x per call that the GEMV kernel runs (fewer than GEMM_MIN_M)


def has_vnni() -> bool:
    """Whether ql_cpu_qmatmul_q8act's AVX-512 level runs the VNNI kernels here (cpuid, as /proc/cpuinfo reports it)."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = set(cpuinfo.read_text().split()) if cpuinfo.exists() else set()
    return "avx512" in native.cpu_isas() and {"avx512bw", "avx512_vnni"} <= flags


def gemv_rows(x: torch.Tensor, qw, **options) -> torch.Tensor:
    """The int8 path on x in slices of GEMV_ROWS rows: the GEMV kernel's result for every row."""
    return torch.cat([native.qmatmul_cpu(x[i:i + GEMV_ROWS], qw, activations="int8", **options)
                      for i in range(0, x.shape[0], GEMV_ROWS)])


def check_gemm(x: torch.Tensor, qw, isa: str = "avx512", n_threads: int | None = None) -> torch.Tensor:
    """y of the int8 path at once: against the rule, and (AVX-512 with VNNI) against the GEMV kernel."""
    rule = int8_rule(x, qw)
    y = native.qmatmul_cpu(x, qw, isa=isa, activations="int8", n_threads=n_threads)
    assert_matches_rule(y, x, qw, rule)
    if isa == "avx512" and has_vnni():
        by_gemv = gemv_rows(x, qw, isa=isa, n_threads=n_threads)
        gap = (y.double() - by_gemv.double()).abs()
        assert (gap <= 2 * 2 * gamma(chain_length(qw) + 2) * rule["magnitude"] + 1e-30).all(), \
            f"GEMM vs GEMV kernel: {gap.max().item():.3g} beyond both kernels' bounds"
        if x.shape[0] >= GEMM_MIN_M:
            assert not torch.equal(y, by_gemv), "M >= 24 gave the GEMV kernel's result bit for bit: the GEMM did not run"
        else:
            assert torch.equal(y, by_gemv), "M < 24 did not run the GEMV kernel"
    return y


@pytest.mark.parametrize("m", [GEMM_MIN_M - 1, GEMM_MIN_M, GEMM_MIN_M + 1, 31, 32, 33, 47, 48, 49, 64, 65, 100, 130, 300])
def test_m_around_the_threshold_and_up_to_300(generator, m):
    qw = random_weight(generator, n=203, k=1000, block_size=64)
    check_gemm(random_x(generator, m, 1000), qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size, k", [(32, 31), (32, 33), (32, 200), (48, 95), (48, 97), (48, 1000), (64, 127), (64, 128),
                                           (64, 129), (64, 255), (64, 257), (64, 576), (128, 255), (128, 257), (128, 1100)])
def test_block_sizes_and_k_around_block_and_slice_multiples(generator, isa, block_size, k):
    """K below, at and past block multiples and the GEMM's 256-column slices; 48: activation blocks of 16."""
    qw = random_weight(generator, n=77, k=k, block_size=block_size, outlier_frac=0.02)
    check_gemm(random_x(generator, 37, k), qw, isa=isa)


@pytest.mark.parametrize("options", [dict(double_quant=True), dict(scale_dtype=torch.float16), dict(method="nf4"),
                                     dict(outlier_frac=0.0), dict(outlier_frac=0.05, block_size=48)])
def test_stored_scale_kinds_methods_and_outliers(generator, options):
    options = {"outlier_frac": 0.01, **options}
    qw = random_weight(generator, n=301, k=520, **options)
    check_gemm(random_x(generator, 50, 520), qw)


def test_more_rows_than_one_panel_and_two_threads(generator):
    """N over several 256-row panels and pool chunks (the last one short): one and two threads give
    the same bits (each output's sum does not depend on the split), both against the rule."""
    qw = random_weight(generator, n=1117, k=384, block_size=64)
    x = random_x(generator, 70, 384)
    one = check_gemm(x, qw, n_threads=1)
    assert torch.equal(one, check_gemm(x, qw, n_threads=2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_outputs(generator, dtype):
    """x in float16 / bfloat16 is quantized from its float value and y rounded once to the dtype: the
    GEMM's y and the GEMV kernel's on the same x each lie within one rounding of their float32 sums,
    so they differ by at most two roundings of the result plus both sums' bounds."""
    qw = random_weight(generator, n=64, k=200)
    x = random_x(generator, 40, 200).to(dtype)
    y, by_gemv = native.qmatmul_cpu(x, qw, activations="int8"), gemv_rows(x, qw)
    assert y.dtype == by_gemv.dtype == dtype
    rule, unit_roundoff = int8_rule(x, qw), {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    gap = (y.double() - by_gemv.double()).abs()
    allowed = 2 * (2 * gamma(chain_length(qw) + 2) * rule["magnitude"] + unit_roundoff * rule["reference"].abs()) + 1e-30
    assert (gap <= allowed).all(), f"GEMM vs GEMV kernel on {dtype} x: {gap.max().item():.3g} beyond two roundings"


def test_strided_rows_zero_blocks_and_a_zero_x(generator):
    qw = random_weight(generator, n=90, k=256)
    wide = random_x(generator, 30, 300)
    wide[3, 32:96] = 0  # two whole activation blocks of zeros: scale 0, codes 0
    x = wide[:, :256]  # rows 300 apart
    assert_matches_rule(native.qmatmul_cpu(x, qw, activations="int8"), x.contiguous(), qw)
    assert torch.equal(native.qmatmul_cpu(torch.zeros(30, 256), qw, activations="int8"), torch.zeros(30, 90))


def test_a_malformed_outlier_table_is_refused(generator):
    qw = random_weight(generator, n=40, k=128)
    cols = qw.outlier_cols.to(torch.int32).clone()
    cols[-1] = 128
    with pytest.raises(NativeKernelError, match=r"int8 activations.*M=30, N=40, K=128.*outlier CSR is malformed"):
        native.qmatmul_cpu(torch.randn(30, 128), QWeight(**{**qw.__dict__, "outlier_cols": cols}), activations="int8")
