"""Tuning a whole quantized model end to end towards its float original's next-token distributions.

tune_layer (quantlite.tuning) makes each decoder layer's output match the float layer's on its own;
what is left of each layer's error still adds up through the layers, and a layer's output error is
not what the model is scored on. `tune_model` trains every layer at once for the loss that matters:

    KL(float model || quantized model) over the next-token distributions, mean over the tokens

of the calibration windows, the float model's logits as the teacher (knowledge distillation, as
EfficientQAT's end-to-end phase and BitDistiller train a quantized model). What moves is what
tune_layer moves with move_codes — each 4-bit weight's position (its code, through the rounding
straight through), the block scales, the outlier values and the decoder layers' RMSNorm gains —
with the same optimiser (quantlite.tuning.Trainer), one calibration window a step in a seeded
order, the learning rates decayed to 0 over the steps by half a cosine (EfficientQAT's schedule; on
stories260K it took the share of NF4's perplexity increase from 27 % to 21 %, docs/accuracy.md).
The embedding, the head and the final norm stay as stored.

Whole-model tuning overfits its windows: trained on 64 windows for 500 steps with the codes frozen,
the calibration KL halved while the evaluated perplexity was best near 100 steps (docs/accuracy.md).
So one window in HELD_OUT_EVERY is held out, never trained on: every CHECK_EVERY steps the layers
*as stored* (scales double-quantized, outliers fp16, gains in their dtype) are scored on the
held-out windows, and the best checkpoint is returned — the layers as given when none beat them.

Memory: every decoder layer's trainables at once (about seven float32 per 4-bit weight: the level,
its position, the position's gradient and momentum, the weight and its gradient), the float
model's decoder layers (one float32 per weight, read once for the teacher and for each tensor's
SQNR) and its final hidden states (windows x ctx x hidden): meant for small models (stories260K: 1 MB of
weights, 0.55 GB peak for the whole conversion; SmolLM2-135M: about 3.5 GB by this count, not measured).
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from quantlite.errors import ConversionError
from quantlite.model_config import ModelConfig
from quantlite.qweight import QWeight
from quantlite.tuning import TUNING_SEED, Trainer, TunedQWeight, as_computed, stored_layer

MODEL_LEARNING_RATE = 2e-3       # Adam on the log-scales, outliers and gains, at the first step
MODEL_CODE_LEARNING_RATE = 2e-4  # the positions' step (quantlite.tuning.Trainer), at the first step
HELD_OUT_EVERY = 8  # one calibration window in 8 (the last ones, at least one) scores the checkpoints
CHECK_EVERY = 50    # steps between two checkpoints (and one after the last step)


@dataclass(frozen=True)
class ModelTuningResult:
    layers: list[dict]   # every decoder layer as stored: QWeights and float tensors, named as given
    kl_before: float     # mean KL(float || quantized) per held-out token, of the layers as given
    kl_after: float      # the same of the returned layers (== kl_before when no checkpoint beat them)
    best_step: int       # the step of the returned checkpoint (0: the layers as given)
    steps: int


def held_out_count(windows: int) -> int:
    """How many of `windows` calibration windows tune_model holds out (0 when only one is given)."""
    return min(windows - 1, max(1, windows // HELD_OUT_EVERY))


def tune_model(layers: list[dict], embedding: torch.Tensor, final_norm: torch.Tensor, head: torch.Tensor,
               float_final: torch.Tensor, float_head: torch.Tensor, windows: torch.Tensor, config: ModelConfig, *,
               steps: int, move_codes: bool = True, learning_rate: float = MODEL_LEARNING_RATE,
               code_learning_rate: float = MODEL_CODE_LEARNING_RATE, progress: bool = False) -> ModelTuningResult:
    """Tune the decoder `layers` (each as the converter stores it: QWeights and float tensors, names
    relative to the layer) of the model whose embedding (V, hidden), final RMSNorm gain (hidden,) and
    head (V, hidden) are given as float32 (as stored, dequantized), towards the float model, given by
    its final hidden states after its final norm, float_final (W, ctx, hidden), and its head float_head
    (V, hidden), on the token windows (W, ctx) int64 these came from. `steps` steps, one window each
    (the windows not held out, in a seeded order; the learning rates are those of the first step,
    decayed by half a cosine); the codes stay fixed unless move_codes. See the
    module's doc."""
    from quantlite.runtime import llama

    n_windows, ctx = windows.shape
    held = held_out_count(n_windows)
    if held == 0:
        raise ValueError("tune_model needs at least two calibration windows: one to train on, one to hold out")
    cos, sin = llama.rope_cos_sin(config, torch.arange(ctx).unsqueeze(0), torch.float32)

    def log_probs(weights: list[dict], window: int) -> torch.Tensor:  # (1, ctx, V)
        x = llama.embed(windows[window : window + 1], embedding, torch.float32)
        for w in weights:
            x = llama.decoder_layer(x, w, config, cos, sin)
        return F.log_softmax(llama.rms_norm(x, final_norm, config.rms_norm_eps) @ head.T, dim=-1)

    def divergence(weights: list[dict], window: int) -> torch.Tensor:  # mean KL(float || quantized) per token
        with torch.no_grad():
            target = F.log_softmax(float_final[window : window + 1] @ float_head.T, dim=-1)  # (1, ctx, V)
        return F.kl_div(log_probs(weights, window), target, log_target=True, reduction="sum") / ctx

    def held_out_divergence(weights: list[dict]) -> float:
        with torch.no_grad():
            return sum(float(divergence(weights, w)) for w in range(n_windows - held, n_windows)) / held

    tuned = [{name: TunedQWeight(qw, move_codes) for name, qw in layer.items() if isinstance(qw, QWeight)}
             for layer in layers]
    gains = [{name: torch.nn.Parameter(t.float()) for name, t in layer.items() if name.endswith("norm.weight")}
             for layer in layers]

    def trained() -> list[dict]:
        return [{**as_computed(layer), **{n: q.weight() for n, q in t.items()}, **g} for layer, t, g in zip(layers, tuned, gains)]

    def stored() -> list[dict]:
        return [stored_layer(layer, t, g) for layer, t, g in zip(layers, tuned, gains)]

    before = held_out_divergence([as_computed(layer) for layer in layers])
    best = (before, 0, [dict(layer) for layer in layers])
    trainer = Trainer([q for t in tuned for q in t.values()], [p for g in gains for p in g.values()],
                      learning_rate, code_learning_rate)
    order = torch.randint(n_windows - held, (steps,), generator=torch.Generator().manual_seed(TUNING_SEED)).tolist()
    from tqdm import tqdm

    with tqdm(total=steps, desc="tune model", unit="step", disable=not progress) as bar:
        for step, window in enumerate(order, start=1):
            trainer.zero_grad()
            divergence(trained(), window).backward()
            trainer.step(0.5 * (1 + math.cos(math.pi * (step - 1) / steps)))  # 1 at the first step, towards 0
            bar.update()
            if step % CHECK_EVERY == 0 or step == steps:
                checkpoint = stored()
                score = held_out_divergence([as_computed(layer) for layer in checkpoint])
                if score < best[0]:
                    best = (score, step, checkpoint)
                bar.set_postfix(held_out_kl=f"{score:.4g}", best=f"{best[0]:.4g} at {best[1]}")
    return ModelTuningResult(best[2], before, best[0], best[1], steps)


