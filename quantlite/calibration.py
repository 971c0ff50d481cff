"""Activation statistics of every Linear input over a small calibration text, for
quantize(w, importance=...).

  full=False  mean x**2 per input column, (K,): the expected squared output error of a weight error
              dW is sum_j E[x_j^2] * |dW[:, j]|^2 when the input columns are uncorrelated.
  full=True   the second moment E[x x^T], (K, K): GPTQ's Hessian (quantlite.gptq), which also
              accounts for correlated columns. This is what the default "quantlite" setting of
              docs/accuracy.md was measured with. Above gptq.HESSIAN_BLOCK input columns only its
              diagonal blocks are collected (a gptq.BlockDiagonal), so memory is O(K x block).

Linears that read the same tensor (q/k/v projections; gate/up) share one statistic: it is computed
once and the returned dict holds the same tensor object under each of their names.

Two ways to run the model, same statistics (up to float rounding):
  collect_input_stats          any torch model in memory (forward hooks on its nn.Linear modules);
  iter_layer_input_stats       a checkpoint source (quantlite.sources) one decoder layer at a time,
                               through quantlite.runtime.llama's model math, yielding each layer's
                               statistics: peak memory is one layer plus the hidden states of the
                               calibration windows, as in the runtime. `quantlite convert
                               --calibration` uses it in GPTQ's sequential order (each layer sees
                               the quantized layers before it).

The calibration text must not overlap the evaluation text (benchmarks/accuracy.py takes it from the
part of the evaluation file after the evaluated windows, and says so).
"""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from quantlite.errors import QuantliteError
from quantlite.gptq import BlockDiagonal, hessian_blocks

# calibration="none" (convert --calibration none): no calibration, the data-free conversion (no forward pass).
# Without --calibration, convert calibrates on random tokens (below) when the source has a tokenizer, else none.
NO_CALIBRATION = "none"
# calibration="self" (convert --calibration self): the text is sampled from the unquantized model itself,
# one sequence per window, each starting from one of these prompts, by the runtime from a float copy of
# the model kept in OUT/SELF_CALIBRATION_DIR while it runs.
SELF_CALIBRATION = "self"
SELF_CALIBRATION_DIR = ".quantlite-self-calibration"
SELF_CALIBRATION_PROMPTS = ("The", "In 1998,", "Once upon a time", "Scientists have", "The history of", "A recipe for",
                            "def main():", "Dear", "The following", "According to", "She said", "In mathematics,",
                            "The city of", "Chapter 1", "Breaking news:", "My favorite")
SELF_CALIBRATION_SAMPLING = {"temperature": 1.0, "top_p": 0.95, "seed": 0}
# calibration="random" (convert --calibration random): windows of token ids drawn (seeded) from the tokenizer's
# vocabulary (tokenizer.json's, added tokens included) without its special tokens; no text, no generation. Ids are
# drawn by a Zipf-like law of their frequency rank r (token_frequency_ranks: a BPE tokenizer learns its merges in
# order of frequency), p(r) ~ (r + RANDOM_TOKEN_RANK_OFFSET) ** -RANDOM_TOKEN_EXPONENT, closer to a text's token
# frequencies than uniform draws (exponent 0). Their E[x x^T] is trusted less than a text's:
# RANDOM_CALIBRATION_PRIOR x mean(diag) is added to its diagonal (with_identity_prior), which measured better than
# GPTQ's usual 1 % (docs/accuracy.md, "Calibration on random tokens").
RANDOM_CALIBRATION = "random"
RANDOM_CALIBRATION_SEED = 0
RANDOM_CALIBRATION_PRIOR = 1.0
RANDOM_TOKEN_EXPONENT = 1.0
RANDOM_TOKEN_RANK_OFFSET = 10.0
BYTE_FALLBACK_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # sentencepiece's byte tokens in tokenizer.json
# Default windows of 512 tokens per kind of calibration (docs/accuracy.md): random tokens 4 (as good as 16 on
# both study models, at a quarter of the cost); the model's own samples 16 (each window is 512 generated
# tokens); a text 32 (SmolLM2 through convert: 22 % of NF4's damage against 25.5 % with 16, the GPTQ pass
# costing the same and the statistics' forward passes twice as much).
RANDOM_CALIBRATION_WINDOWS = 4
SELF_CALIBRATION_WINDOWS = 16
TEXT_CALIBRATION_WINDOWS = 32
# The Linear of a decoder layer whose output goes to the layer's output only (added to the residual stream):
# iter_layer_input_stats's recording pass skips its product when that output is not used
OUTPUT_ONLY_LINEAR = "mlp.down_proj.weight"


class CalibrationError(QuantliteError, ValueError):
    """The calibration model or text cannot give activation statistics."""


