"""The tokenizer folder of a packed model: which files it may hold, and the keys the runtime relies on.

The runtime reads `tokenizer.json` (the `tokenizers` library's format) and, from `tokenizer_config.json`,
`chat_template`, `bos_token` and `eos_token`. transformers >= 5 saves the chat template in a separate
`chat_template.jinja`; it is folded into tokenizer_config.json so there is one place to look.
"""
from __future__ import annotations

import json
from pathlib import Path

from quantlite.errors import ConversionError
from quantlite.untrusted import check_regular_file, read_json, read_limited

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
    config = read_json(config_path, ConversionError) if check_regular_file(config_path, folder, ConversionError) else {}
    if not isinstance(config, dict):
        raise ConversionError(f"{config_path}: not a JSON object")
    tokenizer_path = folder / "tokenizer.json"
    if check_regular_file(tokenizer_path, folder, ConversionError):
        read_json(tokenizer_path, ConversionError)  # refused now, not when a user first generates
    template_path = folder / CHAT_TEMPLATE_FILE
    if check_regular_file(template_path, folder, ConversionError):
        try:
            config.setdefault("chat_template", read_limited(template_path, ConversionError).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ConversionError(f"{template_path}: the chat template is not UTF-8 text ({error})") from error
        template_path.unlink()
    if not isinstance(config.get("chat_template", ""), (str, type(None))):
        raise ConversionError(f"{config_path}: chat_template must be a string")
    for key, value in defaults.items():
        if value is not None:
            config.setdefault(key, value)
    for machine_specific in ("is_local", "local_files_only", "name_or_path"):
        config.pop(machine_specific, None)  # paths and flags of the converting machine, not the model
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    for stray in folder.iterdir():
        if stray.name not in TOKENIZER_FILES:
            stray.unlink()  # e.g. files a newer transformers adds: the packed format lists what it keeps
