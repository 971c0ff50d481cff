"""convert(): what lands in the packed directory, options, refusals, resume, disk space, workers.

Every checkpoint here is a tiny random Llama (quantlite.sources.synthetic) with odd sizes: hidden 96 and
intermediate 200 are not multiples of the block size, so padding is exercised in every layer.
"""
from __future__ import annotations

import errno
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from quantlite.converter import MAX_CHUNK_WEIGHTS, PARTIAL_STATE, Settings, convert, quantize_in_row_chunks
from quantlite.errors import ConversionError, FormatError
from quantlite.packed import MANIFEST, PackedModel
from quantlite.q8weight import Q8Weight, quantize_int8
from quantlite.qweight import QWeight
from quantlite.quantizer import quantize
from quantlite.sources.hf import HFCheckpoint
from quantlite.model_config import LINEAR_WEIGHTS
from quantlite.sources.synthetic import TINY_CONFIG, write_random_llama

# Relative Frobenius error of 4-bit NF4 on Gaussian weights is about 0.09-0.11 (SQNR ~20 dB,
# measured on these tiny models); 0.2 fails for a broken scale, code or nibble order (errors ~1).
MAX_RELATIVE_ERROR = 0.2


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def checkpoint(tmp_path, generator) -> Path:
    return write_random_llama(tmp_path / "hf", dtype=torch.bfloat16, generator=generator, max_shard_bytes=60_000)


@pytest.mark.parametrize("dtype, method", [
    (torch.float32, "quantlite"), (torch.float16, "nf4"), (torch.bfloat16, "rtn"), (torch.bfloat16, "quantlite"),
])
def test_linear_weights_are_exactly_what_quantize_gives(tmp_path, generator, dtype, method):
    src = write_random_llama(tmp_path / "hf", dtype=dtype, generator=generator)
    convert(src, tmp_path / "out", method=method, block_size=32, progress=False)
    model, source = PackedModel.open(tmp_path / "out"), HFCheckpoint(src)
    float_dtype = torch.bfloat16 if dtype == torch.float32 else dtype
    assert model.num_layers == TINY_CONFIG["num_hidden_layers"] and model.config == source.config
    for layer in range(model.num_layers):
        tensors = model.load_layer(layer)
        for name, value in tensors.items():
            original = source.read(f"model.layers.{layer}.{name}")
            if name in LINEAR_WEIGHTS:
                expected = quantize(original, method=method, block_size=32)
                for field, tensor in expected.to_dict().items():
                    assert torch.equal(value.to_dict()[field], tensor), (layer, name, field)
                reference = original.to(torch.float64)
                error = (value.dequantize(torch.float64) - reference).norm() / reference.norm()
                assert error < MAX_RELATIVE_ERROR, (layer, name, float(error))
            else:  # 16-bit floats as they are, float32 rounded to bfloat16
                assert value.dtype == float_dtype and torch.equal(value, original.to(float_dtype)), (layer, name)
    final = model.load_final()
    for name, value in (("model.embed_tokens.weight", model.load_embedding()), ("lm_head.weight", final["lm_head.weight"])):
        expected = quantize_int8(source.read(name), block_size=32)  # the default width of both: q8
        assert isinstance(value, Q8Weight) and all(torch.equal(value.to_dict()[f], t) for f, t in expected.to_dict().items())
    assert torch.equal(final["model.norm.weight"], source.read("model.norm.weight").to(float_dtype))


