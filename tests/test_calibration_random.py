"""The token ids of `convert --calibration random`: random_token_ids' law (uniform, or by frequency rank),
and token_frequency_ranks, the frequency ranks a BPE tokenizer's merges give without any text."""

import json

import pytest
import torch

from quantlite.calibration import CalibrationError, random_token_ids, token_frequency_ranks


def _binomial_bound(counts: torch.Tensor, probabilities: torch.Tensor, n: int) -> None:
    """Each count is Binomial(n, p): within 6 standard deviations of n p (all ids together fail by chance
    with probability < 1e-6)."""
    deviation = (counts.double() - n * probabilities).abs()
    bound = 6 * (n * probabilities * (1 - probabilities)).sqrt() + 1e-9
    assert bool((deviation <= bound).all()), float((deviation / bound).max())


def test_random_token_ids_are_seeded_uniform_and_never_special(generator):
    vocabulary = int(torch.randint(50, 400, (1,), generator=generator))
    excluded = torch.randperm(vocabulary, generator=generator)[:int(torch.randint(1, 20, (1,), generator=generator))].tolist()
    seed = int(torch.randint(2**31, (1,), generator=generator))
    ids = random_token_ids(vocabulary, excluded + [vocabulary + 5], 200 * vocabulary, seed)
    assert ids.dtype == torch.int64 and ids.shape == (200 * vocabulary,)
    assert torch.equal(ids, random_token_ids(vocabulary, excluded, 200 * vocabulary, seed))  # seeded
    counts = torch.bincount(ids, minlength=vocabulary)
    assert int(counts[excluded].sum()) == 0
    allowed = counts[[i for i in range(vocabulary) if i not in excluded]]
    _binomial_bound(allowed, torch.full((allowed.numel(),), 1 / allowed.numel(), dtype=torch.float64), ids.numel())
    with pytest.raises(CalibrationError, match="all special tokens"):
        random_token_ids(3, [0, 1, 2], 10)


def test_random_token_ids_follow_the_rank_law(generator):
    """p(id) = (rank + offset) ** -exponent / sum over the allowed ids, for random ranks (ties included),
    exponents and offsets; specials never drawn; the same seed gives the same ids, another seed others."""
    vocabulary = int(torch.randint(50, 300, (1,), generator=generator))
    ranks = torch.randint(vocabulary, (vocabulary,), generator=generator)
    excluded = torch.randperm(vocabulary, generator=generator)[:5].tolist()
    exponent = 0.3 + 1.5 * float(torch.rand(1, generator=generator))
    offset = 0.5 + 50 * float(torch.rand(1, generator=generator))
    seed, n = int(torch.randint(2**31, (1,), generator=generator)), 400 * vocabulary
    ids = random_token_ids(vocabulary, excluded, n, seed, ranks, exponent, offset)
    assert ids.dtype == torch.int64 and ids.shape == (n,)
    assert torch.equal(ids, random_token_ids(vocabulary, excluded, n, seed, ranks, exponent, offset))
    assert not torch.equal(ids, random_token_ids(vocabulary, excluded, n, seed + 1, ranks, exponent, offset))
    counts = torch.bincount(ids, minlength=vocabulary)
    assert int(counts[excluded].sum()) == 0
    law = (ranks.double() + offset) ** -exponent
    law[excluded] = 0
    _binomial_bound(counts, law / law.sum(), n)


def test_random_token_ids_refuse_a_bad_law():
    ranks = torch.arange(10)
    with pytest.raises(CalibrationError, match="shape"):
        random_token_ids(12, [], 5, ranks=ranks)
    with pytest.raises(CalibrationError, match="exponent"):
        random_token_ids(10, [], 5, ranks=ranks, exponent=-1.0)
    with pytest.raises(CalibrationError, match="offset"):
        random_token_ids(10, [], 5, ranks=ranks, offset=0.0)
    with pytest.raises(CalibrationError, match="all special tokens"):
        random_token_ids(2, [0, 1], 5, ranks=torch.arange(2))


def test_bpe_merges_rank_tokens_by_their_first_merge():
    """A token ranks at the first merge it is a part or the result of; then the tokens of no merge in id
    order (here an added token, an unmerged character, an id the vocabulary lacks); byte fallback last.
    Merges in both of tokenizer.json's spellings."""
    vocabulary = {"<0x41>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "z": 6, "<s>": 7, "<0x42>": 8}
    model = {"type": "BPE", "vocab": vocabulary, "merges": ["a b", ["ab", "c"]], "byte_fallback": True}
    ranks = token_frequency_ranks(model, 10)
    #                                  <0x41> a  b  c  ab abc z  <s> <0x42> (id 9)
    assert ranks.tolist() == [5, 0, 0, 1, 0, 1, 2, 3, 6, 4]
    ranks = token_frequency_ranks({**model, "byte_fallback": False}, 9)  # "<0x41>" is then an ordinary token
    assert ranks.tolist() == [2, 0, 0, 1, 0, 1, 3, 4, 5]
    assert token_frequency_ranks({"type": "Unigram", "vocab": [["a", -1.0], ["b", -2.0]]}, 3).tolist() == [0, 1, 2]


def test_rank_law_draws_are_closer_to_real_text_than_uniform_draws(stories260k_hf, shared_data, generator):
    """What the law is for: on stories260K's tokenizer, ids drawn by the frequency ranks of its merges
    (the shipped exponent and offset) have token frequencies closer to TinyStories' than uniform draws
    (total variation distance). Fresh seed."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories260k_hf)
    text = (shared_data / "tinystories_valid_sample.txt").read_text(encoding="utf-8")[:200000]
    vocabulary = len(tokenizer)
    real = torch.bincount(tokenizer(text, return_tensors="pt").input_ids[0], minlength=vocabulary).double()
    ranks = token_frequency_ranks(json.loads((stories260k_hf / "tokenizer.json").read_text())["model"], vocabulary)
    seed, n = int(torch.randint(2**31, (1,), generator=generator)), 100000

    def distance(ids):
        drawn = torch.bincount(ids, minlength=vocabulary).double()
        return float((drawn / drawn.sum() - real / real.sum()).abs().sum() / 2)

    ranked = distance(random_token_ids(vocabulary, tokenizer.all_special_ids, n, seed, ranks))
    uniform = distance(random_token_ids(vocabulary, tokenizer.all_special_ids, n, seed))
    assert ranked < uniform, (ranked, uniform)