def collect_input_stats(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    *,
    ctx: int = 512,
    max_windows: int | None = 16,
    full: bool = False,
    skip: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Statistics of the input of every nn.Linear of `model` (a transformers causal LM, or any module
    whose forward takes (b, s) token ids) over non-overlapping windows of `ctx` tokens of `token_ids`
    ((n,) int64). Returns {"<module name>.weight": (K,) or (K, K) float32}, keyed by the weight's
    checkpoint name. Linears whose name contains an entry of `skip` are left out.
    """
    from tqdm.auto import tqdm

    from quantlite.eval.ppl import window_starts

    _check_token_ids(token_ids)
    linears = {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    }
    if not linears:
        raise CalibrationError("the model has no nn.Linear layers to calibrate")
    starts = window_starts(token_ids.numel(), ctx, max_windows)
    moments = _SecondMoments(full)

    def hook_for(name: str):
        return lambda _module, inputs, _output: moments.add(name, inputs[0])

    handles = [module.register_forward_hook(hook_for(name)) for name, module in linears.items()]
    try:
        with torch.inference_mode():
            for start in tqdm(starts, desc="calibration", unit="window", disable=not progress):
                model(token_ids[start : start + ctx].unsqueeze(0))
                moments.next_pass()
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(moments.owner_of))
    if missing:
        raise CalibrationError(f"{len(missing)} Linear layers never ran in the forward pass, e.g. {missing[0]!r}")
    return {f"{name}.weight": mean for name, mean in moments.means().items()}


def iter_layer_input_stats(
    source,
    token_ids: torch.Tensor,
    *,
    ctx: int = 512,
    max_windows: int | None = 16,
    progress: bool = True,
    forward_weights: Callable[[int], dict] | None = None,
) -> Iterator[tuple]:
    """(layer index, {weight name: E[x x^T]}, inputs) for each decoder layer in order, computed in float32
    with one layer's weights in memory at a time; a consumer that stores or uses each layer's
    statistics before asking for the next holds one layer's worth of them. Each window of `ctx`
    tokens is a sequence of its own, as in a forward pass of the whole model.

    The windows reach layer i + 1 through layer i's float weights, or, with `forward_weights`,
    through forward_weights(i) (a layer dict as quantlite.runtime.llama.decoder_layer takes, e.g.
    the layer as quantized), called after the consumer has had layer i's statistics: GPTQ's
    sequential order, in which each layer is calibrated on the errors of the layers before it.
    inputs (W, ctx, hidden) float32: the windows as they enter the layer (what quantlite.tuning
    tunes on; read-only, valid until the consumer asks for the next layer)."""
    from tqdm.auto import tqdm

    from quantlite.eval.ppl import window_starts
    from quantlite.runtime import llama

    _check_token_ids(token_ids)
    config = source.model_config
    windows = torch.stack([token_ids[s : s + ctx] for s in window_starts(token_ids.numel(), ctx, max_windows)])
    cos, sin = llama.rope_cos_sin(config, torch.arange(ctx).unsqueeze(0), torch.float32)

    def run_layer(layer: int, weights: dict, update: bool, moments: _SecondMoments | None = None) -> None:
        with torch.inference_mode():
            for window in range(hidden.shape[0]):  # one sequence at a time: its activations only
                out = llama.decoder_layer(hidden[window : window + 1], weights, config, cos, sin, layer=layer)
                if update:
                    hidden[window] = out[0]
                if moments is not None:
                    moments.next_pass()

    with torch.inference_mode():
        hidden = llama.embed(windows, source.read("model.embed_tokens.weight").float(), torch.float32)  # (W, ctx, hidden)
    for layer in tqdm(range(config.num_layers), desc="calibration", unit="layer", disable=not progress):
        prefix = f"model.layers.{layer}."
        moments = _SecondMoments(full=True)
        weights = {}
        for name in (n for n in source.shapes if n.startswith(prefix)):
            short, tensor = name[len(prefix):], source.read(name).float()
            is_linear = short.endswith("_proj.weight")
            # when the windows move on through forward_weights, this pass's output is not used: the Linear whose
            # output only reaches it records its input and skips its product
            needed = forward_weights is None or short != OUTPUT_ONLY_LINEAR
            weights[short] = _RecordsInput(tensor, lambda x, name=name: moments.add(name, x), needed) if is_linear else tensor
        run_layer(layer, weights, update=forward_weights is None, moments=moments)
        del weights
        yield layer, moments.means(), hidden
        if forward_weights is not None:
            run_layer(layer, forward_weights(layer), update=True)


def sampled_calibration_text(write_float_copy: Callable[[], object], scratch: Path, calibration: dict,
                             progress: bool) -> str:
    """Text the unquantized model writes itself: one sequence per calibration window
    (calibration["windows"]), a prompt of SELF_CALIBRATION_PROMPTS continued by calibration["ctx"]
    tokens sampled with calibration["sampling"], generated as one batch by the streaming runtime from
    the float copy of the model that write_float_copy() puts in `scratch` (removed after)."""
    from tqdm import tqdm

    from quantlite.runtime.streaming import load

    write_float_copy()
    prompts = [SELF_CALIBRATION_PROMPTS[i % len(SELF_CALIBRATION_PROMPTS)] for i in range(calibration["windows"])]
    with load(scratch) as model, tqdm(total=len(prompts) * calibration["ctx"], unit="token", unit_scale=True,
                                      desc="calibration text", disable=not progress) as bar:
        result = model.generate(prompts, max_new_tokens=calibration["ctx"], on_token=lambda _row, _token: bar.update(),
                                **calibration["sampling"])
    shutil.rmtree(scratch)
    return "\n\n".join(prompt + text for prompt, text in zip(prompts, result.texts))


def random_token_ids(vocabulary_size: int, excluded: list[int], count: int, seed: int = RANDOM_CALIBRATION_SEED,
                     ranks: torch.Tensor | None = None, exponent: float | None = None,
                     offset: float | None = None) -> torch.Tensor:
    """(count,) int64 token ids drawn with a seeded generator from range(vocabulary_size) without the
    ids in `excluded` (the tokenizer's special tokens): id i with probability proportional to
    (ranks[i] + offset) ** -exponent (defaults RANDOM_TOKEN_RANK_OFFSET, RANDOM_TOKEN_EXPONENT), `ranks`
    ((vocabulary_size,) int64, 0 = most frequent) as token_frequency_ranks gives; uniformly without
    `ranks` or with exponent 0."""
    exponent = RANDOM_TOKEN_EXPONENT if exponent is None else exponent
    offset = RANDOM_TOKEN_RANK_OFFSET if offset is None else offset
    if ranks is not None and ranks.shape != (vocabulary_size,):
        raise CalibrationError(f"token ranks have shape {tuple(ranks.shape)}, expected ({vocabulary_size},)")
    if not (exponent >= 0 and offset > 0):
        raise CalibrationError(f"the token law needs an exponent >= 0 and an offset > 0, got {exponent} and {offset}")
    allowed = torch.ones(vocabulary_size, dtype=torch.bool)
    allowed[[i for i in excluded if 0 <= i < vocabulary_size]] = False
    choices = allowed.nonzero().squeeze(1)  # (V',) int64
    if choices.numel() == 0:
        raise CalibrationError(f"the tokenizer's {vocabulary_size} ids are all special tokens: nothing to draw from")
    generator = torch.Generator().manual_seed(seed)
    if ranks is None or exponent == 0:
        return choices[torch.randint(choices.numel(), (count,), generator=generator)]
    weights = (ranks[choices].double() + offset) ** -exponent  # (V',) float64, unnormalised
    return choices[torch.multinomial(weights, count, replacement=True, generator=generator)]


def tokenizer_random_ids(backend, vocabulary_size: int, count: int, seed: int = RANDOM_CALIBRATION_SEED,
                         exponent: float | None = None, offset: float | None = None) -> torch.Tensor:
    """(count,) int64 ids as `convert --calibration random` draws them from a `tokenizers.Tokenizer`
    (tokenizer.json): its vocabulary, added tokens included, up to the model's `vocabulary_size`,
    without its special tokens, by the rank law of token_frequency_ranks (random_token_ids)."""
    special = [i for i, token in backend.get_added_tokens_decoder().items() if token.special]
    vocabulary = min(backend.get_vocab_size(with_added_tokens=True), vocabulary_size)
    ranks = token_frequency_ranks(json.loads(backend.to_str())["model"], vocabulary)
    return random_token_ids(vocabulary, special, count, seed, ranks, exponent, offset)


def token_frequency_ranks(model: dict, vocabulary_size: int) -> torch.Tensor:
    """(vocabulary_size,) int64 frequency rank of each token id (0 = most frequent, ties allowed) from a
    tokenizer.json "model" entry, without any text: a BPE tokenizer learns its merges in order of
    frequency, so a token ranks at the first merge it takes part in (as one of the two parts or as the
    result: a base byte or character of a frequent merge is itself frequent). Tokens in no merge (added
    tokens, characters never merged) and ids the vocabulary lacks rank after all of them, in id order,
    and byte fallback tokens ("<0x41>", only used for what the vocabulary cannot spell) last; a tokenizer
    that is not BPE ranks its tokens in id order."""
    vocabulary = model.get("vocab") if model.get("type") == "BPE" else None
    merges = model.get("merges", []) if vocabulary is not None else []
    unranked = len(merges)
    first_merge = [unranked] * vocabulary_size
    for order, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge  # "a b" (older files) or [a, b]
        for token in (left, right, left + right):
            token_id = vocabulary.get(token)
            if token_id is not None and token_id < vocabulary_size:
                first_merge[token_id] = min(first_merge[token_id], order)
    ranks = torch.tensor(first_merge, dtype=torch.int64)  # (vocabulary_size,)
    byte_fallback = torch.zeros(vocabulary_size, dtype=torch.bool)
    if vocabulary is not None and model.get("byte_fallback"):
        byte_fallback[[i for token, i in vocabulary.items() if BYTE_FALLBACK_TOKEN.fullmatch(token) and i < vocabulary_size]] = True
    in_no_merge = ranks == unranked
    late = torch.cat([(in_no_merge & ~byte_fallback).nonzero().squeeze(1),  # (L,) ids: the others in id order,
                      (in_no_merge & byte_fallback).nonzero().squeeze(1)])  # then the byte fallback tokens
    ranks[late] = unranked + torch.arange(late.numel())
    return ranks


def with_identity_prior(second_moment: torch.Tensor | BlockDiagonal, weight: float) -> torch.Tensor | BlockDiagonal:
    """E[x x^T] (K, K) or its BlockDiagonal + weight * mean(diag) * I: between the statistic (weight 0)
    and no calibration (weight -> infinity: GPTQ then rounds each weight to nearest, as a data-free
    conversion does)."""
    mean_diagonal = float(second_moment.diagonal().mean())

    def plus_prior(block: torch.Tensor) -> torch.Tensor:
        return block + weight * mean_diagonal * torch.eye(block.shape[0], dtype=block.dtype)

    if isinstance(second_moment, BlockDiagonal):
        return BlockDiagonal(tuple(plus_prior(block) for block in second_moment.blocks))
    return plus_prior(second_moment)


def _check_token_ids(token_ids: torch.Tensor) -> None:
    if token_ids.dim() != 1 or token_ids.dtype != torch.int64:
        raise CalibrationError(f"token_ids must be a 1-D int64 tensor, got {tuple(token_ids.shape)} {token_ids.dtype}")


class _RecordsInput:
    """Stands in for a Linear weight in the model math: F.linear(x, this) hands x to `record`, then
    computes with the real weight (torch's __torch_function__ protocol), or, if its output is not
    `needed`, returns zeros of the output's shape."""

    def __init__(self, weight: torch.Tensor, record, needed: bool = True):
        self.weight, self.record, self.needed = weight, record, needed

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        stand_in = next(a for a in args if isinstance(a, cls))
        stand_in.record(args[0])
        if not stand_in.needed:
            return args[0].new_zeros(args[0].shape[:-1] + stand_in.weight.shape[:1])
        return func(*(a.weight if isinstance(a, cls) else a for a in args), **(kwargs or {}))


class _SecondMoments:
    """Running E[x x^T] (full; its diagonal blocks of gptq.hessian_blocks(K) when K is large) or E[x^2]
    per column of named inputs. Consecutive inputs that are the same tensor (q/k/v read one normalised
    x, gate/up another) share one statistic: it is computed once and means() returns the same object
    under each name."""

    def __init__(self, full: bool):
        self.full = full
        self.sums: dict[str, list[torch.Tensor]] = {}  # owner name -> float64 running sums: [(K,)], or (b, b) per block
        self.counts: dict[str, int] = {}          # owner name -> rows of x seen
        self.owner_of: dict[str, str] = {}        # input name -> the name whose statistic it shares
        self.last_input, self.last_owner = None, None

    def add(self, name: str, x: torch.Tensor) -> None:
        if x is self.last_input:  # same tensor as the input just before: share its sum
            self.owner_of[name] = self.last_owner
            return
        self.last_input, self.last_owner = x, name
        self.owner_of[name] = name
        rows = x.detach().reshape(-1, x.shape[-1]).float().cpu()  # (tokens, K)
        # float32 products, float64 running sum: one window's sum is exact enough, many add up
        if self.full:
            moment = [(rows[:, start:end].T @ rows[:, start:end]).double() for start, end in hessian_blocks(rows.shape[1])]
        else:
            moment = [rows.square().sum(dim=0).double()]
        self.sums[name] = [total + part for total, part in zip(self.sums[name], moment)] if name in self.sums else moment
        self.counts[name] = self.counts.get(name, 0) + rows.shape[0]

    def next_pass(self) -> None:
        """A new forward pass begins: never share a statistic across passes."""
        self.last_input = None

    def means(self) -> dict[str, torch.Tensor | BlockDiagonal]:
        mean_of = {}
        for owner, totals in self.sums.items():
            means = tuple((total / self.counts[owner]).float() for total in totals)
            mean_of[owner] = means[0] if len(means) == 1 else BlockDiagonal(means)
        return {name: mean_of[owner] for name, owner in self.owner_of.items()}
