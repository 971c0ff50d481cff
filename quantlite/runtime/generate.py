"""Text generation on a StreamingLlama: tokenizer and chat template, sampling, stop tokens, batching.

A batch of prompts is left-padded to one length so that every layer load serves all of them
(FlexGen's point: one read of a layer, many sequences). Prefill runs each whole prompt through each
layer once; then one token per row per step, with a KV cache, until every row has stopped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from contextlib import contextmanager
from functools import lru_cache
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from quantlite.errors import QuantliteError
from quantlite.runtime import llama
from quantlite.torch_threads import torch_threads


class GenerationError(QuantliteError, ValueError):
    """Bad generation input: empty prompts, out-of-range options, a chat request without a template."""


class Tokenizer:
    """tokenizer.json (the `tokenizers` library) plus the chat template of tokenizer_config.json.

    Both files come from a folder nobody vouches for (quantlite.untrusted): regular files only, JSON
    within size/depth/digit limits; the chat template renders in jinja2's sandbox under a time, loop
    and output-size cap (MAX_TEMPLATE_SECONDS, ...), so a hostile template ends in a GenerationError."""

    def __init__(self, folder: str | Path):
        from tokenizers import Tokenizer as FastTokenizer

        from quantlite.untrusted import check_regular_file, parse_json, read_json, read_limited

        folder = Path(folder)
        if os.path.islink(folder) or not check_regular_file(folder / "tokenizer.json", folder, GenerationError):
            raise GenerationError(f"{folder}: no tokenizer.json, so text cannot be tokenized (pass token ids instead)")
        data = read_limited(folder / "tokenizer.json", GenerationError)
        parse_json(data, folder / "tokenizer.json", GenerationError)  # depth and digits before the library sees it
        try:
            self.backend = FastTokenizer.from_str(data.decode("utf-8"))
        except Exception as error:  # the tokenizers library raises plain Exception for a bad file
            raise GenerationError(f"{folder / 'tokenizer.json'}: not a usable tokenizer ({str(error)[:200]})") from error
        settings_file = folder / "tokenizer_config.json"
        self.settings = read_json(settings_file, GenerationError) if check_regular_file(settings_file, folder, GenerationError) else {}
        if not isinstance(self.settings, dict):
            raise GenerationError(f"{settings_file}: not a JSON object")
        template = self.settings.get("chat_template")
        if template is not None and not isinstance(template, str):
            raise GenerationError(f"{settings_file}: chat_template must be a string (one template)")
        self.chat_template: str | None = template
        self.bos_token = self._token_text("bos_token")
        self.eos_token = self._token_text("eos_token")
        self.eos_token_id = self.backend.token_to_id(self.eos_token) if self.eos_token else None

    def _token_text(self, key: str) -> str | None:
        value = self.settings.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        return value if isinstance(value, str) else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict]) -> str:
        """Render the conversation with the model's own Jinja template, ending with the assistant's turn."""
        if not self.chat_template:
            raise GenerationError("this model's tokenizer_config.json has no chat_template; use a plain prompt")
        from jinja2 import TemplateError

        def raise_exception(message):
            raise GenerationError(f"chat template: {message}")

        env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
        env.filters["tojson"] = _tojson  # as transformers renders it (Qwen's templates use it)
        variables = dict(messages=messages, add_generation_prompt=True, bos_token=self.bos_token or "",
                         eos_token=self.eos_token or "")
        try:
            with _time_limit(MAX_TEMPLATE_SECONDS):
                parts, size = [], 0
                for part in env.from_string(self.chat_template).generate(**variables):
                    size += len(part)
                    if size > MAX_TEMPLATE_OUTPUT:
                        raise GenerationError(f"chat template: output longer than {MAX_TEMPLATE_OUTPUT} characters")
                    parts.append(part)
        except GenerationError:
            raise
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, AttributeError, RecursionError,
                MemoryError) as error:
            raise GenerationError(f"chat template failed: {error.__class__.__name__}: {str(error)[:200]}") from error
        return "".join(parts)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """transformers' tojson filter for chat templates: plain JSON, where jinja's own escapes <, >, & and '
    for HTML and returns markup that escapes whatever it is joined to."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# A chat template renders a few messages in well under a millisecond; these caps end hostile ones.