@pytest.mark.parametrize("method, attention_block_size, expected", [
    ("quantlite", None, 32), ("quantlite", 64, 64), ("quantlite", 48, 48), ("nf4", None, 64),
])
def test_attention_projections_take_their_own_block_size(tmp_path, checkpoint, method, attention_block_size, expected):
    convert(checkpoint, tmp_path / "out", method=method, attention_block_size=attention_block_size, progress=False)
    model, source = PackedModel.open(tmp_path / "out"), HFCheckpoint(checkpoint)
    assert model.manifest["quantization"]["attention_block_size"] == expected
    for name, value in model.load_layer(0).items():
        if name in LINEAR_WEIGHTS:
            block_size = expected if name.startswith("self_attn.") else 64
            assert value.block_size == block_size, name
            reference = quantize(source.read(f"model.layers.0.{name}"), method=method, block_size=block_size)
            assert all(torch.equal(value.to_dict()[field], tensor) for field, tensor in reference.to_dict().items()), name


def test_a_block_size_the_user_chose_holds_for_the_attention_projections_too():
    from quantlite.cli import convert as convert_cli
    from quantlite.converter import DEFAULT_BLOCK_SIZE, _check_settings
    from quantlite.quantizer import METHODS

    for block_size in (48, 128):
        settings = _check_settings("quantlite", block_size, None, None, "q8", "q8", None, False, 1)
        assert settings.block_size_for("model.layers.0.self_attn.q_proj.weight") == block_size
    assert convert_cli.DEFAULT_BLOCK_SIZE == DEFAULT_BLOCK_SIZE and convert_cli.METHOD_NAMES == tuple(METHODS)


def test_calibrated_conversions_keep_one_block_size(tmp_path, checkpoint):
    from quantlite.converter import _check_settings

    settings = _check_settings("quantlite", 64, None, None, "q8", "q8", None, False, 1, calibrated=True)
    assert settings.block_size_for("model.layers.0.self_attn.q_proj.weight") == 64
    settings = _check_settings("quantlite", 64, None, None, "q8", "q8", None, False, 1, 32, calibrated=True)
    assert settings.block_size_for("model.layers.0.self_attn.q_proj.weight") == 32  # asked for
    assert settings.block_size_for("model.layers.0.mlp.up_proj.weight") == 64


def test_no_quantize_keeps_every_original_tensor(tmp_path, checkpoint):
    convert(checkpoint, tmp_path / "out", no_quantize=True, progress=False)
    model, source = PackedModel.open(tmp_path / "out"), HFCheckpoint(checkpoint)
    seen = 0
    for layer in range(model.num_layers):
        for name, tensor in model.load_layer(layer).items():
            original = source.read(f"model.layers.{layer}.{name}")
            assert isinstance(tensor, torch.Tensor) and tensor.dtype == original.dtype and torch.equal(tensor, original)
            seen += 1
    assert seen == model.num_layers * 9
    assert model.manifest["totals"]["quantized_params"] == 0 and model.manifest["quantization"]["method"] is None


def test_embedding_and_lm_head_take_the_width_asked_for(tmp_path, checkpoint):
    convert(checkpoint, tmp_path / "out", embedding="q8", head="q4", outlier_frac=0.01, progress=False)
    model = PackedModel.open(tmp_path / "out")
    embedding, head = model.load_embedding(), model.load_final()["lm_head.weight"]
    assert isinstance(embedding, Q8Weight) and isinstance(head, QWeight)
    assert head.n_outliers == round(0.01 * head.shape[0] * head.shape[1])
    stats = model.manifest["tensors"]["lm_head.weight"]
    assert stats["stored"] == "qweight" and stats["outliers"] == head.n_outliers and stats["sqnr_db"] > 10
    stats = model.manifest["tensors"]["model.embed_tokens.weight"]
    assert stats["stored"] == "q8weight" and stats["bytes"] == embedding.nbytes and stats["sqnr_db"] > 35  # int8: ~40 dB
    assert model.manifest["quantization"].items() >= {"embedding": "q8", "head": "q4", "float_dtype": None}.items()

    convert(checkpoint, tmp_path / "float", embedding="float", head="float", float_dtype="float32", progress=False)
    model, source = PackedModel.open(tmp_path / "float"), HFCheckpoint(checkpoint)
    embedding, final = model.load_embedding(), model.load_final()
    assert embedding.dtype == torch.float32 and torch.equal(embedding, source.read("model.embed_tokens.weight").float())
    assert final["model.norm.weight"].dtype == torch.float32


