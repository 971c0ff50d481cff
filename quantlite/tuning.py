"""Tuning a quantized decoder layer's continuous stored parameters against its float original.

GPTQ (quantlite.gptq) fixes the 4-bit codes of each Linear for the least error of *that Linear's*
output. What it leaves is the layer as a whole: the attention's softmax and the MLP's SiLU sit between
the Linears, and the RMSNorm gains scale their inputs. With the codes frozen, the continuous stored
parameters of a layer can still move:

    block scales    (N, Kp/B) per 4-bit weight, as scale = absmax-search scale * exp(t), t trained
    outlier values  (nnz,) fp16 per 4-bit weight, trained as float32
    RMSNorm gains   (hidden,) input_layernorm and post_attention_layernorm (and q/k norms if any)

`tune_layer` trains them with Adam so that the quantized layer's output on the calibration windows
matches the float layer's output on the same inputs (block-wise reconstruction, as OmniQuant and
EfficientQAT's Block-AP train their learnable scales; one layer in memory, so it scales to any
model the converter can calibrate). Then it stores them as the format has them — the scales
double-quantized again (quantizer.double_quantize: 8-bit codes, a (min, step) per 256), the
outliers in fp16, the gains in their stored dtype — and measures the loss from that stored form.
If the stored form is no better than the layer as GPTQ left it, the layer is returned unchanged:
tuning never makes the calibration loss it reports worse. docs/accuracy.md, "Tuning the scales end
to end", has what it buys.

With move_codes the codes move too: each weight gets a position u in units of its block's scale,
starting at its level (so at its code), and is stored as the level nearest u; the gradient passes
the rounding straight through (STE, as EfficientQAT's Block-AP trains its weights). u moves by a
momentum step normalised by the RMS gradient of the whole tensor, not of each weight (Adam's
per-weight normalisation moves every weight at the same speed, noise or not, and flipped codes at
random: worse than no tuning on stories260K). It lowers the calibration loss about twice as much
as the scales alone but did not lower the perplexity reliably (docs/accuracy.md), so it is off in
convert.

The loss is the layer's relative output error over the windows,
    sum ||layer_q(x) - layer(x)||^2 / sum ||layer(x) - x||^2,
the squared error of what the layer adds to the residual stream, relative to its size.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from quantlite.codebook import nearest_code, zero_code
from quantlite.model_config import ModelConfig
from quantlite.quantizer import double_quantize, pack_nibbles
from quantlite.qweight import QWeight

TUNING_LEARNING_RATE = 1e-3  # Adam, on the log-scales, the outliers and the gains (docs/accuracy.md)
CODE_LEARNING_RATE = 1e-4    # with move_codes: a position's step, in levels, per RMS gradient of its tensor
CODE_MOMENTUM = (0.9, 0.999) # decay of the positions' gradient mean and of their tensor's mean squared gradient
TUNING_SEED = 0              # the windows' order: a conversion is a pure function of its settings


def tune_steps_problem(steps: object, calibration: object, flag: str = "--tune-steps") -> str | None:
    """Why convert cannot tune `steps` steps (given by `flag`) with this `calibration` (None: none
    given), or None."""
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 0):
        return f"{flag} ({steps!r}) must be an integer >= 0"
    if steps and calibration is None:
        return f"{flag} tunes a calibrated conversion's layers: give --calibration TEXT_FILE (or random) too"
    return None


@dataclass(frozen=True)
class TuningResult:
    layer: dict          # the layer's weights as stored: QWeights and float tensors, named as given
    loss_before: float   # relative output error of the layer as given (GPTQ's)
    loss_after: float    # the same of the returned layer (== loss_before when tuning did not help)
    steps: int


class TunedQWeight(torch.nn.Module):
    """One QWeight with trainable log-scale offsets t (N, nb) (0 = the stored scales), outlier values
    and, with move_codes, each weight's position u (N, nb, B) in units of its block's scale (initially
    its level, so its code): the weight is level(u) * scale * exp(t), level() the nearest codebook
    level (nearest_code's rule), its gradient passed straight through (STE). u is not divided by
    exp(t): a scale that moves leaves the codes where they are (re-rounding the levels under the
    new scale flipped codes the scale was tuned for). Outliers and padding keep the zero level."""

    def __init__(self, qw: QWeight, move_codes: bool):
        super().__init__()
        self.qw = qw
        n, nb, b = qw.shape[0], qw.n_blocks, qw.block_size
        self.levels = qw.codebook[qw.unpacked_codes().long()].view(n, nb, b)                                  # (N, nb, B)
        self.scales = qw.block_scales()                                                                        # (N, nb)
        self.log_offset = torch.nn.Parameter(torch.zeros_like(self.scales))
        self.rows = torch.repeat_interleave(torch.arange(n), torch.diff(qw.outlier_row_ptr.long()))
        self.cols = qw.outlier_cols.long()
        self.outliers = torch.nn.Parameter(qw.outlier_vals.float())                                           # (nnz,)
        self.position = torch.nn.Parameter(self.levels.clone()) if move_codes else None                      # (N, nb, B)
        movable = torch.zeros(n, nb * b, dtype=torch.bool)
        movable[:, : qw.shape[1]] = True
        movable[self.rows, self.cols] = False
        self.movable = movable.view(n, nb, b)

    def codes(self) -> torch.Tensor:
        """(N, nb, B) int64: the codes the weight uses now."""
        if self.position is None:
            return self.qw.unpacked_codes().long().view(self.levels.shape)
        with torch.no_grad():
            codes = nearest_code(self.position, self.qw.codebook).long()
            return torch.where(self.movable, codes, zero_code(self.qw.codebook))

    def weight(self) -> torch.Tensor:
        """(N, K) float32, differentiable in the scales, outliers and positions."""
        n, k = self.qw.shape
        factor = self.log_offset.exp().unsqueeze(2)                                                            # (N, nb, 1)
        levels = self.levels
        if self.position is not None:
            levels = self.position + (self.qw.codebook[self.codes()] - self.position).detach()  # straight through
            levels = levels * self.movable
        dense = (levels * (self.scales.unsqueeze(2) * factor)).view(n, -1)[:, :k]
        if self.outliers.numel():
            dense = dense.index_put((self.rows, self.cols), self.outliers, accumulate=True)
        return dense

    def stored(self) -> QWeight:
        """The QWeight with the trained scales, outliers and codes, rounded as the format stores them."""
        with torch.no_grad():
            scales = self.scales * self.log_offset.exp()
            if self.qw.double_quant:
                fields = double_quantize(scales)
            else:
                fields = {"scales": scales.to(self.qw.scales.dtype)}
            if self.position is not None:
                fields["codes"] = pack_nibbles(self.codes().to(torch.uint8).view(self.qw.shape[0], -1))
            return replace(self.qw, outlier_vals=self.outliers.detach().to(torch.float16), **fields)


def tune_layer(layer: dict, float_layer: dict, inputs: torch.Tensor, config: ModelConfig, *, steps: int,
               learning_rate: float = TUNING_LEARNING_RATE, move_codes: bool = False,
               code_learning_rate: float = CODE_LEARNING_RATE) -> TuningResult:
    """Tune `layer` (decoder_layer's weights, relative names: QWeights for the projections, float
    tensors for the norms and biases, as the converter stores them) towards `float_layer` (the same
    names, float32 originals) on `inputs` (W, ctx, hidden) float32, the layer's input windows.
    `steps` Adam steps, one window each (in a seeded order). Codebook and biases never change, the
    codes only with move_codes (code_learning_rate: their positions' step, see the module's doc)."""
    from quantlite.runtime import llama

    ctx = inputs.shape[1]
    cos, sin = llama.rope_cos_sin(config, torch.arange(ctx).unsqueeze(0), torch.float32)
    with torch.no_grad():
        targets = torch.cat([llama.decoder_layer(inputs[w : w + 1], float_layer, config, cos, sin) for w in range(inputs.shape[0])])
        scale = float((targets - inputs).square().sum())  # the size of what the layer adds

    tuned = {name: TunedQWeight(qw, move_codes) for name, qw in layer.items() if isinstance(qw, QWeight)}
    gains = {name: torch.nn.Parameter(t.float()) for name, t in layer.items() if name.endswith("norm.weight")}

    def weights() -> dict:
        return {**as_computed(layer), **{n: q.weight() for n, q in tuned.items()}, **gains}

    def loss(weights: dict) -> float:
        with torch.no_grad():
            return sum(float((llama.decoder_layer(inputs[w : w + 1], weights, config, cos, sin) - targets[w : w + 1]).square().sum())
                       for w in range(inputs.shape[0])) / scale

    before = loss(as_computed(layer))
    trainer = Trainer(list(tuned.values()), list(gains.values()), learning_rate, code_learning_rate)
    order = torch.randint(inputs.shape[0], (steps,), generator=torch.Generator().manual_seed(TUNING_SEED)).tolist()
    for w in order:
        trainer.zero_grad()
        out = llama.decoder_layer(inputs[w : w + 1], weights(), config, cos, sin)
        F.mse_loss(out, targets[w : w + 1], reduction="sum").backward()
        trainer.step()

    stored = stored_layer(layer, tuned, gains)
    after = loss(as_computed(stored))
    if after >= before:
        return TuningResult(dict(layer), before, before, steps)
    return TuningResult(stored, before, after, steps)


class Trainer:
    """The optimiser of tune_layer and quantlite.model_tuning: Adam on the log-scales, outlier values
    and gains; with move_codes, the positions by one momentum step over the RMS gradient of their
    whole tensor (Adam with one second moment per tensor; no bias correction)."""

    def __init__(self, tuned: list[TunedQWeight], gains: list[torch.nn.Parameter], learning_rate: float,
                 code_learning_rate: float):
        parameters = [p for q in tuned for p in (q.log_offset, q.outliers) if p.numel()] + gains
        self.optimizer = torch.optim.Adam(parameters, lr=learning_rate)
        self.positions = [q.position for q in tuned if q.position is not None]                      # each (N, nb, B)
        self.moments = [(torch.zeros_like(p), torch.zeros(())) for p in self.positions]  # gradient mean, tensor's mean square
        self.learning_rate, self.code_learning_rate = learning_rate, code_learning_rate

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        for p in self.positions:
            p.grad = None

    def step(self, rate: float = 1.0) -> None:
        """One step, both learning rates multiplied by `rate` (a schedule's factor)."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate * rate
        self.optimizer.step()
        first, second = CODE_MOMENTUM
        with torch.no_grad():
            for p, (mean, square) in zip(self.positions, self.moments):
                mean.mul_(first).add_(p.grad, alpha=1 - first)
                square.mul_(second).add_(p.grad.square().mean(), alpha=1 - second)
                p.sub_(self.code_learning_rate * rate * mean / (square.sqrt() + torch.finfo(torch.float32).tiny))


def stored_layer(layer: dict, tuned: dict[str, TunedQWeight], gains: dict[str, torch.nn.Parameter]) -> dict:
    """`layer` with its tuned weights and gains as the format stores them (gains in their stored dtype)."""
    stored = dict(layer)
    stored.update({name: q.stored() for name, q in tuned.items()})
    stored.update({name: g.detach().to(layer[name].dtype) for name, g in gains.items()})
    return stored


def as_computed(layer: dict) -> dict:
    """The layer as decoder_layer computes with it: QWeights as they are, float tensors as float32."""
    return {name: t if isinstance(t, QWeight) else t.float() for name, t in layer.items()}


def tune_shard(tensors: dict[str, torch.Tensor], stats: dict[str, dict], source, layer: int, inputs: torch.Tensor,
               steps: int, progress: bool = False) -> dict[str, torch.Tensor]:
    """The converter's hook (write_shard's `tune`): decoder layer `layer`'s shard tensors (flat, as
    QWeight.to_dict writes them) -> the same tensors after tune_layer against the layer's float
    weights read from `source`, on `inputs` (W, ctx, hidden), the windows as they enter the layer.
    The manifest entries `stats` get each 4-bit weight's SQNR of the tuned weight."""
    from quantlite.packed import group_tensors

    prefix = f"model.layers.{layer}."
    stored = group_tensors(tensors, f"layer {layer}")
    float_layer = {name[len(prefix):]: source.read(name).float() for name in stored}
    result = tune_layer({name[len(prefix):]: value for name, value in stored.items()}, float_layer,
                        inputs.clone(), source.model_config, steps=steps)  # a clone: inputs may be an inference tensor
    if progress:
        from tqdm import tqdm

        tqdm.write(f"layer {layer}: relative output error {result.loss_before:.4g} -> {result.loss_after:.4g} "
                   f"after {steps} tuning steps")
    return flat_layer(result.layer, prefix, float_layer, stats)


def flat_layer(layer: dict, prefix: str, float_layer: dict, stats: dict[str, dict]) -> dict[str, torch.Tensor]:
    """A tuned layer (relative names) -> its shard's flat tensors (names under `prefix`, as
    QWeight.to_dict writes them); each 4-bit weight's manifest entry in `stats` gets the SQNR of its
    tuned form against `float_layer`'s original."""
    from quantlite.converter import sqnr_db

    flat: dict[str, torch.Tensor] = {}
    for name, value in layer.items():
        if isinstance(value, QWeight):
            flat.update(value.to_dict(prefix + name + "."))
            stats[prefix + name]["sqnr_db"] = sqnr_db(float_layer[name], [value], value.shape[0])
        else:
            flat[prefix + name] = value
    return flat
