"""PackedModel: the reader's contract with the runtime, and what it refuses (docs/FORMAT.md)."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from quantlite.converter import convert
from quantlite.errors import FormatError
from quantlite.packed import EMBEDDING_FILE, FINAL_FILE, MANIFEST, PackedModel, layer_file
from quantlite.qweight import QWeight
from quantlite.sources.synthetic import TINY_CONFIG, write_random_llama


@pytest.fixture(scope="module")
def packed_once(tmp_path_factory) -> Path:
    """One conversion per module (fresh random weights each run); tests work on copies."""
    folder = tmp_path_factory.mktemp("packed")
    seed = int(torch.randint(0, 2**31, ()).item())
    print(f"packed_once seed {seed}")
    src = write_random_llama(folder / "hf", generator=torch.Generator().manual_seed(seed))
    convert(src, folder / "out", method="rtn", progress=False)
    return folder / "out"


@pytest.fixture
def packed(packed_once, tmp_path) -> Path:
    return Path(shutil.copytree(packed_once, tmp_path / "out"))


def rewrite_manifest(folder: Path, change) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    change(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest))


def rewrite_header(path: Path, change) -> None:
    """Edit a safetensors header in place, keeping the data section as it is."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length:])


def test_contract(packed):
    model = PackedModel.open(packed)
    assert model.path == packed and model.num_layers == TINY_CONFIG["num_hidden_layers"]
    assert model.config == {**TINY_CONFIG, "torch_dtype": "float32"}
    assert model.manifest["format"] == "quantlite.packed"
    layer = model.load_layer(1)
    assert set(layer) == {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                          "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                          "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}
    assert isinstance(layer["self_attn.k_proj.weight"], QWeight)
    assert layer["self_attn.k_proj.weight"].shape == (2 * 16, 96)  # kv_heads * head_dim, hidden
    assert layer["input_layernorm.weight"].dtype == torch.bfloat16  # a float32 source's floats, in 16 bits
    assert model.layer_nbytes(1) == (packed / layer_file(1)).stat().st_size
    assert model.load_embedding().shape == (300, 96)
    assert set(model.load_final()) == {"model.norm.weight", "lm_head.weight"}
    assert model.tokenizer_dir == packed / "tokenizer"
    with pytest.raises(FormatError, match="layer 2 does not exist"):
        model.load_layer(2)


def test_missing_manifest_says_the_folder_is_incomplete(packed, tmp_path):
    (packed / MANIFEST).unlink()
    with pytest.raises(FormatError, match="interrupted conversion"):
        PackedModel.open(packed)
    with pytest.raises(FormatError, match="no quantlite.json"):
        PackedModel.open(tmp_path / "nowhere")


@pytest.mark.parametrize("bad_path", ["/etc/passwd", "../outside.safetensors", "tokenizer/../../x",
                                      "C:\\evil.safetensors", "notes.txt", "tokenizer/evil.py", "layer-7.safetensors"])
def test_manifest_paths_outside_the_format_are_refused(packed, bad_path):
    rewrite_manifest(packed, lambda m: m["files"].update({bad_path: {"sha256": "0" * 64, "size": 1}}))
    with pytest.raises(FormatError, match=r"manifest path .* (outside|not a file name)"):
        PackedModel.open(packed)


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(version=3), r"version 3 is not supported \(this reader knows 1, 2\)"),
    (lambda m: m.update(version=True), "version True is not supported"),
    (lambda m: m.update(format="gguf"), "format is 'gguf'"),
    (lambda m: m.update(files=[]), "'files' must be a JSON object"),
    (lambda m: m["files"][EMBEDDING_FILE].update(size=2**60), "absurd size"),
    (lambda m: m["files"][EMBEDDING_FILE].update(size=-1), "absurd size"),
    (lambda m: m["files"][EMBEDDING_FILE].update(sha256="xyz"), "sha256"),
    (lambda m: m["files"].pop(layer_file(1)), "does not list layer-00001"),
    (lambda m: m["config"].update(model_type="gpt2", architectures=[]), "not a Llama-family model"),
    (lambda m: m["config"].update(num_hidden_layers=10**9), "num_hidden_layers"),
])
def test_lying_manifests_are_refused(packed, change, message):
    rewrite_manifest(packed, change)
    with pytest.raises(FormatError, match=message):
        PackedModel.open(packed)


