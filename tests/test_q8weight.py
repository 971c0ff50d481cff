"""Q8Weight (block-scaled int8, the head and embedding's default): quantization error, the flat-dict
round trip and what its reader rejects, the matmul on every back-end that takes it against a float64
reference, and the runtime's row gather."""
from __future__ import annotations

import pytest
import torch

from quantlite.errors import BackendUnavailable, FormatError, QuantizationInputError
from quantlite.kernels.dispatch import available_backends, qmatmul
from quantlite.q8weight import Q8Weight, quantize_int8, read_quantized
from quantlite.quantizer import quantize
from quantlite.qweight import QWeight
from test_triton_qmatmul import UNIT_ROUNDOFF

SHAPES = [(37, 150, 64), (129, 97, 32), (5, 64, 64), (64, 200, 48)]  # (N, K, B): odd N, K off block multiples


def random_weight(n: int, k: int, generator: torch.Generator) -> torch.Tensor:
    w = torch.randn(n, k, generator=generator) * 0.05
    w[0, :min(k, 40)] *= 30.0  # a row of large weights, and its blocks' scales with it
    w[-1] = 0.0                # an all-zero row: scale 0
    return w


@pytest.mark.parametrize("n, k, block", SHAPES)
def test_quantization_error_is_within_half_a_step(generator, n, k, block):
    w = random_weight(n, k, generator).double()
    qw = quantize_int8(w, block)
    assert qw.qs.shape == (n, qw.padded_k) and qw.scales.shape == (n, qw.n_blocks) and qw.scales.dtype == torch.float16
    assert bool((qw.qs[:, k:] == 0).all()) and int(qw.qs.abs().max()) <= 127
    # round to nearest: |w - q s| <= s / 2; where the float16 scale rounded below absmax / 127 the clamp
    # at 127 adds at most absmax - 127 s <= absmax * 2**-11 (float16's unit roundoff).
    step = qw.scales.double().repeat_interleave(block, dim=1)[:, :k]
    absmax = w.abs().reshape(n, -1).amax(1, keepdim=True)
    bound = step / 2 * (1 + 1e-12) + absmax * 2.0**-11
    error = (qw.dequantize(torch.float64) - w).abs()
    assert bool((error <= bound).all()), float((error - bound).max())
    assert bool((qw.dequantize()[-1] == 0).all())
    blocks = -(-k // block)  # the format: int8 codes padded to whole blocks, one float16 scale a block, the meta bytes
    stored = n * blocks * block + 2 * n * blocks + qw.to_dict()["meta"].numel()
    assert qw.bits_per_weight == pytest.approx(8 * stored / (n * k))


def test_round_trip_through_the_flat_dict(generator):
    qw = quantize_int8(random_weight(37, 150, generator), 64)
    tensors = qw.to_dict("head.")
    assert set(tensors) == {"head.meta", "head.qs", "head.scales"}
    back = read_quantized(tensors, "head.", "head")
    assert isinstance(back, Q8Weight) and back.shape == qw.shape and back.block_size == 64
    assert torch.equal(back.qs, qw.qs) and torch.equal(back.scales, qw.scales)
    assert qw.nbytes == 37 * 192 + 37 * 3 * 2 + tensors["head.meta"].numel()  # codes padded to 3 blocks of 64, 3 float16 scales a row
    four_bit = quantize(random_weight(37, 150, generator))  # the same reader gives a QWeight its class
    assert isinstance(read_quantized(four_bit.to_dict("w."), "w.", "w"), QWeight)


def _meta(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


@pytest.mark.parametrize("damage, message", [
    (lambda t: t.pop("qs"), "missing tensor 'qs'"),
    (lambda t: t.update(qs=t["qs"].view(torch.uint8)), "qs has dtype uint8, expected int8"),
    (lambda t: t.update(qs=t["qs"][:, :-16]), r"qs has shape \(37, 176\), expected \(37, 192\)"),
    (lambda t: t.update(scales=t["scales"].float()), "scales has dtype float32, expected float16"),
    (lambda t: t["qs"].__setitem__((3, 5), -128), "holds -128"),
    (lambda t: t["scales"].__setitem__((1, 1), -1.0), "finite and non-negative"),
    (lambda t: t["scales"].__setitem__((1, 1), float("nan")), "finite and non-negative"),
    (lambda t: t.update(meta=_meta('{"format": "quantlite.q8weight", "version": 2, "shape": [37, 150], "block_size": 64}')),
     "quantlite.q8weight version 2 is not supported"),
    (lambda t: t.update(meta=_meta('{"format": "quantlite.q8weight", "version": 1, "shape": [37, 150], "block_size": 40}')),
     "block_size 40"),
    (lambda t: t.update(meta=_meta('{"format": "quantlite.q8weight", "version": 1, "shape": [37], "block_size": 64}')),
     "shape"),
])
def test_the_reader_rejects_bad_int8_tensors(generator, damage, message):
    tensors = quantize_int8(random_weight(37, 150, generator), 64).to_dict()
    tensors = {name: tensor.clone() for name, tensor in tensors.items()}
    damage(tensors)
    with pytest.raises(FormatError, match=message):
        read_quantized(tensors, "", "lm_head.weight")


def test_quantize_int8_refuses_what_it_cannot_store():
    with pytest.raises(QuantizationInputError, match="2-D float"):
        quantize_int8(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(QuantizationInputError, match="block_size 24"):
        quantize_int8(torch.zeros(4, 64), 24)
    with pytest.raises(QuantizationInputError, match="NaN or infinity"):
        quantize_int8(torch.full((2, 64), float("inf")))
    with pytest.raises(QuantizationInputError, match="does not fit int8"):
        quantize_int8(torch.full((2, 64), 1e30, dtype=torch.float64))


def int8_backends() -> list[str]:
    live = available_backends()
    return ["torch"] + (["cpu"] if live["cpu"] is None else [])


@pytest.mark.parametrize("backend", int8_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, k, block", SHAPES)
def test_qmatmul_matches_float64(generator, backend, dtype, n, k, block):
    qw = quantize_int8(random_weight(n, k, generator), block)
    for m in (1, 2, 3, 7, 16, 33, 70):
        x = torch.randn(m, k, generator=generator).to(dtype)
        y = qmatmul(x, qw, backend)
        assert y.dtype == dtype and y.shape == (m, n)
        assert_float32_accumulation(y, x, qw, f"M={m}")


def assert_float32_accumulation(y: torch.Tensor, x: torch.Tensor, qw, what: str) -> None:
    """y (M, N) against x (M, K) @ qw's float64 dequantization within float32 accumulation's bound:
    K products and one scale product per block, summed in any order, plus a few lane additions:
    |error| <= gamma * sum |x||w| with gamma = c u / (1 - c u), c = K + blocks + 16 (Higham, Accuracy
    and Stability, 3.1); then one rounding of the output to its dtype."""
    w64 = qw.dequantize(torch.float64)
    exact = x.double() @ w64.T
    count = x.shape[-1] + qw.n_blocks + 16
    gamma = count * 2.0**-24 / (1 - count * 2.0**-24)
    bound = gamma * (x.double().abs() @ w64.abs().T) + UNIT_ROUNDOFF[y.dtype] * exact.abs() + 1e-30
    error = (y.double() - exact).abs()
    worst = int((error - bound).argmax())
    assert bool((error <= bound).all()), (f"{what}: element {divmod(worst, y.shape[-1])} error "
                                          f"{float(error.flatten()[worst]):.3g} > {float(bound.flatten()[worst]):.3g}")


def test_qmatmul_keeps_leading_dimensions_and_refuses_fused_gpu_back_ends(generator):
    qw = quantize_int8(random_weight(37, 150, generator), 64)
    x = torch.randn(2, 3, 150, generator=generator)
    y = qmatmul(x, qw)
    assert y.shape == (2, 3, 37)
    assert_float32_accumulation(y.reshape(6, 37), x.reshape(6, 150), qw, "(2, 3, 150) input")
    for name in ("cuda", "triton"):
        with pytest.raises(BackendUnavailable, match=name):
            qmatmul(x, qw, name)


def test_the_runtime_gathers_embedding_rows_and_runs_the_head(generator):
    from quantlite.runtime.llama import embed, linear

    qw = quantize_int8(random_weight(300, 96, generator), 32)
    ids = torch.tensor([[5, 299, 5], [0, 17, 42]])
    table = qw.dequantize()
    assert torch.equal(embed(ids, qw, torch.float32), table[ids])
    x = torch.randn(2, 3, 96, generator=generator)
    assert torch.allclose(linear(x, qw), x @ table.T, rtol=1e-4, atol=1e-5)
