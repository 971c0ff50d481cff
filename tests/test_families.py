"""Every member of the Llama family in quantlite.model_config.FAMILIES against transformers' own class.

Each case builds a tiny random-weight model with transformers (Qwen2ForCausalLM, Qwen3ForCausalLM,
MistralForCausalLM, LlamaForCausalLM), saves it as safetensors, and also writes it as a GGUF file with
the `gguf` package the way llama.cpp's converter does (its names, its q/k row permutation for the llama
architecture, its metadata keys under the architecture's prefix, a small byte-level BPE tokenizer).

Tolerances as in test_llama_exact.py: unquantized, both sides run the same float32 math in another
order, so max |diff| / max |logit| <= 1e-4 and greedy tokens are identical; quantized, transformers
gets the dequantized weights of the very QWeights the runtime uses, so <= 1e-3.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

import quantlite  # noqa: E402
from quantlite.errors import ConversionError, FormatError  # noqa: E402
from quantlite.model_config import FAMILIES, ModelConfigError, read_model_config  # noqa: E402
from quantlite.sources import open_source  # noqa: E402
from quantlite.sources.gguf_file import GGUF_LAYER_NAMES, GGUF_NAMES  # noqa: E402
from test_llama_exact import assert_greedy_tokens_agree, load_packed_weights, relative_error  # noqa: E402

BASE = dict(
    vocab_size=131, hidden_size=80, intermediate_size=152, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=32, rms_norm_eps=1e-5, eos_token_id=None, bos_token_id=None,
)
WINDOW = 8  # Mistral's sliding window here: every test sequence but the GGUF one is longer
# family -> (transformers config class, model class, settings that exercise what the family changes)
CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW, head_dim=24)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, attention_bias=True)),
}
GGUF_ARCHITECTURE = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # as llama.cpp writes them


def build(family: str, generator: torch.Generator, tmp_path, **overrides):
    """A random-weight model of `family` saved as safetensors; returns (model, folder)."""
    config_class, model_class, settings = CASES[family]
    config = getattr(transformers, config_class)(**{**BASE, **settings, **overrides})
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():
        for param in model.parameters():  # larger than the init std so attention is far from uniform
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    folder = tmp_path / f"hf-{family}"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_the_table_names_each_family_transformers_knows():
    for name, family in FAMILIES.items():
        assert transformers.AutoConfig.for_model(name).model_type == name
        assert hasattr(transformers, family.architecture), family.architecture


@pytest.mark.parametrize("family", list(CASES))
def test_unquantized_logits_and_greedy_tokens_match_transformers(family, tmp_path, generator):
    reference, folder = build(family, generator, tmp_path)
    quantlite.convert(folder, tmp_path / "packed", no_quantize=True, progress=False)
    seq = 2 * BASE["max_position_embeddings"] - 5  # past max_position_embeddings and 7 times the window
    input_ids = torch.randint(0, BASE["vocab_size"], (2, seq), generator=generator)
    with quantlite.load(tmp_path / "packed", memory_budget="1GB") as model, torch.no_grad():
        assert model.config.family == family
        ours = model(input_ids)
        expected = reference(input_ids).logits
        assert ours.dtype == torch.float32 and ours.shape == expected.shape
        assert relative_error(ours, expected) <= 1e-4

        prompt = input_ids[0, :7]  # 7 + 12 positions: decode steps past Mistral's window, through the cache
        generated = model.generate(prompt.tolist(), max_new_tokens=12)
        greedy = reference.generate(prompt[None], max_new_tokens=12, do_sample=False)[0, 7:]
        assert_greedy_tokens_agree(reference, prompt.tolist(), generated.token_ids[0], greedy.tolist())


def test_sliding_window_with_left_padding_matches_mistral(tmp_path, generator):
    """A padded batch: the window counts cache positions, padding included, as transformers' mask does."""
    reference, folder = build("mistral", generator, tmp_path)
    quantlite.convert(folder, tmp_path / "packed", no_quantize=True, progress=False)
    input_ids = torch.randint(0, BASE["vocab_size"], (3, 21), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :5] = 0
    mask[2, :13] = 0
    with quantlite.load(tmp_path / "packed") as model, torch.no_grad():
        ours = model(input_ids, attention_mask=mask)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        expected = reference(input_ids, attention_mask=mask, position_ids=positions).logits
    valid = mask.bool()
    assert relative_error(ours[valid], expected[valid]) <= 1e-4


