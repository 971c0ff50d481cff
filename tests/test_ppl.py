"""The perplexity harness: window arithmetic and both protocols against a float64 loop written out
here, on a random bigram "model" whose log-probabilities are known exactly; then `quantlite ppl` on
the real stories260K model (llama2.c, converted to an HF folder)."""
import json
import math

import pytest
import torch

from quantlite.cli import main as cli_main
from quantlite.eval.ppl import EvaluationError, perplexity, window_starts


class Bigram:
    """logits[b, t] = table[ids[b, t]]: the next-token distribution depends on the current token only."""

    def __init__(self, vocab: int, generator: torch.Generator):
        self.table = torch.randn(vocab, vocab, generator=generator, dtype=torch.float64) * 3  # (vocab, vocab)
        self.calls: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(ids.clone())
        return self.table[ids].float()  # (b, s, vocab)

    def expected_nll(self, tokens: list[int], ctx: int, windows: int, first: int, bos: int | None) -> float:
        """Mean NLL in float64, one scored token at a time."""
        log_p = torch.log_softmax(self.table, dim=-1)
        total, count = 0.0, 0
        for w in range(windows):
            window = tokens[w * ctx : (w + 1) * ctx]
            inputs = list(window)
            if bos is not None:
                inputs[0] = bos
            for t in range(first, ctx - 1):
                total -= log_p[inputs[t], window[t + 1]].item()
                count += 1
        return total / count


@pytest.mark.parametrize("protocol, bos", [("gptq", None), ("llamacpp", None), ("llamacpp", 0)])
def test_matches_float64_loop(generator, protocol, bos):
    vocab, ctx = 29, 24
    model = Bigram(vocab, generator)
    n = int(torch.randint(3 * ctx, 6 * ctx, (1,), generator=generator))  # a tail shorter than ctx is dropped
    ids = torch.randint(0, vocab, (n,), generator=generator)
    result = perplexity(model, ids, ctx=ctx, protocol=protocol, bos_id=bos, batch_size=2, progress=False)
    windows = n // ctx
    first = 0 if protocol == "gptq" else ctx // 2
    expected = model.expected_nll(ids.tolist(), ctx, windows, first, bos if protocol == "llamacpp" else None)
    # float32 log-softmax of logits of size ~10: ~1e-6 relative per token, summed in float64
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(expected), rel=1e-5)
    assert result.windows == windows and result.tokens == windows * (ctx - 1 - first)
    assert sum(call.shape[0] for call in model.calls) == windows  # each window is run once
    if protocol == "llamacpp" and bos is not None:
        assert all(bool((call[:, 0] == bos).all()) for call in model.calls)


def test_bos_is_ignored_by_gptq(generator):
    model = Bigram(11, generator)
    ids = torch.randint(1, 11, (40,), generator=generator)
    plain = perplexity(model, ids, ctx=20, progress=False)
    with_bos = perplexity(model, ids, ctx=20, bos_id=0, progress=False)
    assert plain.nll == with_bos.nll


def test_uniform_model_has_perplexity_vocab(generator):
    vocab = int(torch.randint(2, 100, (1,), generator=generator))
    ids = torch.randint(0, vocab, (64,), generator=generator)
    result = perplexity(lambda x: torch.zeros(*x.shape, vocab), ids, ctx=16, progress=False)
    assert result.ppl == pytest.approx(vocab, rel=1e-6)


def test_window_starts():
    assert window_starts(10, 3) == [0, 3, 6]
    assert window_starts(10, 3, max_windows=2) == [0, 3]
    assert window_starts(5, 5) == [0]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"ctx": 100}, "fewer than one window"),
        ({"ctx": 1}, "at least 2"),
        ({"ctx": 8, "max_windows": 0}, "max_windows"),
        ({"ctx": 8, "protocol": "wikitext"}, "unknown protocol"),
        ({"ctx": 8, "batch_size": 0}, "batch_size"),
    ],
)
def test_rejects_bad_settings(kwargs, message):
    with pytest.raises(EvaluationError, match=message):
        perplexity(lambda x: torch.zeros(*x.shape, 4), torch.zeros(50, dtype=torch.int64), progress=False, **kwargs)


