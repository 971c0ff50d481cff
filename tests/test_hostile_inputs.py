"""Hostile and broken inputs, families 2-6 of docs/reliability.md: nothing is followed outside a folder,
no code from a model folder runs, work is bounded by the input's real size, bad values are one-line
errors, and values that pass validation cannot break later. (Family 1, OUT's safety: test_hostile_output.py;
the no-traceback corpus: test_hostile_cli.py.)
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import struct
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantlite.cli import main as cli_main
from quantlite.converter import convert
from quantlite.errors import ConversionError, FormatError, QuantliteError
from quantlite.packed import MANIFEST, PackedModel
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize
from quantlite.runtime.generate import GenerationError, Tokenizer
from quantlite.sources import open_source
from quantlite.model_config import read_model_config
from quantlite.sources.synthetic import TINY_CONFIG, write_random_llama

REPO = Path(__file__).resolve().parents[1]
SMALL = {**TINY_CONFIG, "hidden_size": 64, "intermediate_size": 80, "num_hidden_layers": 1,
         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40}
WORDS = [f"w{i}" for i in range(38)]


@contextmanager
def no_hang(seconds: int = 60):
    """Fail instead of hanging the suite (a FIFO opened for reading blocks forever)."""
    def timeout(signum, frame):
        raise AssertionError(f"still running after {seconds} s: the input made quantlite hang")
    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_tokenizer(folder: Path, template: str = "{% for m in messages %}{{ m['content'] }} {% endfor %}") -> None:
    from tokenizers import Tokenizer as Fast, models, pre_tokenizers

    fast = Fast(models.WordLevel({w: i for i, w in enumerate(["<unk>", "</s>"] + WORDS)}, unk_token="<unk>"))
    fast.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    folder = write_random_llama(tmp_path_factory.mktemp("hostile") / "hf", SMALL)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def pristine(source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("packed") / "out"
    convert(source, out, method="nf4", progress=False)
    return out


@pytest.fixture
def packed(pristine, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(pristine, tmp_path / "out"))


def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


# ---------------------------------------------------------------- 2. nothing followed outside the folder
@pytest.mark.parametrize("target", ["layer-00000.safetensors", "tokenizer", MANIFEST, "tokenizer/tokenizer.json"])
def test_a_symlink_in_a_packed_folder_is_refused_by_open_verify_and_load(packed, tmp_path, target):
    outside = tmp_path / "outside"
    os.replace(packed / target, outside)
    (packed / target).symlink_to(outside)
    with pytest.raises(FormatError, match="symbolic link|no quantlite.json"):
        PackedModel.open(packed)
    assert cli_main(["verify", str(packed), "--quiet"]) != 0
    from quantlite.runtime.streaming import load

    with pytest.raises(FormatError):
        load(packed)


def test_a_fifo_in_place_of_a_shard_is_refused_before_it_is_opened(packed):
    (packed / "layer-00000.safetensors").unlink()
    os.mkfifo(packed / "layer-00000.safetensors")
    with no_hang(), pytest.raises(FormatError, match="not a regular file"):
        PackedModel.open(packed)
    (packed / "tokenizer" / "tokenizer.json").unlink()
    os.mkfifo(packed / "tokenizer" / "tokenizer.json")
    with no_hang(), pytest.raises(GenerationError, match="not a regular file"):
        Tokenizer(packed / "tokenizer")


def test_source_symlinks_must_stay_inside_the_folder(source, tmp_path):
    import shutil

    src = Path(shutil.copytree(source, tmp_path / "src"))
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    (src / "tokenizer.model").symlink_to(secret)
    with pytest.raises(ConversionError, match="outside"):
        convert(src, tmp_path / "out", progress=False)
    assert "private key" not in "".join(p.read_text(errors="ignore") for p in (tmp_path / "out").rglob("*") if p.is_file())
    (src / "tokenizer.model").unlink()
    (src / "tokenizer.model").symlink_to(src / "tokenizer.json")  # inside: its bytes are copied, not the link
    convert(src, tmp_path / "out", progress=False)
    copied = tmp_path / "out" / "tokenizer" / "tokenizer.model"
    assert not copied.is_symlink() and copied.read_bytes() == (src / "tokenizer.json").read_bytes()
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    with no_hang(), pytest.raises(ConversionError, match="not a regular file"):
        open_source(src)


# ---------------------------------------------------------------- 3. no code from a model folder
def test_trust_remote_code_is_never_anything_but_false():
    for path in (REPO / "quantlite").rglob("*.py"):
        text = path.read_text()
        assert re.findall(r"trust_remote_code\s*=\s*(\w+)", text) in ([], ["False"] * text.count("trust_remote_code=")), path
        for call in re.finditer(r"\.from_pretrained\(", text):
            statement = text[call.end():text.index(")\n", call.end())]
            if "'SRC'" not in statement:  # the advice string in sources/__init__.py
                assert "trust_remote_code=False" in statement, (path, statement)


@pytest.mark.slow
def test_ppl_never_runs_or_offers_to_run_a_folders_code(source, tmp_path):
    import shutil

    src = Path(shutil.copytree(source, tmp_path / "src"))
    marker = tmp_path / "pwned"
    (src / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.Model"}}))
    settings_ = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**settings_, "auto_map": {"AutoTokenizer": ["evil.Tok", None]}}))
    (tmp_path / "text.txt").write_text(" ".join(WORDS * 20))
    result = subprocess.run([sys.executable, "-m", "quantlite", "ppl", str(src), "--data", str(tmp_path / "text.txt"),
                             "--ctx", "16", "--max-windows", "1", "--json"], cwd=REPO, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=300)
    assert not marker.exists() and "Traceback" not in result.stderr and "[y/N]" not in result.stdout + result.stderr


# ---------------------------------------------------------------- 4. bounded work
def gguf_header(fields: bytes, n_fields: int, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_fields) + fields


def gguf_string(text: str) -> bytes:
    return struct.pack("<Q", len(text)) + text.encode()


def test_a_tiny_gguf_declaring_a_huge_array_is_refused_at_once(tmp_path):
    array = gguf_string("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2**40) + gguf_string("a") * 4
    data = gguf_header(array, 1)
    (tmp_path / "m.gguf").write_bytes(data + b"\0" * (113 - len(data)))
    assert (tmp_path / "m.gguf").stat().st_size == 113
    with no_hang(30), pytest.raises(ConversionError, match="cannot fit"):
        open_source(tmp_path / "m.gguf")


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(n_fields=st.integers(0, 2**64 - 1), n_tensors=st.integers(0, 2**64 - 1), body=st.binary(max_size=200),
       kind=st.sampled_from([0, 4, 8, 9, 12, 99]))
def test_gguf_headers_never_crash_or_hang(tmp_path, n_fields, n_tensors, body, kind):
    path = tmp_path / "h.gguf"
    path.write_bytes(gguf_header(gguf_string("general.architecture") + struct.pack("<I", kind) + body, n_fields, n_tensors))
    with no_hang(30):
        try:
            open_source(path)
        except QuantliteError:
            pass


@pytest.mark.parametrize("poison", ["1" * 5000, "[" * 100000 + "]" * 100000, '{"a":' * 200 + "1" + "}" * 200, "NaN"])
def test_json_past_the_digit_and_depth_limits_is_one_error(source, packed, tmp_path, poison):
    import shutil

    src = Path(shutil.copytree(source, tmp_path / "src"))
    (src / "config.json").write_text((src / "config.json").read_text()[:-1] + f', "poison": {poison}}}')
    with pytest.raises(ConversionError, match="not readable JSON|nested deeper"):
        convert(src, tmp_path / "a", progress=False)
    (src / "config.json").write_text(json.dumps(SMALL))
    (src / "tokenizer_config.json").write_text(f'{{"poison": {poison}}}')
    with pytest.raises(ConversionError, match="not readable JSON|nested deeper"):
        convert(src, tmp_path / "b", progress=False)
    (packed / MANIFEST).write_text((packed / MANIFEST).read_text()[:-2] + f', "poison": {poison}}}')
    with pytest.raises(FormatError, match="not readable JSON|nested deeper"):
        PackedModel.open(packed)


@pytest.mark.parametrize("template, message", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% for i in range(100000) %}{% for c in 'abcdefgh' * 1000 %}{{ c }}{% endfor %}{% endfor %}", "longer than|output longer"),
    ("{{ 'x' * 10 ** 9 }}", "repeated beyond|too large"),
    ("{{ 7 ** (10 ** 9) }}", "too large"),  # jinja2 reads 7 ** 10 ** 9 as (7 ** 10) ** 9
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ raise_exception('no system messages') }}", "no system messages"),
    ("{{ messages[0].__class__.__mro__[1].__subclasses__() }}", "SecurityError|UndefinedError|unsafe"),
    ("{% for %}", "TemplateSyntaxError"),
])
def test_hostile_chat_templates_end_in_one_error(tmp_path, template, message):
    write_tokenizer(tmp_path, template)
    with no_hang(60), pytest.raises(GenerationError, match=message):
        Tokenizer(tmp_path).apply_chat_template([{"role": "user", "content": "w1"}])


@pytest.mark.parametrize("content, message", [
    (b"", "not readable JSON"), (b"\xff\xfe", "not readable JSON"), (b"[1, 2]", "not a usable tokenizer"),
    (b"[" * 5000 + b"]" * 5000, "not readable JSON|nested deeper"),
])
def test_invalid_empty_or_too_deep_tokenizer_files_are_one_error(tmp_path, content, message):
    write_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_bytes(content)
    with pytest.raises(GenerationError, match=message):
        Tokenizer(tmp_path)


def test_a_shard_of_thousands_of_qweights_groups_every_one(packed, tmp_path):
    """group_tensors buckets by prefix (linear); each QWeight gets exactly its own fields."""
    from quantlite.packed import group_tensors

    weights = {f"w{i}": quantize(torch.randn(2, 32), method="nf4", block_size=32) for i in range(600)}
    flat = {name: tensor for key, qw in weights.items() for name, tensor in qw.to_dict(key + ".").items()}
    flat["plain.weight"] = torch.ones(3)
    grouped = group_tensors(flat, "test")
    assert set(grouped) == {*weights, "plain.weight"}
    for key, qw in weights.items():
        assert torch.equal(grouped[key].codes, qw.codes) and torch.equal(grouped[key].scales, qw.scales)


# ---------------------------------------------------------------- 5. values of the wrong type
CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 2**70), st.floats(allow_nan=True),
                          st.text(max_size=6), st.lists(st.integers(), max_size=2),
                          st.dictionaries(st.sampled_from(["rope_type", "factor", "type"]),
                                          st.one_of(st.text(max_size=6), st.floats(), st.integers()), max_size=2))


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(["rms_norm_eps", "rope_theta", "rope_scaling", "tie_word_embeddings", "attention_bias",
                            "max_position_embeddings", "hidden_act", "architectures", "partial_rotary_factor"]),
       value=CONFIG_VALUES)
def test_a_config_that_passes_validation_is_one_the_runtime_can_use(key, value):
    """Whatever the value: refused with our error, or accepted with every value the runtime reads
    usable, flags as real booleans ("false" is never read as True). The one description
    (quantlite.model_config) is what convert, the packed reader and the runtime all use."""
    config = {**SMALL, key: value}
    try:
        described = read_model_config(config, ConversionError)
    except ConversionError:
        return
    if key == "tie_word_embeddings":
        assert value in (None, True, False) and described.tie_word_embeddings is bool(value)
    assert math.isfinite(described.rms_norm_eps) and math.isfinite(described.rope_theta)


def test_a_string_flag_is_refused_not_read_as_true(source, tmp_path):
    import shutil

    src = Path(shutil.copytree(source, tmp_path / "src"))
    (src / "config.json").write_text(json.dumps({**SMALL, "tie_word_embeddings": "false"}))
    with pytest.raises(ConversionError, match="tie_word_embeddings.*true or false"):
        convert(src, tmp_path / "out", progress=False)


def test_a_non_utf8_chat_template_is_one_error(source, tmp_path):
    import shutil

    src = Path(shutil.copytree(source, tmp_path / "src"))
    (src / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe")
    with pytest.raises(ConversionError, match="not UTF-8"):
        convert(src, tmp_path / "out", progress=False)


# ---------------------------------------------------------------- 6. values that pass and break later
def test_double_quantized_scales_that_decode_to_inf_are_refused():
    qw = quantize(torch.randn(8, 64), method="quantlite", block_size=64)
    assert qw.double_quant
    fields = qw.to_dict()
    fields["scale_group_min"] = torch.full_like(fields["scale_group_min"], 3e38)
    fields["scale_group_step"] = torch.full_like(fields["scale_group_step"], 3e36)
    assert torch.isfinite(fields["scale_group_min"]).all() and torch.isfinite(fields["scale_group_step"]).all()
    with pytest.raises(FormatError, match="decode to Inf"):
        QWeight.from_dict(fields)


def test_a_hand_built_qweight_smaller_than_its_shape_never_reaches_the_kernel():
    from dataclasses import replace

    from quantlite.kernels.dispatch import qmatmul
    from quantlite.q8weight import quantize_int8

    qw = quantize(torch.randn(64, 128), method="nf4", block_size=64)
    with pytest.raises(FormatError, match="codes is"):
        replace(qw, codes=qw.codes[:1])
    with pytest.raises(FormatError, match="scales is"):
        replace(qw, scales=qw.scales[:, :1])
    x = torch.randn(3, 128)
    reference = x.double() @ qw.dequantize(torch.float64).T  # the intact weight still multiplies right
    # float32 sums of 128 products of O(1) terms: error ~ 128 * 2**-24 * |terms|, far below 1e-3
    assert torch.allclose(qmatmul(x, qw).double(), reference, rtol=1e-3, atol=1e-3)

    # the same for the int8 weight of the head and embedding
    q8 = quantize_int8(torch.randn(64, 128))
    with pytest.raises(FormatError, match="qs is"):
        replace(q8, qs=q8.qs[:1])
    with pytest.raises(FormatError, match="scales is"):
        replace(q8, scales=q8.scales.float())
    with pytest.raises(FormatError, match="shape"):
        replace(q8, shape=(64, -1))
    reference = x.double() @ q8.dequantize(torch.float64).T
    assert torch.allclose(qmatmul(x, q8).double(), reference, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_norm_is_refused_by_convert_reader_and_verify(source, packed, tmp_path, bad):
    import shutil

    from safetensors.torch import load_file, save_file

    src = Path(shutil.copytree(source, tmp_path / "src"))
    tensors = load_file(str(src / "model.safetensors"))
    tensors["model.norm.weight"][3] = bad
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(ConversionError, match="NaN or Inf"):
        convert(src, tmp_path / "new", progress=False)

    final = load_file(str(packed / "final.safetensors"))
    final["model.norm.weight"][0] = bad
    save_file(final, str(packed / "final.safetensors"), metadata={"format": "pt"})
    data = (packed / "final.safetensors").read_bytes()
    rewrite_manifest(packed, lambda m: m["files"]["final.safetensors"].update(
        size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    model = PackedModel.open(packed)
    with pytest.raises(FormatError, match="NaN or Inf"):
        model.load_final()
    assert any("NaN or Inf" in problem for problem in model.verify())


def test_inspect_escapes_control_characters_from_the_manifest(packed, capsys):
    rewrite_manifest(packed, lambda m: m["provenance"].update(source="\x1b]0;owned\x07\x1b[2J", source_kind="\x1b[31mhf"))
    assert cli_main(["inspect", str(packed)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;owned" in out


def write_tiny_gguf(path: Path, odd_tensor: str | None = None) -> None:
    """A 1-layer Llama GGUF (float32 tensors); `odd_tensor` is stored as int32 instead."""
    import gguf
    import numpy as np

    from quantlite.sources.gguf_file import GGUF_LAYER_NAMES, GGUF_NAMES
    from quantlite.model_config import all_shapes

    dims = read_model_config(SMALL, ValueError)
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in [("context_length", 256), ("block_count", 1), ("feed_forward_length", dims.intermediate_size),
                       ("embedding_length", dims.hidden_size), ("attention.head_count", dims.num_heads),
                       ("attention.head_count_kv", dims.num_kv_heads), ("vocab_size", dims.vocab_size)]:
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    to_gguf = {hf: name for name, hf in GGUF_NAMES.items()} | {
        f"model.layers.0.{hf}": f"blk.0.{name}" for name, hf in GGUF_LAYER_NAMES.items()}
    for name, shape in all_shapes(dims).items():
        array = np.zeros(shape, dtype=np.int32 if to_gguf[name] == odd_tensor else np.float32)
        writer.add_tensor(to_gguf[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_an_unreadable_gguf_tensor_type_is_refused_before_anything_is_written(tmp_path):
    write_tiny_gguf(tmp_path / "ok.gguf")
    assert open_source(tmp_path / "ok.gguf").shapes  # the writer above makes a valid file
    write_tiny_gguf(tmp_path / "odd.gguf", odd_tensor="blk.0.ffn_down.weight")
    with pytest.raises(ConversionError, match="blk.0.ffn_down.weight.*I32"):
        convert(tmp_path / "odd.gguf", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
