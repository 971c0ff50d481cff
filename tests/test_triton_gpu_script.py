"""benchmarks/gpu_kernels.py on a machine without a GPU: its argument handling, its synthetic weights
(valid QWeights with the outlier count asked for), its goal arithmetic, and a clear refusal."""
from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_kernels
from quantlite.qweight import QWeight


def test_rejects_bad_arguments(capsys):
    for argv, message in ((["--m", "0"], "--m values must be positive"),
                          (["--outlier-frac", "0.5"], "--outlier-frac must be in"),
                          (["--block-size", "40"], "--block-size must be a multiple of 16"),
                          (["--models", "13b"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_kernels.parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_refuses_clearly_without_cuda(capsys):
    assert gpu_kernels.main(["--skip-tests", "--models", "8b", "--m", "1"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("n,k,block_size,frac", [(24, 4096, 64, 0.005), (7, 1000, 48, 0.01), (5, 128, 32, 0.0)])
def test_synthetic_weight_is_valid_with_the_outliers_asked_for(n, k, block_size, frac):
    qweight = gpu_kernels.synthetic_qweight(n, k, block_size, frac, "cpu")
    again = QWeight.from_dict(qweight.to_dict())  # the format's validation: CSR order, sizes, dtypes
    assert again.shape == (n, k) and again.n_outliers == n * round(frac * k)
    expected = qweight.codes.numel() + 4 * qweight.scales.numel() + 4 * (n + 1) + 8 * qweight.n_outliers
    assert gpu_kernels.compute_bytes(qweight) == expected


def test_goal_report_weighs_each_shape_by_its_count_in_a_layer():
    shapes = gpu_kernels.layer_shapes("8b")
    # bf16 takes 3 ms per shape, ours 1 ms except down_proj at 3 ms: layer = (2+2+2)*1 + 3 = 9 vs 21 ms
    rows = [{"model": "8b", "layer": layer, "M": 1, "bf16_ms": 3.0, "triton_ms": 3.0 if layer == "down_proj" else 1.0}
            for layer in shapes]
    (line,) = gpu_kernels.goal_report(rows, ["triton"])
    assert "bf16   21.000 ms" in line and "ours    9.000 ms" in line and "2.33x" in line and "NOT met" in line