def test_tied_model_has_no_lm_head_and_one_width_for_the_shared_matrix(tmp_path, generator):
    src = write_random_llama(tmp_path / "hf", {**TINY_CONFIG, "tie_word_embeddings": True}, generator=generator)
    convert(src, tmp_path / "out", progress=False)
    model = PackedModel.open(tmp_path / "out")
    assert set(model.load_final()) == {"model.norm.weight"} and isinstance(model.load_embedding(), Q8Weight)
    with pytest.raises(ConversionError, match="ties lm_head to the embedding.*got head q4, embedding q8"):
        convert(src, tmp_path / "out2", head="q4", progress=False)


def test_refuses_what_is_not_a_llama_checkpoint(tmp_path, generator):
    src = write_random_llama(tmp_path / "hf", generator=generator)
    config = json.loads((src / "config.json").read_text())

    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConversionError, match="not a Llama-family model"):
        convert(src, tmp_path / "out", progress=False)

    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 208}))
    with pytest.raises(ConversionError, match="gate_proj.weight' has shape"):
        convert(src, tmp_path / "out", progress=False)

    (src / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match="missing tensors model.layers.2"):
        convert(src, tmp_path / "out", progress=False)

    (src / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match="not readable JSON"):
        convert(src, tmp_path / "out", progress=False)

    (src / "config.json").unlink()
    with pytest.raises(ConversionError, match="config.json: missing"):
        convert(src, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "nowhere", tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_missing_or_lying_weight_files_are_refused(tmp_path, generator):
    src = write_random_llama(tmp_path / "hf", generator=generator, max_shard_bytes=60_000)
    shards = sorted(src.glob("model-*.safetensors"))
    shards[-1].write_bytes(shards[-1].read_bytes()[:-10])  # truncated: the header now lies
    with pytest.raises(ConversionError, match="unreadable checkpoint file"):
        convert(src, tmp_path / "out", progress=False)
    shards[-1].unlink()
    with pytest.raises(ConversionError, match="missing"):
        convert(src, tmp_path / "out", progress=False)


class _Trap:
    """Unpickling this would create a file: proof that the converter never unpickles."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_checkpoints_are_refused_without_unpickling(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    marker = tmp_path / "unpickled"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap(str(marker))))
    with pytest.raises(ConversionError, match="safetensors"):
        convert(folder, tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="never"):
        convert(folder / "pytorch_model.bin", tmp_path / "out", progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("options, message", [
    ({"method": "gptq"}, "unknown method"),
    ({"block_size": 48 + 1}, "block_size 49"),
    ({"block_size": 512}, "block_size 512"),
    ({"attention_block_size": 40}, "block_size 40"),
    ({"outlier_frac": 0.5}, "outlier_frac 0.5"),
    ({"max_bits_per_weight": -1.0}, "max bits per weight"),
    ({"workers": 0}, "workers"),
    ({"head": "q2"}, "head width 'q2' is not one of q8, q4, float"),
    ({"embedding": True}, "embedding width"),
    ({"float_dtype": "float64"}, "float dtype 'float64'"),
])
def test_bad_options_are_refused_before_anything_is_written(tmp_path, checkpoint, options, message):
    with pytest.raises(ConversionError, match=message):
        convert(checkpoint, tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


def test_the_default_outlier_fraction_comes_with_its_bit_budget(tmp_path, checkpoint):
    convert(checkpoint, tmp_path / "default", progress=False)
    convert(checkpoint, tmp_path / "explicit", outlier_frac=0.01, progress=False)
    default, explicit = (PackedModel.open(tmp_path / name).manifest for name in ("default", "explicit"))
    assert default["quantization"]["max_bits_per_weight"] == 4.5 and default["quantization"]["outlier_frac"] == 0.01
    assert explicit["quantization"]["max_bits_per_weight"] is None
    for name, entry in default["tensors"].items():
        if entry["stored"] == "qweight":  # outliers only where they fit the budget
            assert entry["outliers"] <= explicit["tensors"][name]["outliers"]
            assert entry["bits_per_weight"] <= 4.5 or entry["outliers"] == 0, name


def test_complete_output_is_not_overwritten_without_overwrite(tmp_path, checkpoint):
    convert(checkpoint, tmp_path / "out", method="rtn", progress=False)
    before = files_of(tmp_path / "out")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert(checkpoint, tmp_path / "out", method="nf4", progress=False)
    assert files_of(tmp_path / "out") == before
    convert(checkpoint, tmp_path / "out", method="nf4", overwrite=True, progress=False)
    assert PackedModel.open(tmp_path / "out").manifest["quantization"]["method"] == "nf4"

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ConversionError, match="did not write"):
        convert(checkpoint, foreign, overwrite=True, progress=False)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_interrupted_conversion_resumes_to_identical_bytes(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    convert(checkpoint, tmp_path / "straight", progress=False)

    import quantlite.converter as convert_module

    real_write_shard, calls = convert_module.write_shard, []

    def interrupted(*args, **kwargs):
        calls.append(args[3])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_write_shard(*args, **kwargs)

    monkeypatch.setattr(convert_module, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(convert_module, "write_shard", real_write_shard)
    assert not (tmp_path / "resumed" / MANIFEST).exists()
    with pytest.raises(FormatError, match="interrupted conversion"):
        PackedModel.open(tmp_path / "resumed")

    summary = convert(checkpoint, tmp_path / "resumed", progress=False)
    assert summary.files_resumed == 3  # tokenizer + the two shards written before the interruption
    assert files_of(tmp_path / "resumed") == files_of(tmp_path / "straight")
    assert not (tmp_path / "resumed" / PARTIAL_STATE).exists()


def test_changed_source_is_not_mixed_into_an_interrupted_conversion(tmp_path, checkpoint, monkeypatch):
    import quantlite.converter as convert_module

    monkeypatch.setattr(convert_module, "write_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        convert(checkpoint, tmp_path / "out", progress=False)
    monkeypatch.undo()
    with pytest.raises(ConversionError, match="interrupted conversion of another source or with other settings"):
        convert(checkpoint, tmp_path / "out", method="rtn", progress=False)
    convert(checkpoint, tmp_path / "out", method="rtn", overwrite=True, progress=False)
    assert PackedModel.open(tmp_path / "out").verify() == []


def test_disk_space_is_checked_up_front(tmp_path, checkpoint, monkeypatch):
    import quantlite.converter as convert_module

    real = shutil.disk_usage
    monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(ConversionError, match=r"needs about \d+ MiB, only 1 MiB are free"):
        convert(checkpoint, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_running_out_of_disk_leaves_nothing_that_looks_complete(tmp_path, checkpoint, monkeypatch):
    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def disk_full(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(ConversionError, match="No space left on device"):
        convert(checkpoint, tmp_path / "out", progress=False)
    left = {p.name for p in (tmp_path / "out").iterdir()}
    assert MANIFEST not in left and not any(name.endswith(".partial") for name in left)
    with pytest.raises(FormatError):
        PackedModel.open(tmp_path / "out")
    monkeypatch.undo()
    assert convert(checkpoint, tmp_path / "out", progress=False).files_resumed == 2


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    convert(checkpoint, tmp_path / "one", method="nf4", progress=False)
    convert(checkpoint, tmp_path / "two", method="nf4", workers=2, progress=False)
    assert files_of(tmp_path / "one") == files_of(tmp_path / "two")


@pytest.mark.parametrize("method, outlier_frac", [("nf4", None), ("rtn", None), ("quantlite", 0.0)])
def test_row_chunks_are_bit_identical_without_outliers(monkeypatch, generator, method, outlier_frac):
    import quantlite.converter as convert_module

    # 77 x 200 with block 32: 7 blocks per row, so a chunk must be a multiple of 256 rows to keep
    # double-quantization groups whole; with 2**10 weights per chunk the floor (256 rows) applies,
    # and a 600-row matrix splits into 256 + 256 + 88.
    w = 0.02 * torch.randn(600, 200, generator=generator)
    monkeypatch.setattr(convert_module, "MAX_CHUNK_WEIGHTS", 1 << 10)
    settings = Settings(method, 32, 0.0 if outlier_frac is None else outlier_frac, None, "q8", "q8", None, False)
    chunked, sqnr = quantize_in_row_chunks(w, settings, "w")
    whole = quantize(w, method=method, block_size=32, outlier_frac=settings.outlier_frac)
    for field, tensor in whole.to_dict().items():
        assert torch.equal(chunked.to_dict()[field], tensor), field
    assert 15 < sqnr < 30  # 4-bit on Gaussian weights: ~20 dB


def test_row_chunks_with_outliers_keep_a_valid_csr(monkeypatch, generator):
    import quantlite.converter as convert_module

    w = 0.02 * torch.randn(600, 130, generator=generator)
    w[::13, ::29] = 1.0  # 100, 100 and 35 per chunk: fewer than each chunk's 333, 333 and 114 outliers
    monkeypatch.setattr(convert_module, "MAX_CHUNK_WEIGHTS", 1 << 10)
    chunked, _ = quantize_in_row_chunks(w, Settings("quantlite", 64, 0.01, None, "q8", "q8", None, False), "w")
    rebuilt = QWeight.from_dict(chunked.to_dict())  # the reader's CSR checks
    assert rebuilt.n_outliers == sum(round(0.01 * rows * 130) for rows in (256, 256, 88))
    assert bool((rebuilt.dequantize()[::13, ::29] == 1.0).all())  # the largest weights are outliers, kept exactly
    assert MAX_CHUNK_WEIGHTS >= 1 << 20  # the real chunk is large: real tensors rarely split


def test_tokenizer_files_are_copied_with_the_chat_template_folded_in(tmp_path, checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"version": "1.0"}')
    (checkpoint / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
    (checkpoint / "chat_template.jinja").write_text("{{ messages }}")
    convert(checkpoint, tmp_path / "out", progress=False)
    model = PackedModel.open(tmp_path / "out")
    assert (model.tokenizer_dir / "tokenizer.json").read_text() == '{"version": "1.0"}'
    config = json.loads((model.tokenizer_dir / "tokenizer_config.json").read_text())
    assert config == {"bos_token": "<s>", "eos_token": "</s>", "chat_template": "{{ messages }}"}
    assert "tokenizer/tokenizer.json" in model.manifest["files"] and model.verify() == []


def test_index_and_dtypes_that_disagree_with_the_files_are_refused(tmp_path, generator):
    from safetensors.torch import load_file, save_file

    src = write_random_llama(tmp_path / "hf", generator=generator, max_shard_bytes=60_000)
    index_path = src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = list(index["weight_map"].values())
    first = next(f for f in files if files.count(f) >= 2)  # stays in the index after one tensor moves
    second = next(f for f in files if f != first)
    moved = next(name for name, file in index["weight_map"].items() if file == first)
    index_path.write_text(json.dumps({"weight_map": {**index["weight_map"], moved: second}}))
    with pytest.raises(ConversionError, match=f"places '{moved}' in {second}, but it is in {first}"):
        convert(src, tmp_path / "out", progress=False)
    index_path.write_text(json.dumps(index))

    shard = src / first
    tensors = load_file(str(shard))
    tensors[moved] = tensors[moved].to(torch.int8)
    save_file(tensors, str(shard))
    with pytest.raises(ConversionError, match="int8; expected float32, float16 or bfloat16"):
        convert(src, tmp_path / "out", progress=False)
