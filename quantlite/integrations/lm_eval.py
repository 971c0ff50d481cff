"""lm-evaluation-harness model "quantlite": a packed model on the streaming runtime (quantlite.load).

    pip install 'quantlite[eval]'
    python -m quantlite.integrations.lm_eval --model quantlite \\
        --model_args path=packed/,memory_budget=2GB --tasks hellaswag --batch_size 8

`python -m quantlite.integrations.lm_eval` is lm_eval's own command line with this model registered
(lm_eval finds models only among its own modules). From Python, import this module, then call
`lm_eval.simple_evaluate(model="quantlite", model_args="path=packed/", tasks=[...])`.

model_args: path (the packed folder), memory_budget (as quantlite.load: "2GB", ...), device ("cpu",
"cuda"; default the GPU when torch sees one, else the CPU), max_length (tokens per forward pass; default the config's max_position_embeddings).

Scoring follows lm_eval's HF model: a context's trailing spaces move to the continuation, the
continuation's tokens are those of context + continuation past the context's own tokens (no special
tokens added), an empty context is conditioned on the BOS (else EOS) token, and a sequence longer
than max_length keeps its last max_length + 1 tokens. Every layer is read once per batch of
sequences, so --batch_size sets how many forward passes share one read of the weights.
"""
from __future__ import annotations

import logging

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from quantlite.errors import QuantliteError
from quantlite.runtime.streaming import load


@register_model("quantlite")
class QuantliteLM(LM):
    def __init__(self, path: str, memory_budget: str | int | None = None, device: str | None = None,
                 batch_size: int | str = 1, max_length: int | None = None, **ignored):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise QuantliteError(f"batch_size must be a positive integer for quantlite, got {batch_size!r}")
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's command line passes --device (default cuda:0) even on a machine without one
            if device is not None:
                logging.getLogger(__name__).warning("device %s: no CUDA device visible, running on the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load(path, memory_budget=memory_budget, device=device)
        self.tokenizer = self.model.tokenizer
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or self.model.config.max_position_embeddings)
        prefix = self.tokenizer.bos_token or self.tokenizer.eos_token
        self.prefix_token = self.tokenizer.backend.token_to_id(prefix) if prefix else None
        if self.prefix_token is None:
            raise QuantliteError(f"{path}: the tokenizer names no BOS or EOS token to condition an empty context on")

    # ------------------------------------------------------------------ the three request types
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding would produce the continuation."""
        pairs = [self._encode_pair(*request.args) for request in requests]
        return self._score(pairs, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log P(text), scored in disjoint windows of max_length tokens."""
        windows, owner = [], []
        for index, request in enumerate(requests):
            tokens = self.tokenizer.encode(request.args[0], add_special_tokens=False)
            for window in get_rolling_token_windows(tokens, self.prefix_token, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._score(windows, disable_tqdm)):
            totals[index] += logprob
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when gen_kwargs ask) continuations cut at the first `until` string."""
        answers = []
        for request in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, options = request.args
            options = dict(options)
            until = options.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new_tokens = int(options.pop("max_gen_toks", 256))
            temperature = float(options.pop("temperature", 0.0)) if options.pop("do_sample", False) else 0.0
            result = self.model.generate([context], max_new_tokens=max_new_tokens, temperature=temperature,
                                         stop=until, seed=options.pop("seed", None))
            answers.append(result.texts[0])
        return answers

    # ------------------------------------------------------------------ tokens and scores
    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation, add_special_tokens=False)
        context_tokens = self.tokenizer.encode(context, add_special_tokens=False) if context else []
        return context_tokens or [self.prefix_token], whole[len(context_tokens):]

    def _score(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool) -> list[tuple[float, bool]]:
        """Sum of log-probabilities of each continuation and whether each of its tokens is the argmax,
        batch_size sequences per forward pass (longest first, left-padded)."""
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in tqdm(range(0, len(order), self.batch_size), desc="loglikelihood", disable=disable_tqdm):
            batch = order[start:start + self.batch_size]
            inputs = [(pairs[i][0] + pairs[i][1])[-(self.max_length + 1):][:-1] for i in batch]
            longest = max(map(len, inputs))
            input_ids = torch.zeros(len(batch), longest, dtype=torch.long)  # (batch, longest), left-padded
            valid = torch.zeros(len(batch), longest, dtype=torch.long)
            for row, tokens in enumerate(inputs):
                input_ids[row, longest - len(tokens):] = torch.tensor(tokens)
                valid[row, longest - len(tokens):] = 1
            logits = self.model(input_ids, attention_mask=valid)  # (batch, longest, vocab)
            for row, i in enumerate(batch):
                continuation = torch.tensor(pairs[i][1])  # (c,)
                # (c, vocab): the positions predicting it, in float64 (only these: the batch's in float64 can be GBs)
                scored = torch.log_softmax(logits[row, longest - len(continuation):].double(), dim=-1)
                picked = scored.gather(-1, continuation[:, None])[:, 0]
                results[i] = (float(picked.sum()), bool((scored.argmax(-1) == continuation).all()))
        return results


if __name__ == "__main__":
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
