"""`quantlite convert`, `inspect` and `verify` as a user runs them (quantlite.cli.main, in-process)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from quantlite.cli import main
from quantlite.packed import MANIFEST, layer_file
from quantlite.sources.synthetic import write_random_llama


@pytest.fixture
def converted(tmp_path, generator, capsys) -> Path:
    src = write_random_llama(tmp_path / "hf", dtype=torch.float16, generator=generator)
    assert main(["convert", str(src), str(tmp_path / "out"), "--method", "nf4", "--block-size", "32", "--quiet"]) == 0
    return tmp_path / "out"


def test_convert_prints_a_summary(converted, capsys):
    out = capsys.readouterr().out
    for expected in ("M params/s", "bits/weight", "of fp16", "SQNR", "mlp.down_proj", "outliers"):
        assert expected in out, expected
    manifest = json.loads((converted / MANIFEST).read_text())
    assert manifest["quantization"]["method"] == "nf4" and manifest["quantization"]["block_size"] == 32


def test_convert_refuses_an_existing_model_with_exit_2(converted, capsys, tmp_path):
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "hf"), str(converted), "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_inspect_table_and_json(converted, capsys):
    capsys.readouterr()
    assert main(["inspect", str(converted)]) == 0
    table = capsys.readouterr().out
    assert "layer-00001.safetensors" in table and "hidden_size=96" in table and "bits/w" in table
    assert main(["inspect", str(converted), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["num_hidden_layers"] == 2
    layer = report["files"][layer_file(0)]
    assert layer["bytes"] == (converted / layer_file(0)).stat().st_size
    assert layer["quantized"] == 82_176 and 4.0 < 8 * layer["bytes"] / layer["quantized"] < 6.5
    assert report["totals"]["fp16_bytes"] == 2 * report["totals"]["params"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "manifest"])
def test_verify_exits_non_zero_naming_the_file(converted, capsys, damage):
    assert main(["verify", str(converted), "--quiet"]) == 0
    target = converted / layer_file(1)
    if damage == "flip":
        raw = bytearray(target.read_bytes())
        raw[-3] ^= 0x10
        target.write_bytes(bytes(raw))
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "delete":
        target.unlink()
    else:
        manifest = json.loads((converted / MANIFEST).read_text())
        manifest["files"][layer_file(1)]["sha256"] = "0" * 64
        (converted / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["verify", str(converted), "--quiet"]) == 1
    assert layer_file(1) in capsys.readouterr().err


def test_verify_of_something_that_is_not_a_model_exits_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no quantlite.json" in capsys.readouterr().err


def test_help_teaches_with_examples(capsys):
    for command in ("convert", "inspect", "verify"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "examples:" in capsys.readouterr().out


def test_inspect_of_a_manifest_without_statistics_is_a_clean_error(converted, capsys):
    manifest = json.loads((converted / MANIFEST).read_text())
    del manifest["totals"]
    (converted / MANIFEST).write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["inspect", str(converted)]) == 2
    assert "lacks the statistics" in capsys.readouterr().err


def test_convert_and_demo_help_name_the_calibration_modes(capsys):
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    out = capsys.readouterr().out
    assert "--calibration none" in out and "random|none|TEXT_FILE|self" in out
    assert "Default: random when SRC has a tokenizer.json" in " ".join(out.split())
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "{random,self,none}" in out and "random token ids" in out


def test_demo_refuses_an_unknown_calibration(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--calibration", "text.txt"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err



def test_random_calibration_without_a_tokenizer_is_a_one_line_error(tmp_path, generator, capsys):
    src = write_random_llama(tmp_path / "hf", dtype=torch.float16, generator=generator)  # no tokenizer.json
    assert main(["convert", str(src), str(tmp_path / "out"), "--calibration", "random", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--calibration random needs the model's tokenizer" in err and "Traceback" not in err
    assert not (tmp_path / "out" / MANIFEST).exists()


def test_the_default_calibrates_on_random_tokens(stories260k_hf, tmp_path, capsys):
    """No flags, a source with a tokenizer: random-token calibration, recorded in the manifest, no note."""
    assert main(["convert", str(stories260k_hf), str(tmp_path / "out"), "--quiet"]) == 0
    assert "note:" not in capsys.readouterr().err
    quantization = json.loads((tmp_path / "out" / MANIFEST).read_text())["quantization"]
    assert quantization["calibration"]["file"] == "random" and quantization["calibration"]["windows"] == 4
    assert quantization["attention_block_size"] == 32


@pytest.mark.parametrize("flags", [[], ["--calibration", "none"]])
def test_without_a_tokenizer_the_default_is_data_free_and_says_so(tmp_path, generator, capsys, flags):
    src = write_random_llama(tmp_path / "hf", dtype=torch.float16, generator=generator)  # no tokenizer.json
    assert main(["convert", str(src), str(tmp_path / "out"), "--quiet", *flags]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ([] if flags else [
        "note: hf has no usable tokenizer.json to draw random calibration tokens from, so this conversion is data-free "
        "(as --calibration none); give --calibration TEXT_FILE to calibrate it"])
    assert json.loads((tmp_path / "out" / MANIFEST).read_text())["quantization"]["calibration"] is None


def test_a_missing_calibration_file_names_the_choices(tmp_path, generator, capsys):
    src = write_random_llama(tmp_path / "hf", dtype=torch.float16, generator=generator)
    assert main(["convert", str(src), str(tmp_path / "out"), "--calibration", "nome", "--quiet"]) == 2
    assert "calibration text nome is not a readable file (or give random, self or none)" in capsys.readouterr().err
