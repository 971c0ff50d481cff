"""quantlite: NF4 + sparse-outlier quantization, fused dequant-matmul kernels, layer-streaming Llama.

The public names are imported on first use, so `import quantlite` stays cheap and the command
line's `--help` does not load torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QWeight": "quantlite.qweight",
    "quantize": "quantlite.quantizer",
    "METHODS": "quantlite.quantizer",
    "nf4_codebook": "quantlite.codebook",
    "qmatmul": "quantlite.kernels.dispatch",
    "available_backends": "quantlite.kernels.dispatch",
    "default_backend": "quantlite.kernels.dispatch",
    "QLinear": "quantlite.qlinear",
    "quantize_model": "quantlite.qlinear",
    "convert": "quantlite.converter",
    "PackedModel": "quantlite.packed",
    "load": "quantlite.runtime.streaming",
    "StreamingLlama": "quantlite.runtime.streaming",
    "to_transformers": "quantlite.integrations.huggingface",
    "eval": "quantlite.eval",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quantlite' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    value = module if name == "eval" else getattr(module, name)
    globals()[name] = value
    return value
