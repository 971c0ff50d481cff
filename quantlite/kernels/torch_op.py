"""torch.ops.quantlite.qmatmul and torch.ops.quantlite.dequantize: the kernels as PyTorch custom ops.

A QWeight is a Python object, not a tensor, so torch.compile would have to trace into the dispatcher
(ctypes calls, back-end choice, caches) and break the graph, and torch.export could not capture it at
all. The ops take the QWeight's tensors and sizes instead, are opaque to both, and carry a fake (meta)
implementation that gives the output's shape and dtype without running a kernel:

    torch.ops.quantlite.qmatmul(x, codebook, codes, outlier_row_ptr, outlier_cols, outlier_vals,
                                scales, scale_codes, scale_group_min, scale_group_step,
                                n, k, block_size, method) -> y
        x (..., K) fp16/bf16/fp32 -> y (..., N) in x's dtype, = x @ dequantize(W).T
    torch.ops.quantlite.dequantize(<the same weight arguments>, dtype) -> (N, K) dense weight

The tensors are the QWeight fields of docs/FORMAT.md (one of `scales` and the three double-quant
tensors is None). Inside, qmatmul calls quantlite.kernels.dispatch.qmatmul, which picks the back-end.
The kernels cache their compute layout per QWeight object (kernels.prepared), so the op finds the
QWeight its tensors came from (QLinear registers its weight with `remember`) instead of rebuilding
one, which would derive the layout again on every call.

Autograd: the gradient with respect to x is grad_y @ dequantize(W), through the dequantize op (the
weight is frozen: no gradient for it), so training adapters on top of QLinear works eagerly and
under torch.compile, with the fused kernel in the forward pass.
"""
import weakref
from typing import Optional

import torch

from quantlite.qweight import QWeight

_TENSOR_FIELDS = ("codebook", "codes", "outlier_row_ptr", "outlier_cols", "outlier_vals",
                  "scales", "scale_codes", "scale_group_min", "scale_group_step")
# id(codes) -> the live QWeight that owns those codes; checked field by field before use
_known: "weakref.WeakValueDictionary[int, QWeight]" = weakref.WeakValueDictionary()


def remember(qw: QWeight) -> QWeight:
    """Let the ops find `qw` (and so the kernels' cached layout) from its tensors while it lives."""
    _known[id(qw.codes)] = qw
    return qw


def weight_arguments(qw: QWeight) -> tuple:
    """The op arguments that stand for `qw`: its nine tensor fields (None where absent), then N, K,
    block size and method."""
    return (*(getattr(qw, name) for name in _TENSOR_FIELDS), *qw.shape, qw.block_size, qw.method)


def qmatmul(x: torch.Tensor, qw: QWeight) -> torch.Tensor:
    """torch.ops.quantlite.qmatmul on a QWeight: x (..., K) -> (..., N) in x's dtype."""
    return torch.ops.quantlite.qmatmul(x, *weight_arguments(qw))


def dequantize(qw: QWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """torch.ops.quantlite.dequantize on a QWeight: (N, K) of `dtype`."""
    return torch.ops.quantlite.dequantize(*weight_arguments(qw), dtype)


def _qweight(*arguments) -> QWeight:
    """The QWeight behind weight_arguments(...): the remembered one holding exactly these tensors, else
    a new one over them (QWeight checks their sizes and dtypes; works on fake tensors too)."""
    given = dict(zip(_TENSOR_FIELDS, arguments))
    n, k, block_size, method = arguments[len(_TENSOR_FIELDS):]
    known = _known.get(id(given["codes"]))
    if known is not None and all(getattr(known, name) is tensor for name, tensor in given.items()):
        return known
    return QWeight(shape=(n, k), block_size=block_size, method=method, **given)


# ---------------------------------------------------------------------------------------- qmatmul
@torch.library.custom_op("quantlite::qmatmul", mutates_args=())
def _qmatmul_op(
    x: torch.Tensor, codebook: torch.Tensor, codes: torch.Tensor, outlier_row_ptr: torch.Tensor,
    outlier_cols: torch.Tensor, outlier_vals: torch.Tensor, scales: Optional[torch.Tensor],
    scale_codes: Optional[torch.Tensor], scale_group_min: Optional[torch.Tensor],
    scale_group_step: Optional[torch.Tensor], n: int, k: int, block_size: int, method: str,
) -> torch.Tensor:
    from quantlite.kernels.dispatch import qmatmul as dispatch_qmatmul

    qw = _qweight(codebook, codes, outlier_row_ptr, outlier_cols, outlier_vals, scales, scale_codes,
                  scale_group_min, scale_group_step, n, k, block_size, method)
    return dispatch_qmatmul(x, qw)


@_qmatmul_op.register_fake
def _(x, codebook, codes, outlier_row_ptr, outlier_cols, outlier_vals, scales, scale_codes,
      scale_group_min, scale_group_step, n, k, block_size, method):
    from quantlite.kernels.dispatch import _check_inputs

    qw = _qweight(codebook, codes, outlier_row_ptr, outlier_cols, outlier_vals, scales, scale_codes,
                  scale_group_min, scale_group_step, n, k, block_size, method)
    _check_inputs(x, qw)  # the same one-line errors as eager, at trace time
    return x.new_empty(*x.shape[:-1], n)


def _setup_context(ctx, inputs, output):
    ctx.weight = inputs[1:]  # every argument after x
    ctx.x_dtype = inputs[0].dtype


def _backward(ctx, grad_y):
    # y = x @ W.T  =>  dL/dx = dL/dy @ W, in float32 like the reference back-end, cast to x's dtype
    weight = torch.ops.quantlite.dequantize(*ctx.weight, torch.float32)  # (N, K)
    grad_x = (grad_y.to(torch.float32) @ weight).to(ctx.x_dtype)
    return (grad_x,) + (None,) * len(ctx.weight)


_qmatmul_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------- dequantize
@torch.library.custom_op("quantlite::dequantize", mutates_args=())
def _dequantize_op(
    codebook: torch.Tensor, codes: torch.Tensor, outlier_row_ptr: torch.Tensor, outlier_cols: torch.Tensor,
    outlier_vals: torch.Tensor, scales: Optional[torch.Tensor], scale_codes: Optional[torch.Tensor],
    scale_group_min: Optional[torch.Tensor], scale_group_step: Optional[torch.Tensor], n: int, k: int,
    block_size: int, method: str, dtype: torch.dtype,
) -> torch.Tensor:
    qw = _qweight(codebook, codes, outlier_row_ptr, outlier_cols, outlier_vals, scales, scale_codes,
                  scale_group_min, scale_group_step, n, k, block_size, method)
    return qw.dequantize(dtype).contiguous()  # dequantize slices off the padding columns


@_dequantize_op.register_fake
def _(codebook, codes, outlier_row_ptr, outlier_cols, outlier_vals, scales, scale_codes, scale_group_min,
      scale_group_step, n, k, block_size, method, dtype):
    return codes.new_empty(n, k, dtype=dtype)

