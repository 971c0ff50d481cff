"""Open what `quantlite ppl` can measure: a packed quantlite directory, an HF checkpoint folder or a
GGUF file, each as a logits callable plus the tokenizer that belongs to it.

  packed directory (has quantlite.json)  -> quantlite's streaming runtime (quantlite.load)
  HF folder (has config.json)            -> transformers' AutoModelForCausalLM, float32: the
                                            unquantized baseline
  file ending in .gguf                   -> transformers' GGUF reader (dequantized to float32)

All three are tokenized by transformers' AutoTokenizer from the model's own tokenizer files, so a
packed model and its source see the very same token ids.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from quantlite.eval.ppl import EvaluationError

MANIFEST_NAME = "quantlite.json"


@dataclass
class EvalModel:
    forward: Callable[[torch.Tensor], torch.Tensor]  # (b, s) int64 -> (b, s, vocab) logits
    tokenizer: object                                # a transformers tokenizer
    kind: str                                        # "packed", "hf" or "gguf"
    path: Path

    @property
    def bos_id(self) -> int | None:
        """The BOS id when the tokenizer puts one before a text (Llama-2 does, SmolLM2 does not), else
        None: llama.cpp's perplexity starts each window with BOS only in the first case."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        prepended = self.tokenizer("a").input_ids[:1] == [bos]
        return bos if bos is not None and prepended else None

    def tokenize(self, text: str) -> torch.Tensor:
        """(n,) int64: the whole text as one stream, with the tokenizer's own special tokens
        (e.g. one BOS at the very start for Llama-2 tokenizers, nothing for SmolLM2)."""
        ids = self.tokenizer(text, return_tensors="pt").input_ids  # (1, n)
        return ids[0].to(torch.int64)


def open_for_eval(path: str | Path, device: str = "cpu", **load_options) -> EvalModel:
    """Open `path` for evaluation; raises EvaluationError when it is none of the three kinds.
    load_options: quantlite.load's (memory_budget, distributed, ...) for a packed directory."""
    path = Path(path)
    if path.is_dir() and (path / MANIFEST_NAME).exists():
        return _open_packed(path, device, **load_options)
    if load_options.get("distributed"):
        raise EvaluationError(f"{path}: a distributed run (torchrun) pipelines packed quantlite directories only")
    if load_options.get("activations", "float32") != "float32":
        raise EvaluationError(f"{path}: int8 activations are an opt-in of packed quantlite directories only")
    if path.is_dir() and (path / "config.json").exists():
        return _open_transformers(path, None, device, "hf")
    if path.is_file() and path.suffix == ".gguf":
        return _open_transformers(path.parent, path.name, device, "gguf")
    if not path.exists():
        raise EvaluationError(f"{path} does not exist")
    raise EvaluationError(
        f"{path} is neither a packed quantlite directory ({MANIFEST_NAME}), an HF checkpoint folder "
        "(config.json) nor a .gguf file"
    )


def _open_packed(path: Path, device: str, **load_options) -> EvalModel:
    from quantlite.packed import PackedModel
    from quantlite.runtime.streaming import load

    from quantlite.runtime.generate import Tokenizer

    packed = PackedModel.open(path)
    Tokenizer(packed.tokenizer_dir)  # the tokenizer files' own checks (regular files, JSON limits) first
    model = load(path, device=device, **load_options)
    return EvalModel(model, _auto_tokenizer(packed.tokenizer_dir, None), "packed", path)


def _open_transformers(folder: Path, gguf_file: str | None, device: str, kind: str) -> EvalModel:
    from transformers import AutoModelForCausalLM

    where = folder / gguf_file if gguf_file else folder
    if gguf_file is None and not any(folder.glob("*.safetensors")):
        from quantlite.sources import PICKLE_ADVICE, PICKLE_SUFFIXES

        if any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()):
            raise EvaluationError(f"{folder}: {PICKLE_ADVICE}")
    try:
        # never code from the folder (trust_remote_code), never a pickle (use_safetensors): see sources.PICKLE_ADVICE
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32,
                                                     trust_remote_code=False, use_safetensors=gguf_file is None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise EvaluationError(f"transformers cannot load {where}: {error}") from error
    model = model.to(device).eval()
    return EvalModel(lambda ids: model(ids.to(device), use_cache=False).logits, _auto_tokenizer(folder, gguf_file), kind, where)


def _auto_tokenizer(folder: Path, gguf_file: str | None):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        raise EvaluationError(f"no usable tokenizer in {folder}: {error}") from error
