"""The layer pipeline and parallel conversion over torch.distributed (quantlite/distributed/).

Launches use the real thing: torchrun (gloo over loopback) with 2 or 3 local ranks on tiny models,
each bounded by LAUNCH_SECONDS. The fault tests start the ranks by hand with the environment torchrun
gives its workers (RANK, WORLD_SIZE, MASTER_ADDR, ...), one process per "node": a local torchrun
would itself kill the other ranks when one fails, which is its own doing, not ours; on two machines
nothing does it for us.

The reference everywhere is the single-process runtime on the same packed directory: one
micro-batch runs the very same float32 operations, so the logits must be bit-identical; a call
cut into micro-batches changes the rows of each matmul, which may reorder a kernel's sums: bounded
by the issue's 1e-6 relative (the observed difference is ~2e-7, a few float32 roundings).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import quantlite
from quantlite.cli import main as cli_main
from quantlite.distributed.pipeline import StageCache
from quantlite.distributed.split import SplitError, split_by_bytes, split_by_count
from quantlite.eval.ppl import perplexity
from quantlite.packed import PackedModel
from quantlite.runtime.streaming import StreamingLlama
from test_generate import write_tokenizer
from test_llama_exact import BASE, build_checkpoint, module_generator

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed_worker.py"
LAYERS = 5
LAUNCH_SECONDS = 180  # a launch takes 10-20 s on the loaded 2-core machine (three interpreters importing torch)
MICRO_BATCH_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """(HF folder, packed directory) of one tiny 5-layer model with a tokenizer (plain NF4: fast)."""
    tmp_path = tmp_path_factory.mktemp("distributed")
    _, folder = build_checkpoint(tmp_path, module_generator(), num_hidden_layers=LAYERS)
    write_tokenizer(folder)
    quantlite.convert(folder, tmp_path / "packed", method="nf4", progress=False)
    return folder, tmp_path / "packed"


def child_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(ranks: int, *argv, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", *map(str, argv)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=LAUNCH_SECONDS, env=env or child_env(), cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(argvs: list[list]) -> list[subprocess.Popen]:
    """One process per rank, with the environment torchrun gives its workers (one rank per node)."""
    port = free_port()
    return [subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=REPO, env=child_env(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(len(argvs)),
                                                     LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
            for rank, argv in enumerate(argvs)]


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().max())


# ------------------------------------------------------------------------------ the split
def test_split_by_bytes_is_the_best_contiguous_split(generator):
    """Against every contiguous split (brute force), on random sizes with a heavy embedding and head."""
    from itertools import combinations

    for _ in range(20):
        layers = int(torch.randint(2, 9, (1,), generator=generator))
        ranks = int(torch.randint(1, layers + 1, (1,), generator=generator))
        sizes = torch.randint(1, 100, (layers,), generator=generator).tolist()
        first, last = (int(x) for x in torch.randint(0, 150, (2,), generator=generator))
        runs = split_by_bytes(sizes, ranks, first, last)

        def largest(cuts) -> int:
            bounds = [0, *cuts, layers]
            shares = [sum(sizes[a:b]) for a, b in zip(bounds, bounds[1:])]
            shares[0] += first
            shares[-1] += last
            return max(shares)

        best = min(largest(cuts) for cuts in combinations(range(1, layers), ranks - 1))
        assert [r.start for r in runs] == [0, *[r.stop for r in runs[:-1]]] and runs[-1].stop == layers
        assert all(len(r) >= 1 for r in runs)
        assert largest([r.start for r in runs[1:]]) == best


def test_split_by_count_and_its_errors():
    assert split_by_count([2, 1, 2], 3, 5) == [range(0, 2), range(2, 3), range(3, 5)]
    with pytest.raises(SplitError, match="2 counts for 3 ranks"):
        split_by_count([3, 2], 3, 5)
    with pytest.raises(SplitError, match="adds up to 4; the model has 5"):
        split_by_count([2, 1, 1], 3, 5)
    with pytest.raises(SplitError, match="at least one layer"):
        split_by_count([5, 0], 2, 5)
    with pytest.raises(SplitError, match="every rank needs at least one layer"):
        split_by_bytes([1, 2], 3)


def test_layers_per_rank_without_torchrun_is_refused(model_dirs, capsys):
    assert cli_main(["generate", str(model_dirs[1]), "--prompt", "w1", "--layers-per-rank", "3,2"]) == 2
    assert "start the command with torchrun" in capsys.readouterr().err


# ------------------------------------------------------------------------------ stages in one process
def test_stages_chained_in_one_process_equal_the_whole_model(model_dirs, generator):
    """StreamingLlama(layers=) stages fed each other's hidden states, one of them streaming under a
    small budget, with StageCache views: prefill then a decode step, bit for bit as one batch, within
    1e-6 cut in two micro-batches (run first: the whole batch then writes the cache as the reference did)."""
    packed = PackedModel.open(model_dirs[1])
    runs = [range(0, 1), range(1, 4), range(4, LAYERS)]
    ids = torch.randint(0, BASE["vocab_size"], (3, 6), generator=generator)
    step = torch.randint(0, BASE["vocab_size"], (3, 1), generator=generator)
    with quantlite.load(model_dirs[1], memory_budget="1GB") as whole:
        cache = whole.new_cache(3, 8)
        reference = [whole.forward(ids, cache=cache), whole.forward(step, cache=cache)]
    layer_bytes = whole.sizes.layers[0]
    stages = [StreamingLlama(packed, layers=runs[0], memory_budget="1GB"),
              StreamingLlama(packed, layers=runs[1], memory_budget=int(2.5 * layer_bytes)),  # 2 slots, all 3 stream
              StreamingLlama(packed, layers=runs[2], memory_budget="1GB")]
    assert stages[1].stats.streamed_layers == 3 and stages[0].stats.resident_layers == 1
    assert stages[0].lm_head is None and stages[1].embedding is None and stages[2].lm_head is not None
    caches = [StageCache(s.config, run, 3, 8, s.dtype, s.device) for s, run in zip(stages, runs)]
    for inputs, expected in zip((ids, step), reference):
        length = caches[0].length
        for rows in (range(0, 1), range(1, 3), range(0, 3)):  # two micro-batches, then the whole batch
            x = None
            for stage, cache in zip(stages, caches):
                view = cache.rows(rows.start, rows.stop, length)
                x = stage.forward(inputs[rows.start:rows.stop] if x is None else None, cache=view, hidden=x)
            if len(rows) == 3:
                assert torch.equal(x, expected)
            else:
                assert relative_error(x, expected[rows.start:rows.stop]) <= MICRO_BATCH_TOLERANCE
        for cache in caches:
            cache.advance(inputs.shape[1])
    for stage in stages:
        stage.close()


# ------------------------------------------------------------------------------ torchrun: the pipeline
def single_process_reference(packed_dir, data) -> dict:
    with quantlite.load(packed_dir) as model:
        return {"logits": model(data["ids"]),
                "tokens": model.generate(data["prompts"], max_new_tokens=data["new_tokens"]).token_ids,
                "ppl": perplexity(model, data["stream"], ctx=data["ctx"], batch_size=data["windows"], progress=False).ppl}


@pytest.mark.slow
@pytest.mark.parametrize("ranks, layers_per_rank", [(2, "-"), (3, "1,3,1")])
def test_pipeline_equals_the_single_process_runtime(ranks, layers_per_rank, model_dirs, tmp_path, generator):
    """Logits (one micro-batch: bit-identical; cut in micro-batches: within 1e-6), greedy tokens of
    left-padded prompts (on every rank), perplexity over windows cut in micro-batches. With 3 ranks
    the split is given and the budget (2.5 layers) makes rank 1 stream its 3 layers."""
    budget = "-"
    if ranks == 3:
        with quantlite.load(model_dirs[1], memory_budget="1GB") as model:
            budget = str(int(2.5 * model.sizes.layers[0]))
    data = {"ids": torch.randint(0, BASE["vocab_size"], (4, 7), generator=generator), "micro_batches": ranks,
            "prompts": [torch.randint(0, BASE["vocab_size"], (n,), generator=generator).tolist() for n in (3, 6, 1, 4)],
            "new_tokens": 6, "stream": torch.randint(0, BASE["vocab_size"], (100,), generator=generator), "ctx": 16, "windows": 5}
    torch.save(data, tmp_path / "inputs.pt")
    torchrun(ranks, WORKER, "pipeline", model_dirs[1], tmp_path / "inputs.pt", tmp_path / "out", layers_per_rank, budget)
    outs = [torch.load(tmp_path / f"out.{rank}") for rank in range(ranks)]
    reference = single_process_reference(model_dirs[1], data)

    driver = outs[-1]
    assert driver["driver"] and not any(out["driver"] for out in outs[:-1])
    assert all(out["whole"] is None for out in outs[:-1])
    assert torch.equal(driver["whole"], reference["logits"])
    assert relative_error(driver["cut"], reference["logits"]) <= MICRO_BATCH_TOLERANCE
    assert all(out["tokens"] == reference["tokens"] for out in outs)  # the tokens reach every rank
    assert all(abs(out["ppl"] - reference["ppl"]) <= MICRO_BATCH_TOLERANCE * reference["ppl"] for out in outs)
    reports = driver["reports"]
    if layers_per_rank != "-":
        assert [r["layers"] for r in reports] == ["layers 0-0", "layers 1-3", "layers 4-4"]
    assert sum(r["resident_layers"] + r["streamed_layers"] for r in reports) == LAYERS
    if budget != "-":
        assert [r["streamed_layers"] for r in reports] == [0, 3, 0]
        assert reports[1]["layer_loads"] == 3 * reports[1]["passes"]  # every pass reads the 3 layers


@pytest.mark.slow
def test_generate_and_ppl_commands_under_torchrun(model_dirs, tmp_path, capsys):
    """`torchrun -m quantlite generate|ppl` prints what the single-process command prints (the last
    rank prints; --stats adds one line per rank)."""
    packed = str(model_dirs[1])
    prompt = ["--prompt", "w3 w7 w1", "--prompt", "w5", "--max-new-tokens", "5"]
    assert cli_main(["generate", packed, *prompt]) == 0
    single = capsys.readouterr().out
    done = torchrun(2, "-m", "quantlite", "generate", packed, *prompt, "--stats", "--micro-batches", "2")
    assert done.stdout == single
    assert "rank 0 (layers 0-" in done.stderr and "rank 1 (layers " in done.stderr

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{i % 120}" for i in range(0, 700, 7)))
    assert cli_main(["ppl", packed, "--data", str(text), "--ctx", "16", "--batch-size", "3", "--json"]) == 0
    single = capsys.readouterr().out
    import json

    done = torchrun(2, "-m", "quantlite", "ppl", packed, "--data", text, "--ctx", "16", "--batch-size", "3", "--json")
    ours, reference = json.loads(done.stdout), json.loads(single)
    assert ours["tokens"] == reference["tokens"] and ours["windows"] == reference["windows"]
    assert abs(ours["ppl"] - reference["ppl"]) <= MICRO_BATCH_TOLERANCE * reference["ppl"]


# ------------------------------------------------------------------------------ faults
@pytest.mark.slow
@pytest.mark.parametrize("kind, ranks, faulty", [("die", 3, 1), ("hang", 2, 0)])
def test_a_dead_or_stuck_rank_ends_the_others_with_an_error(kind, ranks, faulty, model_dirs):
    """The other ranks end with DistributedError (exit 2) naming the peer: at once when its process
    ended (its sockets close), within the timeout when it is alive but silent."""
    timeout = 8
    processes = start_ranks([[WORKER, "fault", model_dirs[1], kind, faulty, timeout]] * ranks)
    started = time.monotonic()
    try:
        for rank, process in enumerate(processes):
            if rank == faulty:
                continue
            output, _ = process.communicate(timeout=LAUNCH_SECONDS)
            assert process.returncode == 2, output[-2000:]
            assert "DistributedError: rank" in output and ("failed" in output), output[-2000:]
        assert time.monotonic() - started < LAUNCH_SECONDS
    finally:
        for process in processes:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_ranks_with_different_packed_models_refuse_to_start(model_dirs, tmp_path):
    other = tmp_path / "other"
    quantlite.convert(model_dirs[0], other, method="rtn", progress=False)
    processes = start_ranks([[WORKER, "fault", path, "die", -1, 30] for path in (model_dirs[1], other)])
    for process in processes:
        output, _ = process.communicate(timeout=LAUNCH_SECONDS)
        assert process.returncode == 2, output[-2000:]
        assert "the ranks disagree on the packed model (sha256 of" in output, output[-2000:]


# ------------------------------------------------------------------------------ parallel conversion
@pytest.mark.slow
def test_parallel_conversion_is_byte_identical_and_resumes(model_dirs, tmp_path, monkeypatch):
    """3 ranks convert the whole model, and finish an interrupted single-process conversion: both
    byte-identical to one process's uninterrupted conversion (data-free: the ranks share the files).
    The default (random-token calibration, the source has a tokenizer) runs on rank 0 alone."""
    import quantlite.converter as converter

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    source = model_dirs[0]
    quantlite.convert(source, tmp_path / "single", calibration="none", progress=False)

    original, written = converter.write_shard, []

    def fail_after_three(*args, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt  # as a user's Ctrl-C
        written.append(args[3])
        return original(*args, **kwargs)

    monkeypatch.setattr(converter, "write_shard", fail_after_three)
    with pytest.raises(KeyboardInterrupt):
        quantlite.convert(source, tmp_path / "resumed", calibration="none", progress=False)
    monkeypatch.setattr(converter, "write_shard", original)

    import json

    recorded = len(json.loads((tmp_path / "resumed" / converter.PARTIAL_STATE).read_text())["done"])
    assert recorded == 4  # the tokenizer and the three shards before the interruption
    env = child_env(SOURCE_DATE_EPOCH="1700000000")
    torchrun(3, "-m", "quantlite", "convert", source, tmp_path / "parallel", "--calibration", "none", "--quiet", env=env)
    done = torchrun(3, "-m", "quantlite", "convert", source, tmp_path / "resumed", "--calibration", "none", "--quiet", env=env)
    assert f"{recorded} resumed" in done.stdout
    for name in ("parallel", "resumed"):
        files = sorted(p.relative_to(tmp_path / name) for p in (tmp_path / name).rglob("*") if p.is_file())
        assert files == sorted(p.relative_to(tmp_path / "single") for p in (tmp_path / "single").rglob("*") if p.is_file())
        for file in files:
            assert (tmp_path / name / file).read_bytes() == (tmp_path / "single" / file).read_bytes(), (name, file)
    calibrated = torchrun(3, "-m", "quantlite", "convert", source, tmp_path / "calibrated", "--quiet", env=env)
    assert "rank 1: a calibrated conversion runs on rank 0 alone" in calibrated.stderr
    quantlite.convert(source, tmp_path / "calibrated-single", progress=False)
    for path in sorted((tmp_path / "calibrated-single").glob("*.safetensors")):
        assert (tmp_path / "calibrated" / path.name).read_bytes() == path.read_bytes(), path.name
