"""SmolLM2-135M-Instruct (the real model of the demo) against transformers' own GGUF loader.

Both sides dequantize the same Q4_1 GGUF to float32: transformers through its GGUF loader, quantlite
through `convert(..., no_quantize=True)`. Same weights, same float32 math in a different order, so the
tolerance is the issue's 1e-4 relative (max |diff| / max |logit|) and greedy tokens are identical.
The chat prompt must tokenize exactly as transformers' tokenizer renders the model's template.
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import quantlite  # noqa: E402

pytestmark = pytest.mark.slow  # ~30 s: a 540 MB conversion and transformers' GGUF load


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    """(quantlite model, transformers model, transformers tokenizer), all from the same GGUF file."""
    out = tmp_path_factory.mktemp("smollm2") / "packed"
    quantlite.convert(smollm2_gguf, out, no_quantize=True, progress=False)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with quantlite.load(out) as model:
        yield model, reference, tokenizer


def test_smollm2_logits_and_greedy_chat_answer_match_transformers(smollm2):
    model, reference, tokenizer = smollm2
    messages = [{"role": "user", "content": "Name a large river in Africa."}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        expected = reference(input_ids).logits
    ours = model(input_ids)
    assert float((ours - expected).abs().max() / expected.abs().max()) <= 1e-4

    answer = model.generate(messages[0]["content"], max_new_tokens=8, chat=True)
    greedy = reference.generate(input_ids, max_new_tokens=8, do_sample=False)[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in greedy:  # transformers keeps the stop token, quantlite does not
        greedy = greedy[: greedy.index(tokenizer.eos_token_id)]
    assert answer.token_ids[0] == greedy
    assert answer.texts[0] == tokenizer.decode(answer.token_ids[0], skip_special_tokens=True)
