"""Checkpoints the converter reads: a Hugging Face folder (hf.py) or a GGUF file (gguf_file.py).

Every source offers the same small surface, which is all convert.py uses:
    kind: str                       "hf" or "gguf"
    path: Path
    config: dict                    the HF config.json contents (for GGUF: the equivalent HF config)
    model_config: ModelConfig       read from config (quantlite.model_config), checked against the
                                    tensors before anything is written
    shapes: dict[str, tuple]        every tensor the packed model needs, HF names
    itemsize(name) -> int           bytes per element as read (for the disk-space estimate)
    tokenizer_nbytes() -> int       an upper bound of the tokenizer folder's size (ditto)
    has_tokenizer() -> bool         whether write_tokenizer writes a usable tokenizer.json (the
                                    vocabulary convert's default random calibration draws from)
    read(name) -> Tensor            one tensor, on the CPU, in the source's dtype
    write_tokenizer(folder) -> None tokenizer.json + tokenizer_config.json (+ what the source has)
    identity() -> dict              what a resumed conversion must find unchanged
"""
from __future__ import annotations

from pathlib import Path

from quantlite.errors import ConversionError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PICKLE_ADVICE = (
    "PyTorch pickle checkpoints are refused: unpickling runs arbitrary code, so quantlite never does it. "
    "Convert it to safetensors first, in an environment you trust, e.g.\n"
    "  python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('SRC', use_safetensors=False).save_pretrained('SRC-safetensors')\"\n"
    "(save_pretrained writes safetensors), then convert SRC-safetensors."
)


def open_source(src: str | Path):
    """The right reader for `src`, validated: a folder is a Hugging Face checkpoint, a .gguf file a GGUF model."""
    path = Path(src)
    if path.is_dir():
        from quantlite.sources.hf import HFCheckpoint

        return HFCheckpoint(path)
    if path.suffix.lower() == ".gguf" and path.is_file():
        from quantlite.sources.gguf_file import GGUFCheckpoint

        return GGUFCheckpoint(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ConversionError(f"{path}: {PICKLE_ADVICE}")
    if not path.exists():
        raise ConversionError(f"{path}: no such file or folder")
    raise ConversionError(
        f"{path}: not a Hugging Face checkpoint folder or a .gguf file; quantlite converts those two"
    )