def test_rejects_bad_model_output():
    with pytest.raises(EvaluationError, match=r"\(b, s, vocab\) logits"):
        perplexity(lambda x: torch.zeros(x.shape[0], 4), torch.zeros(50, dtype=torch.int64), ctx=8, progress=False)
    with pytest.raises(EvaluationError, match="non-finite"):
        perplexity(lambda x: torch.full((*x.shape, 4), float("nan")), torch.zeros(50, dtype=torch.int64), ctx=8, progress=False)


def test_cli_on_stories260k(stories260k_hf, shared_data, capsys):
    """`quantlite ppl` on the real tiny model equals the Python harness, and the number is the model's
    known quality: llama2.c's stories260K reaches ~4 perplexity on TinyStories (a broken forward or
    tokenizer gives hundreds: the vocabulary has 512 tokens)."""
    from quantlite.eval import open_for_eval

    data = shared_data / "tinystories_valid_sample.txt"
    argv = [str(stories260k_hf), "--data", str(data), "--ctx", "256", "--max-windows", "3"]
    assert cli_main(["ppl", *argv, "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)
    model = open_for_eval(stories260k_hf)
    direct = perplexity(model.forward, model.tokenize(data.read_text()), ctx=256, max_windows=3, progress=False)
    assert reported["ppl"] == pytest.approx(direct.ppl, rel=1e-6)
    assert reported["windows"] == 3 and reported["tokens"] == 3 * 255
    assert 2.0 < reported["ppl"] < 8.0

    assert cli_main(["ppl", *argv, "--protocol", "llamacpp"]) == 0
    text = capsys.readouterr().out
    assert "ppl" in text and f"tokens    {3 * (256 - 1 - 128)} scored" in text  # positions 128..254 of each window


def test_cli_errors(tmp_path, shared_data, capsys):
    data = shared_data / "tinystories_valid_sample.txt"
    assert cli_main(["ppl", str(tmp_path / "missing"), "--data", str(data)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["ppl", str(tmp_path), "--data", str(data)]) == 2
    assert "neither a packed" in capsys.readouterr().err
    assert cli_main(["ppl", str(tmp_path), "--data", str(tmp_path / "none.txt")]) == 2
    assert "cannot read --data" in capsys.readouterr().err


def test_packed_model_equals_fake_quantization(stories260k_hf, shared_data, tmp_path, capsys):
    """`quantlite ppl` on a converted (packed) model runs the streaming runtime; its perplexity must
    equal the fake-quantized transformers model's (the same dequantized weights): the study's rows
    are what a packed model scores. Tolerance: two float32 forward passes with a different order of
    operations agree to ~1e-6 relative in the logits; 1e-5 on the perplexity."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantlite.converter import convert
    from quantlite.eval import fake_quantized
    from quantlite.quantizer import quantize

    packed = tmp_path / "packed"
    # the reference fake-quantizes the decoder Linears only: the head, embedding and norms stay float32
    convert(stories260k_hf, packed, head="float", embedding="float", float_dtype="float32", calibration="none", progress=False)
    data = shared_data / "tinystories_valid_sample.txt"
    assert cli_main(["ppl", str(packed), "--data", str(data), "--ctx", "256", "--max-windows", "2", "--json"]) == 0
    reported = json.loads(capsys.readouterr().out)

    model = AutoModelForCausalLM.from_pretrained(stories260k_hf, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(stories260k_hf)(data.read_text(), return_tensors="pt").input_ids[0]
    # convert --calibration none: the attention projections in blocks of 32, the MLP's in blocks of 64
    block_size = lambda name: 32 if ".self_attn." in name else 64  # noqa: E731
    with fake_quantized(model, lambda w, name, _: quantize(w, name=name, block_size=block_size(name)), progress=False):
        expected = perplexity(lambda x: model(x, use_cache=False).logits, ids, ctx=256, max_windows=2, progress=False)
    assert reported["ppl"] == pytest.approx(expected.ppl, rel=1e-5)