@pytest.mark.parametrize("family", list(CASES))
def test_quantized_matches_transformers_on_dequantized_weights(family, tmp_path, generator):
    reference, folder = build(family, generator, tmp_path)
    quantlite.convert(folder, tmp_path / "packed", progress=False)
    load_packed_weights(reference, quantlite.PackedModel.open(tmp_path / "packed"))
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 19), generator=generator)
    with quantlite.load(tmp_path / "packed") as model, torch.no_grad():
        assert relative_error(model(input_ids), reference(input_ids).logits) <= 1e-3


@pytest.mark.parametrize("family, change, message", [
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("mistral", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen3", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "yarn"),
])
def test_what_the_runtime_cannot_run_is_refused_by_convert_before_writing_with_the_same_words(
        family, change, message, tmp_path, generator):
    _, folder = build(family, generator, tmp_path)
    config = {**json.loads((folder / "config.json").read_text()), **change}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=message) as runtime_refusal:
        read_model_config(config)
    with pytest.raises(ConversionError, match=message) as convert_refusal:
        quantlite.convert(folder, tmp_path / "out", progress=False)
    assert str(runtime_refusal.value) in str(convert_refusal.value)
    assert not (tmp_path / "out").exists()


def test_a_packed_model_of_an_unknown_family_is_refused_by_the_reader(tmp_path, generator):
    _, folder = build("qwen2", generator, tmp_path)
    quantlite.convert(folder, tmp_path / "packed", no_quantize=True, progress=False)
    manifest = json.loads((tmp_path / "packed" / "quantlite.json").read_text())
    manifest["config"]["model_type"] = "gemma"
    (tmp_path / "packed" / "quantlite.json").write_text(json.dumps(manifest))
    with pytest.raises(FormatError, match="not a Llama-family model.*Qwen2ForCausalLM"):
        quantlite.load(tmp_path / "packed")


# ------------------------------------------------------------------------------ GGUF input
def byte_level_vocab(size: int) -> tuple[list[str], list[str]]:
    """`size` GPT-2 byte-level tokens: single-byte symbols, the last one the merge "a b"."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return list(bytes_to_unicode().values())[: size - 1] + ["ab"], ["a b"]


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF's two rotary halves to interleaved pairs."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, path, family: str) -> None:
    """`model` as llama.cpp's converter writes it: float32 tensors under GGUF names, its metadata keys."""
    config, arch = model.config, GGUF_ARCHITECTURE[family]
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in [("context_length", config.max_position_embeddings), ("block_count", config.num_hidden_layers),
                       ("feed_forward_length", config.intermediate_size), ("embedding_length", config.hidden_size),
                       ("attention.head_count", config.num_attention_heads),
                       ("attention.head_count_kv", config.num_key_value_heads), ("rope.dimension_count", head_dim),
                       ("attention.key_length", head_dim), ("attention.value_length", head_dim)]:
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", config.rope_parameters["rope_theta"])
    tokens, merges = byte_level_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([1] * len(tokens))
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    to_gguf = {hf: name for name, hf in GGUF_NAMES.items()}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        array = tensor.float().numpy()
        if arch == "llama" and ".self_attn.q_proj." in name:
            array = llama_cpp_permute(array, config.num_attention_heads)
        elif arch == "llama" and ".self_attn.k_proj." in name:
            array = llama_cpp_permute(array, config.num_key_value_heads)
        layer, _, rest = name.removeprefix("model.layers.").partition(".")
        gguf_name = to_gguf.get(name) or f"blk.{layer}.{next(g for g, hf in GGUF_LAYER_NAMES.items() if hf == rest)}"
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(params=list(CASES))
def gguf_case(request, tmp_path, generator):
    family = request.param
    reference, _ = build(family, generator, tmp_path)
    write_gguf(reference, tmp_path / f"{family}.gguf", family)
    return family, reference, tmp_path / f"{family}.gguf"


