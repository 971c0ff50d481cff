"""The lm-evaluation-harness model "quantlite" (quantlite.integrations.lm_eval) on stories260K, a tiny
real Llama with a real tokenizer (../shared/data), converted to 4 bits.

Each request type is checked against an independent computation: one unpadded sequence at a time
through the runtime, log-softmax in float64. The adapter pads batches on the left, so its logits
differ from those by float32 rounding of a different attention order: within 1e-4 of max |logit|
(test_llama_exact's bound for two orders of the same float32 math). A log-probability moves by at
most twice a logit's error, so a sum over c tokens is held to 2 * c * 1e-4 * max |logit|.
The end-to-end test runs lm_eval itself on local tasks (a YAML config over a JSONL file written
here): the standard tasks need a dataset hub this machine cannot reach.
"""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm_eval is not installed (pip install 'quantlite[eval]')")

import quantlite  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from quantlite.integrations.lm_eval import QuantliteLM  # noqa: E402

LOGIT_RELATIVE = 1e-4
STORY = ("Once upon a time, there was a little girl named Lily. She loved to play outside in the park. "
         "One day, she saw a big dog.")


@pytest.fixture(scope="module")
def packed(stories260k_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories260k") / "packed"
    quantlite.convert(stories260k_hf, out, progress=False)
    return out


@pytest.fixture(scope="module")
def adapter(packed):
    lm = QuantliteLM(path=str(packed), batch_size=3)
    yield lm
    lm.model.close()


def request(kind: str, *arguments) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=arguments, idx=0)


def reference_logprobs(model, context: list[int], continuation: list[int]) -> tuple[float, bool, float, float]:
    """(log P(continuation | context), greedy?, its tolerance, smallest top-1 margin beyond rounding) from one unpadded pass.
    A greedy flag can only differ from the adapter's where the margin is within twice a logit's error."""
    logits = model(torch.tensor([context + continuation]))[0, len(context) - 1:-1].double()  # (c, vocab)
    logprobs = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(continuation)
    top2 = logits.topk(2, dim=-1).values
    logit_error = LOGIT_RELATIVE * float(logits.abs().max())
    return (float(logprobs.gather(-1, target[:, None]).sum()), bool((logits.argmax(-1) == target).all()),
            2 * len(continuation) * logit_error, float((top2[:, 0] - top2[:, 1]).min()) - 2 * logit_error)


def test_loglikelihood_matches_unpadded_passes(adapter, generator):
    tokenizer = adapter.tokenizer
    words = STORY.split()
    pairs = []
    for _ in range(7):  # contexts of different lengths, so the batches are padded
        cut = int(torch.randint(1, len(words) - 4, (1,), generator=generator))
        pairs.append((" ".join(words[:cut]), " " + " ".join(words[cut:cut + 3])))
    greedy_context = "Once upon a time"
    greedy = adapter.model.generate(tokenizer.encode(greedy_context, add_special_tokens=False), max_new_tokens=3).token_ids[0]
    pairs.append((greedy_context, tokenizer.decode(greedy)))  # the model's own greedy tokens
    results = adapter.loglikelihood([request("loglikelihood", *pair) for pair in pairs], disable_tqdm=True)

    for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
        context_tokens = tokenizer.encode(context, add_special_tokens=False)
        continuation_tokens = tokenizer.encode(context + continuation, add_special_tokens=False)[len(context_tokens):]
        expected, expected_greedy, tolerance, margin = reference_logprobs(adapter.model, context_tokens, continuation_tokens)
        assert abs(logprob - expected) <= tolerance, (context, continuation, logprob, expected)
        if margin > 0:  # no near-tie that rounding could flip
            assert is_greedy == expected_greedy
    assert tokenizer.encode(greedy_context + tokenizer.decode(greedy), add_special_tokens=False)[-3:] == greedy  # round-trips
    assert results[-1][1], "the model's own greedy continuation is not reported as greedy"


def test_loglikelihood_rolling_scores_every_token_in_windows(packed):
    lm = QuantliteLM(path=str(packed), batch_size=2, max_length=16)  # windows of 16 tokens
    try:
        tokens = lm.tokenizer.encode(STORY, add_special_tokens=False)
        assert len(tokens) > 2 * 16
        (total,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", STORY)], disable_tqdm=True)
        expected, tolerance = 0.0, 0.0
        for start in range(0, len(tokens), 16):  # each window predicts up to 16 tokens from the 16 before its last
            end = min(start + 16, len(tokens))
            before = [lm.prefix_token] if start == 0 else tokens[end - 17:start]
            logprob, _, window_tolerance, _ = reference_logprobs(lm.model, before, tokens[start:end])
            expected, tolerance = expected + logprob, tolerance + window_tolerance
        assert abs(total - expected) <= tolerance
    finally:
        lm.model.close()


def test_generate_until_stops_at_the_first_stop_string(adapter):
    context = "Once upon a time"
    free = adapter.generate_until([request("generate_until", context, {"max_gen_toks": 24})], disable_tqdm=True)[0]
    assert free == adapter.model.generate([context], max_new_tokens=24).texts[0]
    stop = free.strip().split(" ")[2]  # a word the greedy text reaches
    cut = adapter.generate_until([request("generate_until", context, {"until": [stop], "max_gen_toks": 24})],
                                 disable_tqdm=True)[0]
    assert cut == free[:free.index(stop)]


DOCS = [{"question": "Lily went to the", "choices": ["park", "moon", "sea"], "answer": 0},
        {"question": "She saw a big", "choices": ["cat", "dog"], "answer": 1},
        {"question": "Once upon a", "choices": ["time", "table", "tree"], "answer": 0}]


@pytest.fixture
def local_task(tmp_path, monkeypatch):
    """A folder holding the multiple-choice task quantlite_local_choice over DOCS, as lm_eval's --include_path."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = tmp_path / "choices.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_choice.yaml").write_text(
        "task: quantlite_local_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\n"
        "metric_list:\n  - metric: acc\n"
    )
    return tmp_path / "tasks"


def expected_accuracy(adapter) -> float:
    """The share of DOCS whose answer has the highest log-likelihood, asked of the adapter directly
    (" " is lm_eval's default target_delimiter between question and choice)."""
    right = 0
    for doc in DOCS:
        scores = adapter.loglikelihood([request("loglikelihood", doc["question"], " " + c) for c in doc["choices"]], disable_tqdm=True)
        right += max(range(len(scores)), key=lambda i: scores[i][0]) == doc["answer"]
    return right / len(DOCS)


def test_lm_eval_runs_a_local_task_with_the_quantlite_model(packed, adapter, local_task):
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(model="quantlite", model_args=f"path={packed}", tasks=["quantlite_local_choice"],
                                      batch_size=2, task_manager=TaskManager(include_path=str(local_task)),
                                      log_samples=False, bootstrap_iters=0)
    assert results["results"]["quantlite_local_choice"]["acc,none"] == pytest.approx(expected_accuracy(adapter))


@pytest.mark.slow  # a fresh interpreter importing lm_eval, datasets and torch: ~20 s
def test_command_line_model_quantlite(packed, adapter, local_task, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import REPO

    command = [sys.executable, "-m", "quantlite.integrations.lm_eval", "--model", "quantlite", "--model_args",
               f"path={packed}", "--tasks", "quantlite_local_choice", "--include_path", str(local_task),
               "--batch_size", "2", "--output_path", str(tmp_path / "out")]
    environment = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    accuracy = json.loads(result_file.read_text())["results"]["quantlite_local_choice"]["acc,none"]
    assert accuracy == pytest.approx(expected_accuracy(adapter))
