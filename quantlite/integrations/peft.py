"""LoRA (PEFT) adapters on QLinear layers: PEFT wraps the layer types it knows, and QLinear is taught here.

    model = quantlite.to_transformers("packed/")
    model = peft.get_peft_model(model, lora_config(r=8, target_modules=["q_proj", "v_proj"]))

The adapter is PEFT's own lora.Linear around the QLinear: y = QLinear(x) + scaling * B(A(x)), the
4-bit weight frozen, A and B trained (the QLinear passes the gradient on to x, torch_op). Merging
the adapter into the weight (`merge_and_unload`) is not supported: the weight is quantized.
"""
from __future__ import annotations

import peft
from peft.tuners.lora.layer import Linear as LoraLinear

from quantlite.qlinear import QLinear


class LoraQLinear(LoraLinear):
    """PEFT's LoRA Linear over a QLinear base layer."""

    def _get_base_layer_device_and_dtype(self, base_layer):
        # PEFT reads `.qweight.dtype` (the GPTQ convention) to place the adapter; a QWeight has no
        # single dtype, and the adapter stays float32 like the QLinear's output
        return base_layer.qweight.device, None


def lora_config(**options) -> peft.LoraConfig:
    """peft.LoraConfig(**options) whose target modules may be QLinear layers."""
    config = peft.LoraConfig(**options)
    config._register_custom_module({QLinear: LoraQLinear})
    return config