MAX_TEMPLATE_SECONDS = 2.0
MAX_TEMPLATE_OUTPUT = 1 << 20  # characters rendered, and the size of any string or list `*` may build


@lru_cache(maxsize=1)
def _bounded_sandbox():
    """The environment class, built on first use (importing jinja2 at module load costs ~50 ms)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """transformers' environment for chat templates (some use {% break %}), with `*` and `**` that
        cannot build a giant string, list or integer in one C call the time limit could not interrupt."""
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*" and isinstance(right, int) and hasattr(left, "__len__") and len(left) * right > MAX_TEMPLATE_OUTPUT \
                    or operator == "*" and isinstance(left, int) and hasattr(right, "__len__") and len(right) * left > MAX_TEMPLATE_OUTPUT:
                raise GenerationError(f"chat template: a sequence repeated beyond {MAX_TEMPLATE_OUTPUT} items")
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and left.bit_length() * right > 1 << 16:
                raise GenerationError("chat template: an integer power too large")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


@contextmanager
def _time_limit(seconds: float):
    """Raise GenerationError inside the Python code running in this thread once `seconds` have passed:
    a line tracer checks the clock every 1000 lines (jinja2 compiles templates to Python, so every
    loop iteration runs lines). The previous tracer (a debugger, coverage) is put back after."""
    deadline, previous, lines = time.monotonic() + seconds, sys.gettrace(), 0

    def on_line(frame, event, arg):
        nonlocal lines
        lines += 1
        if lines % 1000 == 0 and time.monotonic() > deadline:
            raise GenerationError(f"chat template: rendering took longer than {seconds:g} s (a runaway loop?)")
        return on_line

    sys.settrace(lambda frame, event, arg: on_line)
    try:
        yield
    finally:
        sys.settrace(previous)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0            # summed over the batch, padding excluded
    new_tokens: int = 0               # summed over the batch
    time_to_first_token: float = 0.0  # seconds: prefill and the first sample
    decode_seconds: float = 0.0       # seconds after the first token
    decode_steps: int = 0
    decode_matmul_seconds: float = 0.0     # of decode_seconds: in the matmuls (qmatmul / F.linear)
    decode_attention_seconds: float = 0.0  # of decode_seconds: q/k norm, RoPE, KV-cache update, attention

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens per second per sequence after the first token (steps / time)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def decode_other_seconds(self) -> float:
        """Of decode_seconds: everything else (norms, activation, Python, sampling, waiting on the loader)."""
        return max(self.decode_seconds - self.decode_matmul_seconds - self.decode_attention_seconds, 0.0)


@dataclass
class GenerationResult:
    token_ids: list[list[int]]        # the new tokens of each prompt, stop token excluded
    texts: list[str] | None           # their decoded text (None without a tokenizer)
    stats: GenerationStats = field(default_factory=GenerationStats)


# top-p looks for its set among the 1024, then the 8192 most likely tokens (_top: 2.5-3 ms for 16 x 49152
# and 1024; torch.topk took 10 and 19 ms), and sorts the whole vocabulary (69 ms) only when some row's set is larger still.
# The old full sort made sample() cost 144 ms of CPU a step, more than SmolLM2 itself at batch 16
# (self-calibration's sampling, docs/runtime.md).
NUCLEUS_CANDIDATES = (1024, 8192)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
           generator: torch.Generator | None) -> torch.Tensor:
    """logits (batch, vocab) float32 -> (batch,) int64. temperature 0 = greedy (argmax)."""
    if temperature == 0:
        return _argmax(logits)
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is None or top_p >= 1.0:
        return _draw(logits.softmax(dim=-1), generator)
    # the nucleus: drop the least likely tokens whose total probability stays within 1 - top_p, i.e.
    # keep each token whose more likely tokens hold less than top_p (the most likely always stays)
    log_total = logits.logsumexp(dim=-1, keepdim=True)
    for candidates in [min(n, vocab) for n in NUCLEUS_CANDIDATES] + [vocab]:
        values, order = _top(logits, candidates)  # (batch, candidates), most likely first
        probs = (values - log_total).exp()
        if candidates == vocab or bool((probs.sum(dim=-1) >= top_p).all()):
            break
    more_likely = probs.cumsum(dim=-1) - probs
    choice = _draw(probs.masked_fill(more_likely >= top_p, 0.0), generator)
    return order.gather(-1, choice[:, None]).squeeze(-1)


def _top(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (batch, vocab) -> the k largest of each row and their indices (batch, k), largest first,
    as torch.topk. On the CPU, for k below the vocabulary, numpy's argpartition then a sort of the k:
    2.5-3 ms against torch.topk's 11 ms for 16 x 49152 and k = 1024 (one thread), self-calibration's
    sampling step. Which of several equal logits at the k-th place are kept, and the order of equal
    logits, is not promised (nor is it by torch.topk)."""
    if not logits.is_cpu or k >= logits.shape[-1]:
        return torch.topk(logits, k, dim=-1)
    rows = logits.numpy()
    chosen = np.argpartition(rows, -k, axis=-1)[:, -k:]                       # (batch, k) indices, unordered
    values = np.take_along_axis(rows, chosen, axis=-1)
    order = np.argsort(-values, axis=-1)                                      # largest first
    return (torch.from_numpy(np.take_along_axis(values, order, axis=-1)),
            torch.from_numpy(np.take_along_axis(chosen, order, axis=-1)).long())


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits (batch, vocab) -> (batch,) int64, the first index of each row's largest value (NaN
    counts as largest), as torch.argmax. On the CPU through numpy: 5 us for 49152 logits against
    135 us for torch's argmax on one thread (decode runs torch on one thread)."""
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def _draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """weights (batch, n) >= 0 -> (batch,) int64, index i drawn with probability weights[i] / sum:
    the inverse of the float64 CDF at one uniform number per row (torch.multinomial took 24 ms for
    16 x 49152, this 6 ms). A zero weight is never drawn: its CDF step is empty."""
    cdf = weights.double().cumsum(dim=-1)
    u = torch.rand(weights.shape[0], 1, generator=generator, dtype=torch.float64, device=weights.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=weights.shape[-1] - 1)


