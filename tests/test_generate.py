"""Sampling, stop tokens, batching, the chat template and the `quantlite generate` command."""
from __future__ import annotations

import json
import math

import pytest
import torch

import quantlite
from quantlite.cli import main as cli_main
from quantlite.runtime.generate import GenerationError, sample
from test_llama_exact import BASE, build_checkpoint, module_generator

WORDS = [f"w{i}" for i in range(BASE["vocab_size"] - 4)]
SPECIALS = ["<unk>", "<s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> {% endfor %}"
    "{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def write_tokenizer(folder) -> None:
    """A word-level tokenizer over w0..w126 and four special tokens, with a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(SPECIALS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(folder / "tokenizer.json"))
    settings = {"chat_template": CHAT_TEMPLATE, "bos_token": "<s>", "eos_token": "<|im_end|>",
                "unk_token": "<unk>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory):
    """One converted model with a tokenizer for the module (plain NF4: fast to convert)."""
    tmp_path = tmp_path_factory.mktemp("generate")
    _, folder = build_checkpoint(tmp_path, module_generator())
    write_tokenizer(folder)
    quantlite.convert(folder, tmp_path / "packed", method="nf4", progress=False)
    return tmp_path / "packed"


def random_text(generator, n: int) -> str:
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=generator).tolist())


# ------------------------------------------------------------------------------ sampling
def test_greedy_and_top_k_1_pick_the_argmax(generator):
    logits = torch.randn(6, 50, generator=generator)
    assert torch.equal(sample(logits, 0.0, None, None, None), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.3, 1, None, generator), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.7, None, 1e-6, generator), logits.argmax(-1))


def test_sampling_follows_the_softmax(generator):
    """20000 draws from softmax(logits / T): each frequency within 0.015 of its probability
    (5 standard deviations of a binomial proportion at p = 0.5 is 0.018)."""
    logits = torch.randn(1, 6, generator=generator, dtype=torch.float64).float()
    draws = sample(logits.expand(20000, 6), 0.8, None, None, generator)
    frequencies = torch.bincount(draws, minlength=6).double() / 20000
    expected = (logits.double() / 0.8).softmax(-1)[0]
    assert (frequencies - expected).abs().max() <= 0.015


def test_top_k_and_top_p_keep_only_their_sets(generator):
    logits = torch.randn(1, 40, generator=generator)
    top5 = set(torch.topk(logits[0], 5).indices.tolist())
    assert set(sample(logits.expand(3000, 40), 1.0, 5, None, generator).tolist()) <= top5
    # nucleus in float64: the smallest most-likely set holding probability >= 0.6
    probs = logits.double().softmax(-1)[0]
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < 0.6).sum()) + 1
    nucleus = set(order[:size].tolist())
    drawn = set(sample(logits.expand(3000, 40), 1.0, None, 0.6, generator).tolist())
    assert drawn <= nucleus and len(drawn) >= 1


@pytest.mark.parametrize("spread", [0.5, 8.0])  # the nucleus within the first candidates / beyond them
def test_top_p_over_a_large_vocabulary_draws_from_the_float64_nucleus(generator, spread):
    from quantlite.runtime.generate import NUCLEUS_CANDIDATES

    vocab = 3 * NUCLEUS_CANDIDATES[0]
    logits = torch.randn(1, vocab, generator=generator) * spread
    probs = logits.double().softmax(-1)[0]
    order = probs.argsort(descending=True)
    size = int((probs[order].cumsum(0) < 0.9).sum()) + 1
    assert (size <= NUCLEUS_CANDIDATES[0]) == (spread == 8.0)
    draws = sample(logits.expand(4000, vocab), 1.0, None, 0.9, generator)
    assert set(draws.tolist()) <= set(order[:size].tolist())
    # the most likely token's share of the draws: its probability renormalised over the nucleus,
    # within 5 binomial standard deviations
    top = probs[order[0]] / probs[order[:size]].sum()
    share = float((draws == order[0]).double().mean())
    assert abs(share - float(top)) <= 5 * math.sqrt(float(top * (1 - top)) / 4000) + 1e-9


@pytest.mark.parametrize("k", [1, 7, 1024])
def test_top_candidates_are_torch_topks(generator, k):
    from quantlite.runtime.generate import _top

    logits = torch.randn(5, 3000, generator=generator) * 3
    logits[1, :200] = 2.5                        # a run of equal logits across the k-th place
    logits[2] = torch.randint(0, 4, (3000,), generator=generator).float()  # ties everywhere
    values, indices = _top(logits, k)
    assert torch.equal(values, torch.topk(logits, k, dim=-1).values)  # the k largest, largest first
    assert torch.equal(logits.gather(-1, indices), values)            # at these (distinct) indices
    assert all(len(set(row)) == k for row in indices.tolist())


# ------------------------------------------------------------------------------ generation
def test_batched_generation_equals_each_prompt_alone(packed_dir, generator):
    prompts = [torch.randint(0, BASE["vocab_size"], (n,), generator=generator).tolist() for n in (3, 9, 6)]
    with quantlite.load(packed_dir) as model:
        batched = model.generate(prompts, max_new_tokens=8).token_ids
        assert model.generate(torch.tensor(prompts[1]), max_new_tokens=8).token_ids[0] == batched[1]  # a tensor prompt
        alone = [model.generate(p, max_new_tokens=8).token_ids[0] for p in prompts]
    assert batched == alone


def test_seed_makes_sampling_reproducible(packed_dir, generator):
    prompt = torch.randint(0, BASE["vocab_size"], (5,), generator=generator).tolist()
    with quantlite.load(packed_dir) as model:
        runs = [model.generate(prompt, max_new_tokens=10, temperature=1.5, top_k=50, seed=s).token_ids for s in (1, 1, 2)]
    assert runs[0] == runs[1]
    assert len(runs[0][0]) == 10


def test_stop_token_ends_the_row(packed_dir, generator):
    prompt = torch.randint(0, BASE["vocab_size"], (5,), generator=generator).tolist()
    with quantlite.load(packed_dir) as model:
        free = model.generate(prompt, max_new_tokens=10).token_ids[0]
        stop = free[4]
        stopped = model.generate(prompt, max_new_tokens=10, stop=[stop]).token_ids[0]
    assert stopped == free[: free.index(stop)]


def test_chat_prompt_is_the_template_transformers_renders(packed_dir, generator):
    """Text and chat prompts tokenize as transformers' own tokenizer does from the same files."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(quantlite.PackedModel.open(packed_dir).tokenizer_dir)
    with quantlite.load(packed_dir) as model:
        question = random_text(generator, 6)
        messages = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": question}]
        expected_ids = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        by_ids = model.generate(list(expected_ids), max_new_tokens=6).token_ids
        by_chat = model.generate(question, max_new_tokens=6, chat=True, system="w1 w2")
        assert by_chat.token_ids == by_ids
        assert by_chat.texts[0] == reference.decode(by_ids[0], skip_special_tokens=True)


def test_stop_string_cuts_the_text(packed_dir, generator):
    with quantlite.load(packed_dir) as model:
        # a random model may pick EOS at once: take the first of a few prompts that gives two words
        for _ in range(20):
            prompt = random_text(generator, 5)
            free = model.generate(prompt, max_new_tokens=16).texts[0]
            if len(free.split()) >= 2:
                break
        word = free.split()[-1]
        cut = model.generate(prompt, max_new_tokens=16, stop=[word]).texts[0]
    assert cut == free[: free.index(word)]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
    ],
)
def test_bad_options_are_refused(packed_dir, options, message):
    with quantlite.load(packed_dir) as model, pytest.raises(GenerationError, match=message):
        model.generate([1, 2, 3], **{"max_new_tokens": 4, **options})


