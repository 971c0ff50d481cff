"""to_transformers(packed_dir): a packed quantlite model as the Hugging Face model class of its checkpoint.

    model = quantlite.to_transformers("packed/")          # e.g. LlamaForCausalLM, float32, CPU
    tokenizer = transformers.AutoTokenizer.from_pretrained("packed/tokenizer", trust_remote_code=False)
    model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=20)

The model is built from the manifest's config (no download) with its parameters on the meta device,
then filled from the packed folder: every quantized Linear weight becomes a QLinear holding the
packed QWeight itself (never a dense copy), norms and biases become float32 Parameters. The whole
model is resident in memory, unlike quantlite.load's streaming runtime.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from quantlite.errors import QuantliteError
from quantlite.packed import PackedModel
from quantlite.qlinear import QLinear
from quantlite.qweight import QWeight
from quantlite.model_config import EMBEDDING, FINAL_NORM, LM_HEAD

WEIGHT_SUFFIX = ".weight"


def to_transformers(packed_dir: str | Path):
    """The transformers model of the packed checkpoint at `packed_dir`, float32 on the CPU, in eval mode.

    Linear layers stored as QWeights are QLinear modules over the packed weights (torch.ops.quantlite
    .qmatmul, differentiable with respect to their input, so generate, pipelines and adapters trained
    on top work). The embedding is an ordinary nn.Embedding: a quantized table (4-bit QWeight or int8
    Q8Weight) is dequantized into it (a vocab x hidden float32 copy), because transformers indexes `embed_tokens.weight` directly. The
    head is a QLinear when it is stored as a QWeight (when tied to a quantized embedding it shares that
    QWeight, and `config.tie_word_embeddings` is set to False so transformers does not re-tie it to the
    dense table), else an nn.Linear over its plain or dequantized weight (an int8 Q8Weight head: a
    vocab x hidden float32 copy). Raises FormatError for a
    packed folder that fails its checks."""
    import transformers

    packed = PackedModel.open(packed_dir)
    config = transformers.AutoConfig.for_model(**packed.config)
    with _parameters_on_meta():
        # the config comes from a folder nobody vouches for: an `auto_map` in it never runs code
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=False)

    for index in range(packed.num_layers):
        tensors = packed.load_layer(index)
        for name, value in tensors.items():
            _place(model, f"model.layers.{index}.{name}", value, tensors.get(name[: -len(WEIGHT_SUFFIX)] + ".bias"))
    embedding = packed.load_embedding()
    _place(model, EMBEDDING, _dense(embedding))
    final = packed.load_final()
    _place(model, FINAL_NORM, final[FINAL_NORM])
    if not packed.model_config.tie_word_embeddings:
        _place(model, LM_HEAD, final[LM_HEAD])
    elif isinstance(embedding, QWeight):
        _place(model, LM_HEAD, embedding)
        model.config.tie_word_embeddings = False  # the head is the QWeight; the dense table is the embedding's
    else:
        model.lm_head.weight = model.get_input_embeddings().weight  # tied: one Parameter, as transformers does

    left = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if left:
        raise QuantliteError(f"{packed.path}: the packed model has no value for {', '.join(left[:5])}"
                             f"{' ...' if len(left) > 5 else ''} of {type(model).__name__}")
    return model.eval()


def _place(model: nn.Module, name: str, value, bias: torch.Tensor | None = None) -> None:
    """Put one packed value under its HF name: a QWeight `X.weight` replaces the Linear X by a
    QLinear (with X.bias, which is then placed with it); anything else becomes a float32 Parameter."""
    module_name, _, leaf = name.rpartition(".")
    if isinstance(value, QWeight):
        parent_name, _, child = module_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, QLinear(value, None if bias is None else bias.float()))
    elif not (leaf == "bias" and isinstance(model.get_submodule(module_name), QLinear)):  # placed with its weight
        setattr(model.get_submodule(module_name), leaf, nn.Parameter(_dense(value)))


def _dense(value) -> torch.Tensor:
    """A plain tensor as float32, or a quantized one (QWeight, or any stored type with .dequantize) dequantized."""
    return value.float() if isinstance(value, torch.Tensor) else value.dequantize(torch.float32)


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters created inside are on the meta device (no memory, no random init); buffers such as
    the rotary frequencies are computed as usual. (What accelerate's init_empty_weights does.)"""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None:
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