def _check_options(max_new_tokens, temperature, top_k, top_p) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def _prompt_ids(model, prompts, chat: bool, system: str | None) -> tuple[list[list[int]], bool]:
    """Token ids of each prompt, and whether the prompts were text."""
    if isinstance(prompts, torch.Tensor):  # (seq,) or (batch, seq) token ids
        prompts = prompts.tolist()
    if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not prompts:
        raise GenerationError("no prompt given")
    if all(isinstance(p, str) for p in prompts):
        tokenizer = model.tokenizer
        if chat:
            head = [{"role": "system", "content": system}] if system else []
            texts = [tokenizer.apply_chat_template(head + [{"role": "user", "content": p}]) for p in prompts]
            ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        else:
            ids = [tokenizer.encode(p) for p in prompts]
        as_text = True
    elif all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompts):
        if chat:
            raise GenerationError("chat=True needs text prompts (the template is applied to text)")
        ids, as_text = [list(p) for p in prompts], False
    else:
        raise GenerationError("prompts must be strings or lists of token ids, not a mix")
    vocab = model.config.vocab_size
    for row, p in enumerate(ids):
        if not p:
            raise GenerationError(f"prompt {row} is empty after tokenization")
        if min(p) < 0 or max(p) >= vocab:
            raise GenerationError(f"prompt {row} has token ids outside [0, {vocab})")
    return ids, as_text


