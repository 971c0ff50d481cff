"""Activation statistics of every Linear input over a small calibration text, for
quantize(w, importance=...).

  full=False  mean x**2 per input column, (K,): the expected squared output error of a weight error
              dW is sum_j E[x_j^2] * |dW[:, j]|^2 when the input columns are uncorrelated.
  full=True   the second moment E[x x^T], (K, K): GPTQ's Hessian (quantlite.gptq), which also
              accounts for correlated columns. This is what the default "quantlite" setting of
              docs/accuracy.md was measured with.

Linears that read the same tensor (q/k/v projections; gate/up) share one statistic: it is computed
once and the returned dict holds the same tensor object under each of their names.

The calibration text must not overlap the evaluation text (benchmarks/accuracy.py takes it from the
part of the evaluation file after the evaluated windows, and says so).
"""
from __future__ import annotations

import torch

from quantlite.errors import QuantliteError


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

    if token_ids.dim() != 1 or token_ids.dtype != torch.int64:
        raise CalibrationError(f"token_ids must be a 1-D int64 tensor, got {tuple(token_ids.shape)} {token_ids.dtype}")
    linears = {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    }
    if not linears:
        raise CalibrationError("the model has no nn.Linear layers to calibrate")
    starts = window_starts(token_ids.numel(), ctx, max_windows)
    sums: dict[str, torch.Tensor] = {}   # owner name -> float64 running sum, (K,) or (K, K)
    counts: dict[str, int] = {}          # owner name -> rows of x seen
    owner_of: dict[str, str] = {}        # linear name -> the name whose statistic it shares
    last = {"input": None, "owner": None}

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            if inputs[0] is last["input"]:  # same tensor as the Linear just before: share its sum
                owner_of[name] = last["owner"]
                return
            last["input"], last["owner"] = inputs[0], name
            owner_of[name] = name
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float().cpu()  # (tokens, K)
            # float32 products, float64 running sum: one window's sum is exact enough, many add up
            moment = x.T @ x if full else x.square().sum(dim=0)
            if name in sums:
                sums[name] += moment.double()
            else:
                sums[name] = moment.double()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in linears.items()]
    try:
        with torch.inference_mode():
            for start in tqdm(starts, desc="calibration", unit="window", disable=not progress):
                model(token_ids[start : start + ctx].unsqueeze(0))
                last["input"] = None  # never match a tensor across windows
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(linears) - set(owner_of))
    if missing:
        raise CalibrationError(f"{len(missing)} Linear layers never ran in the forward pass, e.g. {missing[0]!r}")
    means = {owner: (sums[owner] / counts[owner]).float() for owner in sums}
    return {f"{name}.weight": means[owner_of[name]] for name in linears}
