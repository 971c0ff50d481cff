"""Per-column activation statistics of every Linear input, from a small calibration text.

quantize(w, importance=...) weighs the error of input column j by E[x_j^2]: the expected squared
error of the layer's output y = W x from a weight error dW is sum_j E[x_j^2] * dW[:, j]^2 when the
columns of x are uncorrelated (the diagonal of the GPTQ/OBQ Hessian X^T X). One (K,) float32 vector
per Linear, so the statistics cost K floats per weight matrix and are gathered offline in one pass.

The calibration text must not overlap the evaluation text (benchmarks/accuracy.py takes it from the
part of the file after the evaluated windows).
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
    max_windows: int | None = 8,
    skip: tuple[str, ...] = ("lm_head",),
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Mean x**2 per input column of every nn.Linear in `model` (a transformers causal LM or any
    module whose forward takes (b, s) token ids), over non-overlapping windows of `ctx` tokens of
    `token_ids` ((n,) int64). Returns {"<module name>.weight": (in_features,) float32}, the key
    being the weight's name in the checkpoint. Linears whose name contains an entry of `skip` are left out.
    """
    from tqdm.auto import tqdm

    from quantlite.eval.perplexity import window_starts

    if token_ids.dim() != 1 or token_ids.dtype != torch.int64:
        raise CalibrationError(f"token_ids must be a 1-D int64 tensor, got {tuple(token_ids.shape)} {token_ids.dtype}")
    linears = {
        name: module for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(s in name for s in skip)
    }
    if not linears:
        raise CalibrationError("the model has no nn.Linear layers to calibrate")
    sums = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])  # (tokens, in_features)
            sums[name] += x.double().square().sum(dim=0).cpu()
            counts[name] += x.shape[0]
        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in linears.items()]
    try:
        starts = window_starts(token_ids.numel(), ctx, max_windows)
        with torch.inference_mode():
            for start in tqdm(starts, desc="calibration", unit="window", disable=not progress):
                model(token_ids[start : start + ctx].unsqueeze(0))
    finally:
        for handle in handles:
            handle.remove()
    return {f"{name}.weight": (sums[name] / max(counts[name], 1)).float() for name in linears}