def _stop_ids(model, stop: Iterable[int | str], tokenizer: Tokenizer | None) -> tuple[set[int], list[str]]:
    """Stop token ids (the config's and the tokenizer's EOS plus the ones given) and stop strings."""
    ids: set[int] = set()
    eos = model.packed.config.get("eos_token_id")
    ids.update(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
    strings = []
    for item in stop:
        (ids.add(item) if isinstance(item, int) else strings.append(item))
    if strings and tokenizer is None:
        raise GenerationError("stop strings need text prompts (token-id prompts are never decoded)")
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids, strings


@torch.inference_mode()
def generate(
    model,
    prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Iterable[int | str] = (),
    chat: bool = False,
    system: str | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Continue each prompt by up to max_new_tokens tokens, all prompts as one batch.

    prompts: a string, a list of strings, a list of token ids, a list of such lists, or a
    (seq,) / (batch, seq) tensor of token ids.
    temperature 0 is greedy; otherwise sampling with optional top_k / top_p, reproducible with seed.
    stop: extra stop token ids or stop strings (the model's EOS tokens always stop).
    chat: wrap each prompt as a user turn in the model's chat template (system: an optional system turn).
    on_token(row, token_id): called for every new token as soon as it is chosen (streaming output).
    """
    _check_options(max_new_tokens, temperature, top_k, top_p)
    ids, as_text = _prompt_ids(model, prompts, chat, system)
    stop_ids, stop_strings = _stop_ids(model, stop, model.tokenizer if as_text else None)
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    stats = GenerationStats(prompt_tokens=sum(map(len, ids)))

    # left padding: every row's last prompt token sits at the same index
    batch, longest = len(ids), max(map(len, ids))
    tokens = torch.zeros(batch, longest, dtype=torch.long)
    valid = torch.zeros(batch, longest + max_new_tokens, dtype=torch.bool)
    for row, p in enumerate(ids):
        tokens[row, longest - len(p):] = torch.tensor(p)
        valid[row, longest - len(p): longest] = True
    positions = (valid[:, :longest].long().cumsum(-1) - 1).clamp(min=0)  # (batch, longest)
    padded = not bool(valid[:, :longest].all())
    cache = model.new_cache(batch, longest + max_new_tokens)

    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    start = time.perf_counter()
    logits = model.forward(tokens, positions, valid[:, :longest] if padded else None, cache, last_only=True)
    ops_before = dataclasses.replace(llama.OP_SECONDS)  # the decode steps' matmul and attention seconds start here
    with _decode_threads(model):
        for step in range(max_new_tokens):
            chosen = sample(logits[:, -1], temperature, top_k, top_p, generator).cpu()  # (batch,)
            if step == 0:
                stats.time_to_first_token = time.perf_counter() - start
            for row, token in enumerate(chosen.tolist()):
                if done[row]:
                    continue
                if token in stop_ids:
                    done[row] = True
                    continue
                new_tokens[row].append(token)
                stats.new_tokens += 1
                if on_token is not None:
                    on_token(row, token)
                if stop_strings and any(s in model.tokenizer.decode(new_tokens[row]) for s in stop_strings):
                    done[row] = True
            if all(done) or step == max_new_tokens - 1:
                break
            valid[:, longest + step] = True
            positions = positions[:, -1:] + 1
            logits = model.forward(chosen[:, None], positions, valid[:, : longest + step + 1] if padded else None, cache, last_only=True)
            stats.decode_steps += 1
    stats.decode_seconds = time.perf_counter() - start - stats.time_to_first_token
    stats.decode_matmul_seconds = llama.OP_SECONDS.matmul - ops_before.matmul
    stats.decode_attention_seconds = llama.OP_SECONDS.attention - ops_before.attention

    texts = None
    if as_text:
        texts = [_cut_at_stop(model.tokenizer.decode(t), stop_strings) for t in new_tokens]
    return GenerationResult(token_ids=new_tokens, texts=texts, stats=stats)


@contextlib.contextmanager
def _decode_threads(model):
    """Decode steps whose matmuls all run in the native CPU kernels (quantized layers and head) run
    torch's own ops on one thread; the kernels keep the threads torch had. Those ops are tiny (one
    token): the few that torch parallelises (SDPA, batched matmul) wake its OpenMP pool for
    microseconds of work, and its workers then spin on the core the kernel's pool needs. Measured on
    2 busy cores: SDPA at one query 0.41 ms with two torch threads, 0.02 ms with one
    (docs/runtime.md). Prefill, and float weights (F.linear is torch's), keep every thread."""
    from quantlite.kernels import native
    from quantlite.kernels.dispatch import default_backend
    from quantlite.q8weight import Q8Weight
    from quantlite.qweight import QWeight

    quantized = (model.packed.manifest["quantization"].get("method") is not None
                 and isinstance(model.lm_head, (QWeight, Q8Weight)))  # the head's matmul is native too
    if not (quantized and default_backend(model.device) == "cpu"):
        yield
        return
    with native.cpu_threads(torch.get_num_threads()), torch_threads(1):
        yield


def _cut_at_stop(text: str, stop_strings: list[str]) -> str:
    cuts = [text.index(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text
