"""Perplexity of a causal language model over one long token stream, in fixed windows.

Two protocols, so numbers can be compared with the two places people quote them from:

  gptq      (default) the whole text tokenized once, cut into non-overlapping windows of `ctx`
            tokens (a short tail is dropped); every token of a window but the first is predicted
            from the ones before it. ppl = exp(mean NLL over every predicted token).
            This is the evaluation of GPTQ / AWQ / most quantization papers.
  llamacpp  the same windows, but the first token of each window is replaced by BOS (when the
            tokenizer uses one) and only the second half of each window is scored, so every scored
            token sees at least ctx/2 tokens of context — what llama.cpp's `perplexity` tool does.

The model is any callable (b, s) int64 token ids -> (b, s, vocab) logits (or an object with
`.logits`, as transformers returns), so the same harness measures a transformers model, the
streaming runtime and a fake-quantized copy.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from quantlite.errors import QuantliteError

PROTOCOLS = ("gptq", "llamacpp")


class EvaluationError(QuantliteError, ValueError):
    """The text, the window size or the model output cannot give a perplexity."""


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float        # exp(nll)
    nll: float        # mean negative log-likelihood per scored token, nats
    tokens: int       # tokens scored
    windows: int      # windows evaluated
    ctx: int          # tokens per window
    protocol: str     # "gptq" or "llamacpp"
    seconds: float    # wall time of the forward passes

    def as_dict(self) -> dict:
        return asdict(self)


def window_starts(n_tokens: int, ctx: int, max_windows: int | None = None) -> list[int]:
    """Start offsets of the non-overlapping windows of `ctx` tokens in a stream of `n_tokens`."""
    if ctx < 2:
        raise EvaluationError(f"ctx must be at least 2 tokens, got {ctx}")
    if max_windows is not None and max_windows < 1:
        raise EvaluationError(f"max_windows must be at least 1, got {max_windows}")
    count = n_tokens // ctx
    if count == 0:
        raise EvaluationError(f"the text has {n_tokens} tokens, fewer than one window of ctx={ctx}")
    if max_windows is not None:
        count = min(count, max_windows)
    return [i * ctx for i in range(count)]


def perplexity(
    model: Callable[[torch.Tensor], torch.Tensor],
    token_ids: torch.Tensor,
    *,
    ctx: int = 2048,
    max_windows: int | None = None,
    protocol: str = "gptq",
    bos_id: int | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of `model` on `token_ids` ((n,) int64, the whole text tokenized once).

    bos_id: with protocol "llamacpp", the token that replaces each window's first token (None: keep
    the text's own token, as llama.cpp does for models that add no BOS). batch_size: windows per
    forward call. The log-softmax runs in float32 and the NLL sum in float64.
    """
    if protocol not in PROTOCOLS:
        raise EvaluationError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    if token_ids.dim() != 1 or token_ids.dtype != torch.int64:
        raise EvaluationError(f"token_ids must be a 1-D int64 tensor, got {tuple(token_ids.shape)} {token_ids.dtype}")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be at least 1, got {batch_size}")
    starts = window_starts(token_ids.numel(), ctx, max_windows)
    # logits at positions first..ctx-2 predict tokens first+1..ctx-1
    first = 0 if protocol == "gptq" else ctx // 2

    from tqdm.auto import tqdm

    total_nll = 0.0
    scored = 0
    began = time.perf_counter()
    bar = tqdm(total=len(starts), desc=f"perplexity ({protocol}, ctx {ctx})", unit="window", disable=not progress)
    with torch.inference_mode():
        for i in range(0, len(starts), batch_size):
            batch = torch.stack([token_ids[s : s + ctx] for s in starts[i : i + batch_size]])  # (b, ctx) int64
            inputs = batch.clone()
            if protocol == "llamacpp" and bos_id is not None:
                inputs[:, 0] = bos_id
            logits = _logits_of(model(inputs), batch.shape)  # (b, ctx, vocab)
            log_probs = torch.log_softmax(logits[:, first:-1].float(), dim=-1)
            targets = batch[:, first + 1 :]  # (b, ctx - 1 - first)
            nll = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            if not bool(torch.isfinite(nll).all()):
                raise EvaluationError(f"the model produced non-finite log-probabilities in window {i + 1}")
            total_nll += float(nll.double().sum())
            scored += targets.numel()
            bar.update(batch.shape[0])
            bar.set_postfix(ppl=f"{math.exp(total_nll / scored):.3f}")
    bar.close()
    mean_nll = total_nll / scored
    return PerplexityResult(
        ppl=math.exp(mean_nll), nll=mean_nll, tokens=scored, windows=len(starts), ctx=ctx,
        protocol=protocol, seconds=time.perf_counter() - began,
    )


def _logits_of(output, input_shape: torch.Size) -> torch.Tensor:
    """The (b, s, vocab) logits of a model call, whether it returned a tensor or a transformers output."""
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_shape):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise EvaluationError(f"the model must return (b, s, vocab) logits for input {tuple(input_shape)}, got {shape}")
    return logits
