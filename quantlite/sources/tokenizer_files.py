"""The tokenizer folder of a packed model: which files it may hold, and the keys the runtime relies on.

The runtime reads `tokenizer.json` (the `tokenizers` library's format) and, from `tokenizer_config.json`,
`chat_template`, `bos_token` and `eos_token`. transformers >= 5 saves the chat template in a separate
`chat_template.jinja`; it is folded into tokenizer_config.json so there is one place to look.
"""
from __future__ import annotations

import json
from pathlib import Path

from quantlite.errors import ConversionError

# The only names a packed tokenizer folder may contain (the manifest reader rejects any other).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "generation_config.json",
)
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def finish_tokenizer_folder(folder: Path, defaults: dict[str, str]) -> None:
    """Fold chat_template.jinja into tokenizer_config.json and fill keys the file lacks from `defaults`
    (e.g. bos_token / eos_token read from the model's metadata). Writes deterministically."""
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConversionError(f"{config_path}: not readable JSON ({error})") from error
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    template_path = folder / CHAT_TEMPLATE_FILE
    if template_path.exists():
        config.setdefault("chat_template", template_path.read_text(encoding="utf-8"))
        template_path.unlink()
    for key, value in defaults.items():
        if value is not None:
            config.setdefault(key, value)
    for machine_specific in ("is_local", "local_files_only", "name_or_path"):
        config.pop(machine_specific, None)  # paths and flags of the converting machine, not the model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    for stray in folder.iterdir():
        if stray.name not in TOKENIZER_FILES:
            stray.unlink()  # e.g. files a newer transformers adds: the packed format lists what it keeps