def test_a_version_1_directory_is_still_read(tmp_path, generator):
    """Version 2 only adds Q8Weights and 16-bit floats, so a version-1 directory (float head and
    embedding, float32 norms) is a valid version-2 one: converted so and relabelled, it reads."""
    src = write_random_llama(tmp_path / "hf", generator=generator)
    convert(src, tmp_path / "v1", embedding="float", head="float", float_dtype="float32", progress=False)
    rewrite_manifest(tmp_path / "v1", lambda m: m.update(version=1))
    model = PackedModel.open(tmp_path / "v1")
    assert model.load_embedding().dtype == torch.float32 and model.load_final()["lm_head.weight"].dtype == torch.float32
    assert model.verify() == []


def test_manifest_that_is_not_json_is_refused(packed):
    (packed / MANIFEST).write_bytes(b"\xff\xfe{")
    with pytest.raises(FormatError, match="not readable JSON"):
        PackedModel.open(packed)


def test_truncated_or_missing_shard_is_named(packed):
    model = PackedModel.open(packed)
    path = packed / layer_file(0)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FormatError, match="layer-00000.safetensors.*bytes, the manifest says"):
        model.load_layer(0)
    (packed / FINAL_FILE).unlink()
    with pytest.raises(FormatError, match="final.safetensors: missing"):
        model.load_final()


def test_header_lying_about_shape_is_refused(packed):
    model = PackedModel.open(packed)
    path = packed / layer_file(0)

    def swap_norm_shape(header):  # same byte count, different shape: only the config check can see it
        header["model.layers.0.input_layernorm.weight"]["shape"] = [8, 12]

    rewrite_header(path, swap_norm_shape)
    rewrite_manifest(packed, lambda m: m["files"][layer_file(0)].update(size=path.stat().st_size))
    with pytest.raises(FormatError, match=r"input_layernorm.weight has shape \[8, 12\], the config implies \[96\]"):
        PackedModel.open(packed).load_layer(0)


@pytest.mark.parametrize("change, message", [  # on the final norm: a plain tensor (the embedding is int8 now)
    (lambda h: h["model.norm.weight"].update(data_offsets=[0, 10**12]), "outside the"),
    (lambda h: h["model.norm.weight"].update(dtype="F8_E9M9"), "unknown dtype"),
    (lambda h: h["model.norm.weight"].update(shape=[95]), "needs .* bytes"),
    (lambda h: h["model.norm.weight"].update(shape=[-1]), "invalid shape"),
    (lambda h: h.update({"extra": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}}), "overlaps"),
])
def test_header_lying_about_offsets_is_refused(packed, change, message):
    path = packed / FINAL_FILE
    rewrite_header(path, change)
    rewrite_manifest(packed, lambda m: m["files"][FINAL_FILE].update(size=path.stat().st_size))
    with pytest.raises(FormatError, match=message):
        PackedModel.open(packed).load_final()


def test_absurd_header_length_is_refused_before_reading(packed):
    path = packed / EMBEDDING_FILE
    raw = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**62) + raw[8:])
    rewrite_manifest(packed, lambda m: m["files"][EMBEDDING_FILE].update(size=path.stat().st_size))
    with pytest.raises(FormatError, match="exceeds the"):
        PackedModel.open(packed).load_embedding()


def test_verify_names_each_damaged_file(packed):
    model = PackedModel.open(packed)
    assert model.verify() == []
    flipped = bytearray((packed / layer_file(1)).read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    (packed / layer_file(1)).write_bytes(bytes(flipped))
    (packed / FINAL_FILE).write_bytes((packed / FINAL_FILE).read_bytes()[:-1])
    (packed / layer_file(0)).unlink()
    (packed / "stray.bin").write_bytes(b"?")
    problems = model.verify()
    assert len(problems) == 4, problems
    assert any(p.startswith("layer-00001.safetensors: sha256 differs") for p in problems)
    assert any(p.startswith("final.safetensors:") and "bytes, the manifest says" in p for p in problems)
    assert "layer-00000.safetensors: missing" in problems
    assert "stray.bin: not listed in the manifest" in problems


def test_verify_checks_structure_when_checksums_agree(packed):
    """A file consistent with a (rewritten) manifest but not with the config is still caught."""
    path = packed / layer_file(0)
    rewrite_header(path, lambda h: h["model.layers.0.input_layernorm.weight"].update(shape=[4, 24]))
    from quantlite.sources.checksum import sha256_file

    rewrite_manifest(packed, lambda m: m["files"][layer_file(0)].update(size=path.stat().st_size, sha256=sha256_file(path)))
    problems = PackedModel.open(packed).verify()
    assert len(problems) == 1 and problems[0].startswith("layer-00000.safetensors:") and "shape [4, 24]" in problems[0]