def test_gguf_source_reads_the_model_transformers_gguf_loader_reads(gguf_case):
    """Every tensor equals the original weight and what transformers' own GGUF loader makes of the
    file (it knows llama.cpp's conventions independently of us); the description is the model's."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    family, reference, path = gguf_case
    source = open_source(path)
    original = reference.state_dict()
    skeleton = reference
    if family == "mistral":  # transformers picks its GGUF reading by the model's type: a llama file's is llama
        with torch.device("meta"):
            skeleton = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**BASE, "head_dim": 24}))
    loaded = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    assert set(source.shapes) == {n for n in original if not (n == "lm_head.weight" and reference.config.tie_word_embeddings)}
    for name in source.shapes:
        ours = source.read(name)
        assert torch.equal(ours, original[name]), name
        assert torch.equal(ours, loaded[name]), name
    expected = dict(vars(read_model_config(json.loads(reference.config.to_json_string()))))
    if family == "mistral":  # llama.cpp writes Mistral as a llama: no sliding-window key, read as full attention
        expected.update(family="llama", sliding_window=None)
    for key, value in expected.items():
        assert getattr(source.model_config, key) == pytest.approx(value), key


def test_gguf_converts_and_runs_like_transformers(gguf_case, generator):
    family, reference, path = gguf_case
    quantlite.convert(path, path.parent / "packed", no_quantize=True, progress=False)
    seq = WINDOW  # within Mistral's window, where llama.cpp's llama reading of it is the same model
    input_ids = torch.randint(0, BASE["vocab_size"], (2, seq), generator=generator)
    with quantlite.load(path.parent / "packed") as model, torch.no_grad():
        assert relative_error(model(input_ids), reference(input_ids).logits) <= 1e-4
        assert model.tokenizer.encode("ab!", add_special_tokens=False) == [BASE["vocab_size"] - 1, 0]


# ------------------------------------------------------------------------------ chat templates
# Templates written for this test in the manner of each family's own (ChatML for Qwen, with the
# namespace, reversed scan, string methods and tojson that Qwen3's uses; [INST] for Mistral, with
# raise_exception and alternation checks; Llama 3's header tokens): `generate --chat` renders them
# in its sandbox exactly as transformers does.
CHAT_TEMPLATES = {
    "qwen": (
        "{%- if messages[0].role == 'system' %}{{- '<|im_start|> system ' + (messages[0].content | tojson)[1:-1] + ' <|im_end|> ' }}"
        "{%- else %}{{- '<|im_start|> system w0 <|im_end|> ' }}{%- endif %}"
        "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
        "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
        "{%- if message.role == 'user' and message.content is string and not message.content.startswith('w9 ') %}"
        "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
        "{%- for message in messages %}{%- if message.role != 'system' %}"
        "{%- set content = message.content.split('</think>')[-1] | trim %}"
        "{{- '<|im_start|> ' + message.role + ' ' + content + ' <|im_end|> ' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|> assistant ' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}{{- 'w3 w4 ' }}{%- endif %}{%- endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('roles must alternate user/assistant') }}{%- endif %}"
        "{%- if message['role'] == 'user' %}{%- if loop.last and system is defined %}"
        "{{- ' w5 ' + system + ' ' + message['content'] + ' w6 ' }}{%- else %}{{- ' w5 ' + message['content'] + ' w6 ' }}"
        "{%- endif %}{%- else %}{{- ' ' + message['content'] + eos_token }}{%- endif %}{%- endfor %}"
    ),
    "llama": (
        "{{- bos_token }}{%- for message in messages %}"
        "{{- ' <|im_start|> ' + message['role'] + ' w7 ' + message['content'] | trim + ' ' + eos_token }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- ' <|im_start|> assistant w7 ' }}{%- endif %}"
    ),
}


@pytest.mark.parametrize("style", list(CHAT_TEMPLATES))
def test_chat_templates_of_each_family_render_as_transformers_does(style, tmp_path):
    from test_generate import write_tokenizer

    from quantlite.runtime.generate import GenerationError, Tokenizer

    write_tokenizer(tmp_path)
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "chat_template": CHAT_TEMPLATES[style]}))
    ours = Tokenizer(tmp_path)
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path)
    conversation = [{"role": "system", "content": "w1 w2"}, {"role": "user", "content": "w10 w11"},
                    {"role": "assistant", "content": "w12 </think> w13"}, {"role": "user", "content": "w14"}]
    for messages in (conversation, conversation[1:], conversation[-1:]):
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert ours.apply_chat_template(messages) == expected
    if style == "mistral":
        with pytest.raises(GenerationError, match="alternate"):
            ours.apply_chat_template(conversation[1:2] * 2)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_to_transformers_builds_the_familys_own_class(family, tmp_path, generator):
    """The packed model as its transformers class (QLinear over the packed QWeights) computes what the
    streaming runtime computes: both are the same quantized model."""
    _, folder = build(family, generator, tmp_path)
    quantlite.convert(folder, tmp_path / "packed", progress=False)
    rebuilt = quantlite.to_transformers(tmp_path / "packed")
    assert type(rebuilt).__name__ == FAMILIES[family].architecture
    input_ids = torch.randint(0, BASE["vocab_size"], (2, 3 * WINDOW), generator=generator)
    with quantlite.load(tmp_path / "packed") as model, torch.no_grad():
        assert relative_error(model(input_ids), rebuilt(input_ids).logits) <= 1e-3
