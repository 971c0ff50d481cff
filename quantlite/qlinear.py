"""QLinear, a drop-in nn.Linear holding a 4-bit QWeight, and quantize_model, which swaps them in.

    model = transformers.LlamaForCausalLM(config)
    quantize_model(model)                       # every nn.Linear but lm_head -> QLinear (method "quantlite")
    quantize_model(model, method="nf4", skip=("lm_head", "down_proj"))

forward is `torch.ops.quantlite.qmatmul(x, <qweight's tensors>) + bias` (quantlite.kernels.torch_op:
a custom op around the dispatcher's qmatmul, the call the streaming runtime makes), so torch.compile
(fullgraph=True) and torch.export capture a model of QLinears without graph breaks, and x gets a
gradient (the weight is frozen). The QWeight is frozen state, not a Parameter: `.to(device)` moves it,
dtype casts (`model.half()`) leave its codes and scales alone and only change the bias, and
`state_dict()` holds its flat dict under `<module>.qweight.*` (docs/FORMAT.md names).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from quantlite.errors import QuantizationInputError
from quantlite.kernels import torch_op
from quantlite.quantizer import quantize
from quantlite.qweight import QWeight

QWEIGHT_PREFIX = "qweight."


class QLinear(nn.Module):
    """y = x @ dequant(qweight).T + bias, for x (..., in_features) in fp16/bf16/fp32."""

    def __init__(self, qweight: QWeight, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(qweight, QWeight):
            raise QuantizationInputError(f"QLinear needs a QWeight, got {type(qweight).__name__}")
        self.out_features, self.in_features = qweight.shape
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise QuantizationInputError(f"bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
        self.qweight = qweight
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def qweight(self) -> QWeight:
        return self._qweight  # (out_features, in_features) 4-bit codes + scales + CSR outliers

    @qweight.setter
    def qweight(self, qweight: QWeight) -> None:
        self._qweight = torch_op.remember(qweight)  # the op finds it (and the kernels' cached layout)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **quant_options) -> "QLinear":
        """Quantize `linear.weight` with quantlite.quantize(**quant_options); the bias is kept as is.
        Quantization runs on the CPU; the result lives on the Linear's device."""
        if not isinstance(linear, nn.Linear):
            raise QuantizationInputError(f"from_linear needs an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight.detach()
        if weight.device.type == "meta":
            raise QuantizationInputError("the Linear's weight is on the meta device (not loaded): nothing to quantize")
        qweight = quantize(weight.cpu(), **quant_options).to(weight.device)
        return cls(qweight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch_op.qmatmul(x, self.qweight)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out_features, in_features) dense weight, e.g. to build a reference nn.Linear."""
        return self.qweight.dequantize(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.qweight}"

    # ------------------------------------------------------------------ nn.Module plumbing
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # fn may also cast floating tensors (model.half()); the QWeight only follows the device.
        device = fn(torch.empty(0, device=self.qweight.device)).device
        if device != self.qweight.device:
            self.qweight = self.qweight.to(device)
        return self

    def __setstate__(self, state):  # copy.deepcopy and pickle set __dict__ without the property
        super().__setstate__(state)
        torch_op.remember(self._qweight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination.update(self.qweight.to_dict(prefix + QWEIGHT_PREFIX))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = prefix + QWEIGHT_PREFIX
        tensors = {key: value.cpu() for key, value in state_dict.items() if key.startswith(own)}
        if tensors:
            self.qweight = QWeight.from_dict(tensors, prefix=own).to(self.qweight.device)
        else:
            missing_keys.append(own + "codes")
        rest = {key: value for key, value in state_dict.items() if not key.startswith(own)}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)


def quantize_model(model: nn.Module, *, skip: Iterable[str] = ("lm_head",), progress: bool = True,
                   **quant_options) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` (exactly that type: subclasses such as
    MultiheadAttention's out_projection read .weight directly) by a QLinear, and return the model.

    skip: module names left in full precision, matched against the full dotted name or its last
    part ("lm_head" skips "lm_head", "down_proj" skips every "model.layers.*.mlp.down_proj").
    quant_options go to quantlite.quantize(method, block_size, outlier_frac, ...)."""
    if not isinstance(model, nn.Module):
        raise QuantizationInputError(f"quantize_model needs a torch nn.Module, got {type(model).__name__}")
    if type(model) is nn.Linear:
        raise QuantizationInputError("the model is itself an nn.Linear: use QLinear.from_linear(linear) instead")
    skip = {skip} if isinstance(skip, str) else set(skip)
    targets = [
        (name, module) for name, module in model.named_modules(remove_duplicate=False)
        if type(module) is nn.Linear and name not in skip and name.rpartition(".")[2] not in skip
    ]
    replaced: dict[int, QLinear] = {}  # id(Linear) -> its QLinear: a Linear shared by two parents stays shared
    for name, linear in tqdm(targets, desc="quantize", unit="linear", disable=not progress):
        if id(linear) not in replaced:
            replaced[id(linear)] = QLinear.from_linear(linear, name=name, **quant_options)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replaced[id(linear)])
    return model