def tune_model_shards(source, out: Path, ids: torch.Tensor, calibration: dict, done: dict,
                      progress: bool = False) -> Iterator[tuple[str, dict]]:
    """The converter's hook: tune the decoder layers written into `out` (their manifest entries in
    `done`) with tune_model for calibration["tune_model_steps"] steps, on the first calibration["windows"]
    windows of calibration["ctx"] tokens of `ids`, towards the float model read from `source`; rewrite
    each layer's shard and yield (file, its new manifest entry). Nothing is rewritten when no
    checkpoint beat the layers as written."""
    from quantlite.converter import write_atomically
    from quantlite.eval.ppl import window_starts
    from quantlite.model_config import EMBEDDING
    from quantlite.packed import EMBEDDING_FILE, FINAL_FILE, group_tensors, layer_file
    from quantlite.runtime import llama
    from quantlite.sources.checksum import sha256_file
    from quantlite.sources.safetensors_file import SafetensorsFile
    from quantlite.tuning import flat_layer
    from safetensors.torch import save_file

    config = source.model_config
    ctx = calibration["ctx"]
    windows = torch.stack([ids[s : s + ctx] for s in window_starts(ids.numel(), ctx, calibration["windows"])])  # (W, ctx)
    if held_out_count(windows.shape[0]) == 0:
        raise ConversionError(f"--tune-model-steps needs at least 2 calibration windows (one is held out), the calibration "
                              f"gives {windows.shape[0]} of {ctx} tokens: give --calibration-windows 2 or more, or a longer text")

    def read(file: str) -> dict:
        return group_tensors(SafetensorsFile(out / file).read_all(), str(out / file))

    def as_float(value) -> torch.Tensor:
        return value.float() if isinstance(value, torch.Tensor) else value.dequantize(torch.float32)

    def float_layer(layer: int) -> dict:
        prefix = f"model.layers.{layer}."
        return {name[len(prefix):]: source.read(name).float() for name in source.shapes if name.startswith(prefix)}

    float_embedding = source.read(EMBEDDING).float()
    float_head = float_embedding if config.tie_word_embeddings else source.read("lm_head.weight").float()
    cos, sin = llama.rope_cos_sin(config, torch.arange(ctx).unsqueeze(0), torch.float32)
    float_layers = [float_layer(layer) for layer in range(config.num_layers)]  # read once: the teacher, then each SQNR
    with torch.no_grad():  # the teacher: the float model, one layer at a time
        hidden = llama.embed(windows, float_embedding, torch.float32)  # (W, ctx, hidden)
        for weights in float_layers:
            hidden = torch.cat([llama.decoder_layer(hidden[w : w + 1], weights, config, cos, sin) for w in range(hidden.shape[0])])
        float_final = llama.rms_norm(hidden, source.read("model.norm.weight").float(), config.rms_norm_eps)

    prefixes = [f"model.layers.{layer}." for layer in range(config.num_layers)]
    layers = [{name[len(p):]: value for name, value in read(layer_file(i)).items()} for i, p in enumerate(prefixes)]
    final = read(FINAL_FILE)
    embedding = as_float(read(EMBEDDING_FILE)[EMBEDDING])
    head = embedding if config.tie_word_embeddings else as_float(final["lm_head.weight"])
    result = tune_model(layers, embedding, as_float(final["model.norm.weight"]), head, float_final, float_head, windows,
                        config, steps=calibration["tune_model_steps"], progress=progress)
    if progress:
        from tqdm import tqdm

        tqdm.write(f"model tuning: held-out KL {result.kl_before:.4g} -> {result.kl_after:.4g} "
                   f"(step {result.best_step} of {result.steps}{'' if result.best_step else ': the layers kept as written'})")
    if result.best_step == 0:
        return
    for i, (prefix, layer) in enumerate(zip(prefixes, result.layers)):
        file = layer_file(i)
        entry = {**done[file], "tensors": {name: dict(stats) for name, stats in done[file]["tensors"].items()}}
        tensors = flat_layer(layer, prefix, float_layers[i], entry["tensors"])
        write_atomically(out / file, lambda temp: save_file(tensors, str(temp), metadata={"format": "pt"}))
        yield file, {**entry, "sha256": sha256_file(out / file), "size": (out / file).stat().st_size}
