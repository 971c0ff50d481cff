"""The data-free study's helpers (benchmarks/rotation.py, benchmarks/datafree_sweep.py, the peers of
benchmarks/accuracy.py): the rotation keeps x W^T exactly, and each round trip is a faithful stand-in
for the weight it replaces. Checked against float64 on fresh random inputs."""
import pytest
import torch

from benchmarks.datafree_sweep import output_error
from benchmarks.rotation import hadamard, random_signs, rotate, rotated_quantizer
from quantlite.quantizer import quantize


@pytest.mark.parametrize("size", [1, 2, 16, 64])
def test_hadamard_is_orthogonal_with_plus_minus_entries(size):
    h = hadamard(size)
    assert torch.allclose(h @ h.T, torch.eye(size, dtype=torch.float64), atol=1e-12)
    assert bool((h.abs() * size**0.5 - 1).abs().max() < 1e-12)


def test_hadamard_refuses_a_size_that_is_not_a_power_of_two():
    with pytest.raises(ValueError, match="power of two"):
        hadamard(48)


@pytest.mark.parametrize("k", [64, 192, 172])  # 172: two full blocks and a 44-column tail left as it is
def test_rotation_keeps_the_product_and_inverts(generator, k):
    w = torch.randn(24, k, generator=generator, dtype=torch.float64)
    x = torch.randn(5, k, generator=generator, dtype=torch.float64)
    # x rotated the same way: rotate() of x's rows is x T
    assert torch.allclose(rotate(x) @ rotate(w).T, x @ w.T, atol=1e-10)
    assert torch.allclose(rotate(rotate(w), inverse=True), w, atol=1e-12)
    assert torch.equal(rotate(w)[:, k // 64 * 64:], w[:, k // 64 * 64:])
    assert set(random_signs(k).tolist()) <= {-1.0, 1.0}


def test_rotated_quantizer_dequantizes_to_the_original_basis(generator):
    w = torch.randn(32, 128, generator=generator)
    plain = lambda w, name: quantize(w, method="nf4", name=name)  # noqa: E731
    rotated = rotated_quantizer(plain, 64, ("v_proj",))
    # a name outside the listed types is quantized as it is
    assert torch.equal(rotated(w, "layers.0.q_proj.weight").dequantize(), plain(w, "q").dequantize())
    qw = rotated(w, "layers.0.v_proj.weight")
    expected = rotate(quantize(rotate(w).float(), method="nf4").dequantize().double(), inverse=True)
    assert torch.allclose(qw.dequantize().double(), expected, atol=1e-6)
    # and it is an approximation of w in w's own basis, as good as NF4 makes it (relative error < 15 %)
    assert float((qw.dequantize() - w).norm() / w.norm()) < 0.15
    assert qw.nbytes == quantize(w, method="nf4").nbytes


def test_output_error_matches_a_float64_computation(generator):
    w = torch.randn(8, 16, generator=generator)
    w_hat = w + 0.01 * torch.randn(8, 16, generator=generator)
    x = torch.randn(100, 16, generator=generator, dtype=torch.float64)
    h = x.T @ x / 100
    expected = ((x @ (w_hat - w).double().T).square().sum() / (x @ w.double().T).square().sum()).item()
    assert output_error(w, w_hat, h) == pytest.approx(expected, rel=1e-9)


def test_hqq_peer_round_trip_and_size(generator):
    pytest.importorskip("hqq", reason="hqq (the 'peers' extra) is not installed")
    from benchmarks.accuracy import HQQ4Bit

    w = torch.randn(16, 128, generator=generator)
    peer = HQQ4Bit(w)
    assert peer.nbytes == 16 * 128 // 2 + 2 * 2 * (16 * 128 // 64)  # 4.5 bits/weight
    error = float((peer.dequantize() - w).norm() / w.norm())
    assert 0 < error < 0.15


def test_sweep_options_take_a_block_size_per_tensor_type():
    from benchmarks.datafree_sweep import options_for

    options = {"refine_scales": True, "block_size": {"q_proj": 32, "k_proj": 32}}
    assert options_for(options, "model.layers.3.self_attn.k_proj.weight") == {"refine_scales": True, "block_size": 32}
    assert options_for(options, "model.layers.3.mlp.down_proj.weight") == {"refine_scales": True, "block_size": 64}
    assert options_for({"block_size": 128}, "model.layers.0.mlp.up_proj.weight") == {"block_size": 128}