def test_bad_prompts_are_refused(packed_dir):
    with quantlite.load(packed_dir) as model:
        with pytest.raises(GenerationError, match="outside"):
            model.generate([1, BASE["vocab_size"]])
        with pytest.raises(GenerationError, match="no prompt"):
            model.generate([])
        with pytest.raises(GenerationError, match="text prompts"):
            model.generate([1, 2], chat=True)


# ------------------------------------------------------------------------------ the command
def test_cli_generate_streams_and_reports_stats(packed_dir, capsys, generator):
    capsys.readouterr()  # the fixtures' seed lines
    for _ in range(5):  # a random model ends at once (EOS first) now and then: no decode step to split
        prompt = random_text(generator, 4)
        status = cli_main(["generate", str(packed_dir), "--prompt", prompt, "--max-new-tokens", "5", "--stats",
                           "--memory-budget", "1GB"])
        out, err = capsys.readouterr()
        assert status == 0
        if "no decode step" not in err:
            break
    with quantlite.load(packed_dir) as model:
        assert out.strip() == model.generate(prompt, max_new_tokens=5).texts[0].strip()
    for label in ("time to first token", "decode speed", "decode step", "matmuls", "attention", "peak memory",
                  "bytes read", "resident layers"):
        assert label in err


def test_cli_generate_batch_and_errors(packed_dir, capsys, generator, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(random_text(generator, 3) + "\n\n" + random_text(generator, 5) + "\n")
    assert cli_main(["generate", str(packed_dir), "--prompt-file", str(prompts), "--max-new-tokens", "3", "--chat"]) == 0
    assert capsys.readouterr().out.count("=== [") == 2
    assert cli_main(["generate", str(packed_dir), "--prompt", "w1", "--memory-budget", "lots"]) == 2
    assert "memory budget" in capsys.readouterr().err
    assert cli_main(["generate", str(packed_dir)]) == 2
    assert "--prompt" in capsys.readouterr().err


def test_cli_demo_converts_with_random_token_calibration_by_default(tmp_path, capsys, generator, monkeypatch):
    """The demo's own conversion (the fetch replaced by a small checkpoint with a tokenizer): GPTQ on random
    token ids, RANDOM_CALIBRATION_WINDOWS of them, recorded in the manifest; then it answers."""
    import quantlite.fetch
    from quantlite.calibration import RANDOM_CALIBRATION_WINDOWS

    _, folder = build_checkpoint(tmp_path, generator)
    write_tokenizer(folder)
    monkeypatch.setattr(quantlite.fetch, "smollm2_gguf", lambda: folder)
    capsys.readouterr()
    assert cli_main(["demo", "--out", str(tmp_path / "packed"), "--prompt", random_text(generator, 3), "--max-new-tokens", "2"]) == 0
    calibration = json.loads((tmp_path / "packed" / "quantlite.json").read_text())["quantization"]["calibration"]
    assert calibration["file"] == "random" and calibration["windows"] == RANDOM_CALIBRATION_WINDOWS
    out, err = capsys.readouterr()
    assert "calibrated on random token ids" in err and "time to first token" in out


def test_cli_demo_reuses_a_complete_conversion(packed_dir, capsys, generator):
    """With --out naming a complete packed model, demo neither fetches nor converts: it chats and reports."""
    capsys.readouterr()
    assert cli_main(["demo", "--out", str(packed_dir), "--prompt", random_text(generator, 3), "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "using the packed model" in err and "fetching" not in err
    assert "time to first token" in out and "resident layers" in out
