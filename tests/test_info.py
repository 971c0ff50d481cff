"""`quantlite info`: versions, machine, and every kernel back-end with its reason when dead."""
from __future__ import annotations

import argparse
import json

import torch

from quantlite.cli import info
from quantlite.kernels.dispatch import BACKENDS, available_backends


def run_info(argv: list[str], capsys) -> str:
    parser = argparse.ArgumentParser()
    info.configure(parser)
    assert info.run(parser.parse_args(argv)) == 0
    return capsys.readouterr().out


def test_table_names_versions_and_each_backend(capsys):
    out = run_info([], capsys)
    for expected in ("python", "torch", "triton", "transformers", "torch CUDA", "nvcc", torch.__version__):
        assert expected in out
    status = available_backends()
    backend_lines = out.split("kernel back-ends\n", 1)[1].split("qmatmul's choice")[0].splitlines()
    assert len(backend_lines) == len(BACKENDS)
    for name, line in zip(BACKENDS, backend_lines):
        assert line.split(None, 1)[0] == name
        assert line.split(None, 1)[1] == ("live" if status[name] is None else "not available: " + status[name])


def test_json_is_the_same_report(capsys):
    report = json.loads(run_info(["--json"], capsys))
    assert report["backends"] == available_backends()
    assert report["default_backend"]["cpu"] == ("cpu" if available_backends()["cpu"] is None else "torch")
    assert report["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert report["machine"]["gpu"] == ("none visible" if not torch.cuda.is_available() else report["machine"]["gpu"])


def test_registered_in_the_command_line():
    from quantlite.cli import COMMANDS

    assert COMMANDS["info"] == "quantlite.cli.info"
    assert "live" in info.__doc__ and "Examples" in info.__doc__
