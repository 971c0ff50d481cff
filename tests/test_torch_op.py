"""torch.ops.quantlite.qmatmul / dequantize: schema, fake implementation, autograd, and a model of
QLinears captured whole by torch.compile(fullgraph=True) and torch.export.

Tolerances are those of test_triton_qmatmul.assert_close_to_float64 (float32 roundoff times the
length of the sum times sum |x||w|, against a float64 product over the same dequantized weight),
applied to every layer's output of the compiled / exported model, so compilation can not hide an error
behind a looser bound.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from quantlite import quantize
from quantlite.kernels import torch_op
from quantlite.kernels.dispatch import KernelInputError
from quantlite.qlinear import QLinear
from test_triton_qmatmul import UNIT_ROUNDOFF, assert_close_to_float64


class TwoLayers(nn.Module):
    """x (..., 100) -> QLinear(100 -> 48, bias) -> ReLU -> QLinear(48 -> 24); returns both layers' outputs."""

    def __init__(self, generator: torch.Generator):
        super().__init__()
        self.up = QLinear(quantize(torch.randn(48, 100, generator=generator), outlier_frac=0.02),
                          bias=torch.randn(48, generator=generator))
        self.down = QLinear(quantize(torch.randn(24, 48, generator=generator), method="nf4", double_quant=True))

    def forward(self, x):
        hidden = self.up(x)  # (..., 48)
        return hidden, self.down(torch.relu(hidden))  # (..., 24)


def assert_layers_close_to_float64(model: TwoLayers, x: torch.Tensor, hidden: torch.Tensor, y: torch.Tensor) -> None:
    rows = x.reshape(-1, 100)
    assert_close_to_float64((hidden - model.up.bias).reshape(-1, 48), rows, model.up.qweight)
    assert_close_to_float64(y.reshape(-1, 24), torch.relu(hidden).reshape(-1, 48), model.down.qweight)


def weights(generator):
    """A weight with fp16 scales and outliers, and one double-quantized without outliers."""
    return [quantize(torch.randn(37, 100, generator=generator), outlier_frac=0.02),
            quantize(torch.randn(16, 64, generator=generator), method="nf4", double_quant=True, outlier_frac=0.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_schema_fake_and_autograd(generator, dtype):
    for qw in weights(generator):
        for requires_grad in (False, True):
            x = torch.randn(3, qw.shape[1], generator=generator).to(dtype).requires_grad_(requires_grad)
            torch.library.opcheck(torch.ops.quantlite.qmatmul.default, (x, *torch_op.weight_arguments(qw)))
        torch.library.opcheck(torch.ops.quantlite.dequantize.default, (*torch_op.weight_arguments(qw), dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fake_implementation_gives_shape_and_dtype_and_checks_inputs(generator, dtype):
    qw = weights(generator)[0].to("meta")  # meta tensors: only the fake implementation can run
    y = torch_op.qmatmul(torch.empty(2, 5, 100, dtype=dtype, device="meta"), qw)
    assert (y.shape, y.dtype, y.device.type) == ((2, 5, 37), dtype, "meta")
    w = torch_op.dequantize(qw, dtype)
    assert (w.shape, w.dtype) == ((37, 100), dtype)
    with pytest.raises(KernelInputError, match="K=100"):
        torch_op.qmatmul(torch.empty(2, 99, device="meta"), qw)
    with pytest.raises(KernelInputError, match="float16, bfloat16 or float32"):
        torch_op.qmatmul(torch.empty(2, 100, dtype=torch.float64, device="meta"), qw)


def test_dequantize_op_equals_qweight_dequantize(generator):
    for qw in weights(generator):
        assert torch.equal(torch_op.dequantize(qw), qw.dequantize())


def test_the_op_reuses_the_qlinears_weight(generator, monkeypatch):
    """The kernels cache their layout per QWeight object: the op must find QLinear's, not rebuild one."""
    model = TwoLayers(generator)
    found = []
    lookup = torch_op._qweight
    monkeypatch.setattr(torch_op, "_qweight", lambda *args: found.append(lookup(*args)) or found[-1])
    with torch.no_grad():
        model(torch.randn(2, 100, generator=generator))
    assert found[0] is model.up.qweight and found[1] is model.down.qweight


def test_gradient_with_respect_to_x(generator):
    qw = weights(generator)[0]
    layer = QLinear(qw)
    x = torch.randn(4, 100, generator=generator, requires_grad=True)
    upstream = torch.randn(4, 37, generator=generator)  # (M, N) dL/dy
    (layer(x) * upstream).sum().backward()
    w64 = qw.dequantize(torch.float64)  # (N, K)
    expected = upstream.double() @ w64  # (M, K) dL/dx = dL/dy @ W
    u32 = UNIT_ROUNDOFF[torch.float32]
    bound = (37 + 2) * u32 * (upstream.double().abs() @ w64.abs()) + u32 * expected.abs()
    assert bool(((x.grad.double() - expected).abs() <= bound).all())


def test_compile_fullgraph_forward_and_backward(generator):
    """aot_eager: dynamo's full graph and AOT autograd through the fake and backward implementations,
    without C++ compilation (the inductor test below does that)."""
    model = TwoLayers(generator)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 100, generator=generator, requires_grad=True)
    hidden, y = compiled(x)
    assert_layers_close_to_float64(model, x.detach(), hidden.detach(), y.detach())
    y.sum().backward()
    eager_x = x.detach().clone().requires_grad_()
    model(eager_x)[1].sum().backward()
    assert torch.equal(x.grad, eager_x.grad)  # the same ops on the same values


@pytest.mark.slow
def test_compile_inductor_fullgraph(generator):
    model = TwoLayers(generator)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 5, 100, generator=generator)
    with torch.no_grad():
        hidden, y = compiled(x)
        assert_layers_close_to_float64(model, x, hidden, y)
        eager_hidden, eager_y = model(x)
    assert torch.equal(hidden, eager_hidden)  # both call the same kernel on the same x


def test_export_captures_the_op_and_runs_other_batch_sizes(generator, tmp_path):
    model = TwoLayers(generator)
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(3, 5, 100, generator=generator),),
                                  dynamic_shapes={"x": {0: batch}})
    targets = [node.target for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.quantlite.qmatmul.default) == 2
    x = torch.randn(7, 5, 100, generator=generator)  # fresh input, another batch size
    hidden, y = program.module()(x)
    assert y.shape == (7, 5, 24)
    assert_layers_close_to_float64(model, x, hidden, y)
    torch.export.save(program, tmp_path / "model.pt2")  # the op and the weight tensors serialize
    reloaded = torch.export.load(tmp_path / "model.pt2").module()(x)
    assert torch.equal(reloaded[0], hidden) and torch.equal(reloaded[1], y)
