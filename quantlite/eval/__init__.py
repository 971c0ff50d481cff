"""Accuracy tools: perplexity of a model on a text, per-tensor quantization error, fake quantization.

    from quantlite.eval import perplexity, open_for_eval
    model = open_for_eval("./packed")                       # or an HF folder, or a .gguf file
    ids = model.tokenize(open("wiki.test.raw").read())
    print(perplexity(model.forward, ids, ctx=2048).ppl)

    from quantlite.eval import tensor_error
    tensor_error(w, quantize(w)).sqnr_db
"""
from quantlite.eval.fake_quant import FakeQuantStats, fake_quantized, linear_weights
from quantlite.eval.metrics import MetricError, TensorError, relative_error, sqnr_db, tensor_error
from quantlite.eval.models import EvalModel, open_for_eval
from quantlite.eval.ppl import PROTOCOLS, EvaluationError, PerplexityResult, perplexity, window_starts

__all__ = [
    "PROTOCOLS", "EvalModel", "EvaluationError", "FakeQuantStats", "MetricError", "PerplexityResult",
    "TensorError", "fake_quantized", "linear_weights", "open_for_eval", "perplexity", "relative_error",
    "sqnr_db", "tensor_error", "window_starts",
]
