"""The int8-activation qmatmul (ql_cpu_qmatmul_q8act, the opt-in activations="int8") against float64.

Two references, each with a derived bound:

1. The same rule in float64 (int8_rule below: x quantized per activation block exactly as the C
   code does it, in float32, the int8 levels, the integer dot products exact). The kernels sum the
   same integers in float32: the scalar code per activation block, the AVX-512 and AVX2 codes per
   8-column lane and strip, then their 16 or 8 lanes pairwise. Every term
   t = float(int) * fl(scale * factor) carries at most 2 roundings (the product of the two float32 factors, the product with the integer; integers
   below 2**24 convert exactly), and any output's sum is a chain of at most
   n = Kp / 8 + nnz(row) + 8 float32 additions (lanes of 8 columns are the finest terms any
   kernel adds; + the outliers; + the 16-lane reduction and the final add). So
       |y - rule| <= (n + 2) u / (1 - (n + 2) u) * S,   u = 2**-24,
   S = sum over 8-column lanes of |lane's integer dot| * |scale * factor| + sum |outlier * x| (the
   lane sums bound the block sums' magnitude from above). We allow twice that, as test_native.py.
2. The default float32 path (ql_cpu_qmatmul), with what quantizing x and the levels implies: with
   x^ = x_q * xs and w^ = level_q * L / 127,
       y_int8 - y_float = sum_k scale_k * ((w^_k - level_k) * x^_k + level_k * (x^_k - x_k)),
   |w^ - level| <= L / 254, |x^ - x| <= xs / 2, so
       |y_int8 - y_float| <= sum_k |scale_k| (L / 254 |x^_k| + |level_k| xs_k / 2) + both paths' float32 bounds.

Inputs are fresh per run (the seed fixture); M = 1..16 and larger, odd N, K around block multiples,
block sizes 32 / 48 / 64 / 128, outliers, float16 / double-quantized scales, every ISA the CPU has
(the AVX-512 level runs the VNNI kernel where cpuid has it, else the AVX2 kernel; the AVX2 level the
AVX2 kernel, which the tests at the end also hold to the portable rule; scalar the portable rule).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from quantlite.kernels import cpu_ops, native
from quantlite.kernels.dispatch import qmatmul
from quantlite.kernels.native import NativeKernelError
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize

from test_native_helpers import ISAS, library_built  # noqa: F401 (a fixture)

pytestmark = pytest.mark.usefixtures("library_built")

U = 2.0**-24


def activation_block(block_size: int) -> int:
    """QL_Q8ACT_BLOCK of kernels.h."""
    return 32 if block_size % 32 == 0 else 16


def random_weight(generator, n, k, block_size=64, outlier_frac=0.01, **options) -> QWeight:
    w = torch.randn(n, k, generator=generator) * torch.rand(n, 1, generator=generator).add(0.1)
    w += (torch.rand(n, k, generator=generator) < 0.01) * torch.randn(n, k, generator=generator) * 8
    return quantize(w, block_size=block_size, outlier_frac=outlier_frac, **options)


def random_x(generator, m, k) -> torch.Tensor:
    # activations with a few large channels, as in a transformer's residual stream
    x = torch.randn(m, k, generator=generator)
    return x + (torch.rand(k, generator=generator) < 0.02) * torch.randn(k, generator=generator) * 20


def outlier_matrix(qw: QWeight) -> torch.Tensor:
    """(N, K) float64, the sparse outlier table as a dense matrix."""
    n, k = qw.shape
    dense = torch.zeros(n, k, dtype=torch.float64)
    rows = torch.repeat_interleave(torch.arange(n), torch.diff(qw.outlier_row_ptr.long()))
    dense[rows, qw.outlier_cols.long()] = qw.outlier_vals.double()
    return dense


def int8_rule(x: torch.Tensor, qw: QWeight) -> dict[str, torch.Tensor]:
    """The rule of qmatmul_q8act_scalar.c in float64 over its exact integers: x (M, K) -> reference
    (M, N), S (M, N) the magnitude of test 1's bound, and test 2's bound on the gap to the float path."""
    n, k = qw.shape
    kp, block = qw.padded_k, qw.block_size
    act = activation_block(block)
    codebook = qw.codebook.float()
    largest = codebook.abs().max()
    levels = torch.round(127 * codebook / largest)            # (16,) float32, integers
    level_unit = largest / 127                                 # float32
    x32 = torch.nn.functional.pad(x.float(), (0, kp - k))      # (M, Kp)
    m = x32.shape[0]
    blocks = x32.reshape(m, kp // act, act)
    xs = blocks.abs().amax(-1) / 127                           # (M, Kp / A) float32
    x_q = torch.where(xs[..., None] > 0, torch.round(blocks / xs[..., None]), torch.zeros(()))  # float32 integers
    factor = (xs * level_unit).double()                        # (M, Kp / A), the C code's float32 product
    w_q = levels[qw.unpacked_codes().long()].double()          # (N, Kp)
    scales = qw.block_scales().double()                        # (N, Kp / B)
    scale_per_act = scales.repeat_interleave(block // act, dim=1)          # (N, Kp / A)
    combined = scale_per_act[None] * factor[:, None, :]                    # (M, N, Kp / A)
    lane_dots = torch.einsum("mlj,nlj->mnl", x_q.double().reshape(m, kp // 8, 8), w_q.reshape(n, kp // 8, 8))
    per_act = lane_dots.reshape(m, n, kp // act, act // 8)
    outliers = outlier_matrix(qw)
    x64 = x.double()
    reference = (per_act.sum(-1) * combined).sum(-1) + x64 @ outliers.T
    magnitude = (per_act.abs() * combined.abs()[..., None]).sum((-1, -2)) + x64.abs() @ outliers.abs().T
    # test 2: what quantizing x and the levels moves, per element
    x_hat = (x_q.double() * xs.double()[..., None]).reshape(m, kp)
    x_step = xs.double().repeat_interleave(act, dim=1)                    # (M, Kp)
    level64 = codebook.double()[qw.unpacked_codes().long()]               # (N, Kp)
    scale_per_col = scales.repeat_interleave(block, dim=1)                # (N, Kp)
    quantization_gap = (level_unit.double() / 2 * x_hat.abs()) @ scale_per_col.abs().T \
        + (x_step / 2) @ (level64.abs() * scale_per_col.abs()).T
    return {"reference": reference, "magnitude": magnitude, "quantization_gap": quantization_gap}


def chain_length(qw: QWeight) -> int:
    return qw.padded_k // 8 + int(torch.diff(qw.outlier_row_ptr.long()).max()) + 8


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def assert_matches_rule(y: torch.Tensor, x: torch.Tensor, qw: QWeight, rule: dict | None = None) -> None:
    rule = rule or int8_rule(x, qw)
    bound = 2 * gamma(chain_length(qw) + 2) * rule["magnitude"] + 1e-30
    got = y.reshape(-1, qw.shape[0]).double()
    assert torch.isfinite(got).all(), "NaN/Inf in the output (an element was not written?)"
    excess = (got - rule["reference"]).abs() / bound
    row, col = divmod(int(excess.argmax()), qw.shape[0])
    assert excess.max() <= 1.0, (f"y[{row}, {col}] = {got[row, col].item()} vs the int8 rule's "
                                 f"{rule['reference'][row, col].item()} (bound {bound[row, col].item():.3g})")


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 33])
def test_every_m_against_the_rule_and_the_float_path(generator, isa, m):
    qw = random_weight(generator, n=203, k=1000, block_size=64)
    x = random_x(generator, m, 1000)
    rule = int8_rule(x, qw)
    y = native.qmatmul_cpu(x, qw, isa=isa, activations="int8")
    assert_matches_rule(y, x, qw, rule)
    # against the default float32 path: the gap quantization allows, plus both paths' roundings
    y_float = native.qmatmul_cpu(x, qw, isa=isa).double()
    float_magnitude = x.double().abs() @ qw.dequantize(torch.float64).abs().T
    allowed = rule["quantization_gap"] + 2 * gamma(chain_length(qw) + 2) * (rule["magnitude"] + float_magnitude)
    gap = (y.double() - y_float).abs()
    assert (gap <= allowed).all(), f"int8 vs float path: {gap.max().item():.3g} beyond the bound"
    assert gap.max() > 0, "the int8 path gave the float path's result: x was not quantized"


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("block_size, k", [(32, 31), (32, 33), (48, 95), (48, 97), (64, 127), (64, 128), (64, 129),
                                           (128, 255), (128, 257), (64, 576), (256, 300)])
def test_block_sizes_and_k_around_block_multiples(generator, isa, block_size, k):
    qw = random_weight(generator, n=37, k=k, block_size=block_size, outlier_frac=0.02)
    for m in (1, 3, 6):
        x = random_x(generator, m, k)
        assert_matches_rule(native.qmatmul_cpu(x, qw, isa=isa, activations="int8"), x, qw)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("options", [dict(double_quant=True), dict(scale_dtype=torch.float16), dict(method="nf4"),
                                     dict(outlier_frac=0.0)])
def test_stored_scale_kinds_methods_and_no_outliers(generator, isa, options):
    options = {"outlier_frac": 0.01, **options}
    qw = random_weight(generator, n=300, k=512, **options)
    x = random_x(generator, 2, 512)
    assert_matches_rule(native.qmatmul_cpu(x, qw, isa=isa, activations="int8"), x, qw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_quantized_from_their_float_value(generator, dtype):
    qw = random_weight(generator, n=64, k=200)
    x = random_x(generator, 3, 200).to(dtype)
    y = native.qmatmul_cpu(x, qw, activations="int8")
    assert y.dtype == dtype
    rule = int8_rule(x, qw)
    rounding = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    bound = 2 * gamma(chain_length(qw) + 2) * rule["magnitude"] + rounding * rule["reference"].abs() + 1e-30
    assert ((y.double() - rule["reference"]).abs() <= bound).all()


def test_a_zero_block_of_x_and_an_all_zero_x(generator):
    qw = random_weight(generator, n=40, k=256)
    x = random_x(generator, 2, 256)
    x[0, 32:96] = 0  # two whole activation blocks of zeros: scale 0, codes 0
    assert_matches_rule(native.qmatmul_cpu(x, qw, activations="int8"), x, qw)
    assert torch.equal(native.qmatmul_cpu(torch.zeros(1, 256), qw, activations="int8"), torch.zeros(1, 40))


def test_threads_do_not_change_the_result(generator):
    qw = random_weight(generator, n=1500, k=640)
    x = random_x(generator, 1, 640)
    one = native.qmatmul_cpu(x, qw, activations="int8", n_threads=1)
    assert torch.equal(one, native.qmatmul_cpu(x, qw, activations="int8", n_threads=2))


def test_the_opt_in_reaches_the_kernel_through_every_entry(generator):
    qw = random_weight(generator, n=96, k=192)
    x = random_x(generator, 1, 192)
    int8, float32 = native.qmatmul_cpu(x, qw, activations="int8"), native.qmatmul_cpu(x, qw)
    assert not torch.equal(int8, float32)
    assert torch.equal(qmatmul(x, qw, activations="int8"), int8)
    assert torch.equal(qmatmul(x, qw, backend="cpu", activations="int8"), int8)
    with native.activations("int8"):
        assert torch.equal(qmatmul(x, qw), int8)
        assert torch.equal(native.qmatmul_cpu(x, qw, activations="float32"), float32)  # a call's own choice wins
    assert torch.equal(qmatmul(x, qw), float32)  # the block's setting ended with it


def test_bad_arguments_are_clear(generator):
    from quantlite.errors import BackendUnavailable
    from quantlite.kernels.dispatch import KernelInputError
    from quantlite.runtime.streaming import _checked_activations

    qw = random_weight(generator, n=8, k=64)
    with pytest.raises(NativeKernelError, match="activations 'int4' is not one of float32, int8"):
        native.qmatmul_cpu(torch.randn(1, 64), qw, activations="int4")
    with pytest.raises(NativeKernelError, match=r"int8 activations.*M=1, N=8, K=64.*outlier CSR is malformed"):
        cols = qw.outlier_cols.to(torch.int32).clone()
        cols[0] = 64
        native.qmatmul_cpu(torch.randn(1, 64), QWeight(**{**qw.__dict__, "outlier_cols": cols}), activations="int8")
    with pytest.raises(NativeKernelError, match=r"shape \(1, 63\)"):
        native.qmatmul_cpu(torch.randn(1, 63), qw, activations="int8")
    with pytest.raises(KernelInputError, match="activations 'int4'"):
        qmatmul(torch.randn(1, 64), qw, backend="torch", activations="int4")
    with pytest.raises(BackendUnavailable, match="activations='int8' runs on the native CPU back-end"):
        qmatmul(torch.randn(1, 64), qw, backend="torch", activations="int8")
    with pytest.raises(Exception, match="activations 'int4' is not one of 'float32', 'int8'"):
        _checked_activations("int4", torch.device("cpu"))
    with pytest.raises(Exception, match="opt-in of the CPU kernels"):
        _checked_activations("int8", torch.device("cuda"))


def test_the_native_decode_step_runs_the_opt_in_as_the_per_op_calls_do(seed, monkeypatch):
    from test_cpu_ops import decode_layer_steps, layer_weights, small_config

    config = dataclasses.replace(small_config(num_heads=9, num_kv_heads=3, head_dim=64, qk_norm=False),
                                 hidden_size=576, intermediate_size=1536)
    w = layer_weights(torch.Generator().manual_seed(seed), config, biased=False)
    runs = {}
    for way in ("float layer", "int8 layer", "int8 per op"):
        if way == "int8 per op":
            monkeypatch.setattr(cpu_ops, "takes_layer", lambda x, w: False)
        with native.activations("int8" if way.startswith("int8") else "float32"):
            runs[way] = decode_layer_steps(torch.Generator().manual_seed(seed + 1), config, w, 1, False)[0]
    for step, (layer, per_op, float_layer) in enumerate(zip(runs["int8 layer"], runs["int8 per op"], runs["float layer"])):
        assert torch.equal(layer, per_op), f"step {step}: the native step did not run the int8 kernel"
        assert not torch.equal(layer, float_layer), f"step {step}: the flag did not reach the native step"


def test_the_cli_flag_on_stories260k(stories260k_hf, shared_data, tmp_path, capsys):
    """`ppl --int8-activations` runs the opt-in through the streaming runtime at every M (prefill
    included): its perplexity moves, by less than a percent (docs/accuracy.md measures +0.09 % over
    64 windows; 1 % leaves room for 2 windows of 256); `generate` takes the flag; an HF folder,
    which the opt-in does not cover, is refused with one line."""
    import json

    from quantlite.cli import main as cli_main
    from quantlite.converter import convert

    packed = tmp_path / "packed"
    convert(stories260k_hf, packed, calibration="none", progress=False)
    data = str(shared_data / "tinystories_valid_sample.txt")
    ppl = {}
    for flag in ([], ["--int8-activations"]):
        assert cli_main(["ppl", str(packed), "--data", data, "--ctx", "256", "--max-windows", "2", "--json", *flag]) == 0
        ppl[bool(flag)] = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl[True] != ppl[False], "the flag did not change the arithmetic"
    assert ppl[True] == pytest.approx(ppl[False], rel=1e-2)
    assert cli_main(["generate", str(packed), "--prompt", "Once upon", "--max-new-tokens", "4", "--int8-activations"]) == 0
    capsys.readouterr()
    assert cli_main(["ppl", str(stories260k_hf), "--data", data, "--int8-activations"]) == 2
    assert "int8 activations are an opt-in of packed quantlite directories only" in capsys.readouterr().err


# ---------------------------------------------------------------- the AVX2 kernel (qmatmul_q8act_avx2.c)
# isa="avx2" forces it on any CPU that has AVX2 (an AVX-512 machine included); its integers are the
# rule's, so it agrees with the float64 rule to test 1's bound and with the portable rule (isa="scalar")
# to twice that (each lies within the bound of the same reference).
AVX2 = [isa for isa in ISAS if isa.values == ("avx2",)]


def assert_matches_rule_and_scalar(x: torch.Tensor, qw: QWeight, **call) -> torch.Tensor:
    y = native.qmatmul_cpu(x, qw, isa="avx2", activations="int8", **call)
    rule = int8_rule(x, qw)
    assert_matches_rule(y, x, qw, rule)
    scalar = native.qmatmul_cpu(x, qw, isa="scalar", activations="int8").double()
    bound = 4 * gamma(chain_length(qw) + 2) * rule["magnitude"] + 1e-30
    gap = (y.reshape(-1, qw.shape[0]).double() - scalar.reshape(-1, qw.shape[0])).abs()
    assert (gap <= bound).all(), f"AVX2 vs the portable rule: {(gap / bound).max().item():.3g} x the bound"
    return y


@pytest.mark.parametrize("isa", AVX2)
def test_avx2_every_m_from_1_to_33(generator, isa):
    qw = random_weight(generator, n=75, k=704, block_size=64)  # 11 strips of 64 columns
    for m in range(1, 34):
        assert_matches_rule_and_scalar(random_x(generator, m, 704), qw)


@pytest.mark.parametrize("isa", AVX2)
@pytest.mark.parametrize("block_size, k", [(32, 31), (32, 65), (32, 95), (48, 95), (48, 143), (48, 193), (64, 63),
                                           (64, 64), (64, 65), (64, 200), (128, 255), (128, 257), (256, 300)])
def test_avx2_k_around_block_and_strip_multiples(generator, isa, block_size, k):
    """Short last strips (8, 16, 24 code bytes: a dword-masked load), blocks that straddle strips
    (B = 48: up to three blocks in one strip's lanes)."""
    qw = random_weight(generator, n=33, k=k, block_size=block_size, outlier_frac=0.02)
    for m in (1, 2, 3, 5):
        assert_matches_rule_and_scalar(random_x(generator, m, k), qw)


@pytest.mark.parametrize("isa", AVX2)
@pytest.mark.parametrize("options", [dict(double_quant=True), dict(scale_dtype=torch.float16), dict(outlier_frac=0.05),
                                     dict(outlier_frac=0.0)])
def test_avx2_scale_kinds_and_outliers(generator, isa, options):
    options = {"outlier_frac": 0.01, **options}
    qw = random_weight(generator, n=97, k=640, **options)
    for m in (1, 4):
        assert_matches_rule_and_scalar(random_x(generator, m, 640), qw)


@pytest.mark.parametrize("isa", AVX2)
def test_avx2_full_scale_products_do_not_saturate(generator, isa):
    """Every product at +-127 x 127 and both of a pair with one sign: vpmaddubsw's int16 pair sum is
    +-32258, in range only with the sign trick (|x_q| unsigned, the level signed; a +128 bias as the
    VNNI kernel uses would saturate at 64516). Rows of +-1 quantize to the levels +-127, a constant
    |x| to x_q = +-127 (signs in runs of 2, so that both columns of a pair agree)."""
    n, k = 24, 256
    row_signs = torch.where(torch.rand(n, 1, generator=generator) < 0.5, -1.0, 1.0)
    qw = quantize(row_signs.expand(n, k).contiguous(), block_size=64, outlier_frac=0.0)
    column_signs = torch.where(torch.rand(3, k // 2, generator=generator) < 0.5, -1.0, 1.0).repeat_interleave(2, dim=1)
    x = 3.0 * column_signs
    y = assert_matches_rule_and_scalar(x, qw)
    exact = x.double() @ qw.dequantize(torch.float64).T  # the levels +-1 are +-127 / 127 exactly
    assert torch.allclose(y.double(), exact, rtol=1e-6, atol=0)


@pytest.mark.parametrize("isa", AVX2)
def test_avx2_rows_of_x_and_threads_do_not_change_an_output(generator, isa):
    """A total's terms do not depend on its tile: an M-row call gives the rows of smaller calls bit for
    bit (M > 1 each: at M = 1 chunk.h sums the outliers in another order), and 1, 2 or 3 threads the
    same bits (chunks of 32 rows, tiles of 4, 2 and 1 weight rows, x tiles of 4, 3, 2 and 1)."""
    qw = random_weight(generator, n=1501, k=576)
    x = random_x(generator, 7, 576)
    together = assert_matches_rule_and_scalar(x, qw, n_threads=2)
    pieces = [native.qmatmul_cpu(x[rows], qw, isa="avx2", activations="int8", n_threads=1)
              for rows in (slice(0, 2), slice(2, 5), slice(5, 7))]
    assert torch.equal(torch.cat(pieces), together)
    for threads in (1, 3):
        assert torch.equal(native.qmatmul_cpu(x, qw, isa="avx2", activations="int8", n_threads=threads), together)
    one_row = native.qmatmul_cpu(x[:1], qw, isa="avx2", activations="int8", n_threads=1)
    assert torch.equal(native.qmatmul_cpu(x[:1], qw, isa="avx2", activations="int8", n_threads=2), one_row)
