"""The trainer and the two commands a user types: `plait train` and `plait launch`."""

import itertools
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch.testing import assert_close

import plait
from plait.metrics import read_metrics
from plait.train import RunConfig, Trainer
from plait.train.config import build, load_toml, to_toml
from plait.train.trainer import lr_at
from tests.harness import run_ranks

SMALL = {
    "model": {"model": "gpt-tiny", "n_layer": 2, "n_embd": 64, "block_size": 32},
    "data": {"data": "synthetic", "synthetic_tokens": 50_000},
    "optim": {"warmup_steps": 2},
    "train": {
        "steps": 4,
        "batch_size": 8,
        "micro_batch": 2,
        "eval_every": 2,
        "eval_batches": 2,
        "progress": False,
    },
}


def _fit(values: dict, run_dir: str) -> list[float]:
    values = {k: dict(v) for k, v in values.items()}
    values["train"]["run_dir"] = run_dir
    Trainer(build(values)).fit()
    return [r["loss"] for r in read_metrics(run_dir, "step") if r["rank"] == plait.current().rank]


def test_the_global_batch_does_not_depend_on_the_world_size(tmp_path):
    """Same seed, same global batch: 1, 2 and 4 ranks (4, 2 and 1 micro-steps each) give the same losses."""
    one = run_ranks(_fit, 1, SMALL, str(tmp_path / "one"))[0]
    two = run_ranks(_fit, 2, SMALL, str(tmp_path / "two"))
    four = run_ranks(_fit, 4, SMALL, str(tmp_path / "four"))
    for losses in two + four:
        assert_close(losses, one, rtol=1e-5, atol=1e-6)
    assert one[-1] < one[0]


def test_plait_train_end_to_end_on_two_ranks(tmp_path):
    run_dir = tmp_path / "run"
    config = tmp_path / "small.toml"
    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"]["run_dir"] = str(run_dir)
    config.write_text(to_toml(build(values)))
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", "--nproc", "2", "--config", str(config), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bytes sent / rank / step" in done.stdout and "peak memory rank 1" in done.stdout
    steps = read_metrics(run_dir, "step")
    assert sorted((r["rank"], r["step"]) for r in steps) == [(r, s) for r in range(2) for s in range(3)]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 3
    assert summary["bytes_per_step"] == summary["theory_bytes_per_step"] > 0
    assert len(read_metrics(run_dir, "eval")) == 2 * 2  # steps 0 and 2 (the last), on both ranks


def test_plait_launch_starts_two_ranks(tmp_path):
    script = Path(__file__).parent / "scripts" / "allreduce_script.py"
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "launch", "-n", "2", str(script), str(tmp_path), "hello"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "0 2 3 hello\n"
    assert (tmp_path / "rank1.txt").read_text() == "1 2 3 hello\n"


def test_config_round_trips_through_toml(tmp_path):
    config = build(SMALL)
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    assert build(load_toml(path)) == config
    assert RunConfig() == build({})


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"train": {"batch_size": 10, "micro_batch": 4}}, "batch_size=10 is not a multiple of micro_batch=4"),
        ({"model": {"model": "gpt-huge"}}, "model='gpt-huge' is not a preset"),
        ({"train": {"stepz": 3}}, "no field"),
        ({"trainer": {}}, "unknown config section"),
        ({"data": {"data": "imagenet"}}, "data='imagenet'"),
        ({"train": {"strategy": "zero2", "tp": 2}}, "tp=2 needs strategy tp, pp or hybrid, not 'zero2'"),
    ],
)
def test_bad_config_is_a_clear_error(values, fragment):
    with pytest.raises(plait.ConfigError, match=fragment):
        build(values)


def test_cli_reports_config_errors_without_a_traceback():
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", "--batch-size", "10", "--micro-batch", "4"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "plait: error: batch_size=10 is not a multiple of micro_batch=4" in done.stderr
    assert "Traceback" not in done.stderr


def test_learning_rate_schedule():
    lrs = [lr_at(s, 100, 1.0, 0.1, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


@pytest.mark.parametrize("strategy", ["zero1", "zero2", "zero3"])
def test_trainer_under_zero_matches_single_process(strategy, tmp_path):
    one = run_ranks(_fit, 1, SMALL, str(tmp_path / "one"))[0]
    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"]["strategy"] = strategy
    for losses in run_ranks(_fit, 2, values, str(tmp_path / strategy)):
        assert_close(losses, one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("world", "train"),
    [
        (2, {"strategy": "tp"}),
        (2, {"strategy": "pp", "schedule": "gpipe"}),
        (4, {"strategy": "hybrid", "tp": 2, "pp": 2}),
        (4, {"strategy": "hybrid", "pp": 2, "zero": 1}),
    ],
    ids=["tp2", "pp2-gpipe", "tp2xpp2", "dp2xpp2-zero1"],
)
def test_trainer_on_a_mesh_matches_single_process(world, train, tmp_path):
    """plait train --strategy tp|pp|hybrid: the pipeline runs the trainer's micro-batches, clipping
    counts every element once, and the losses are the single-process run's."""
    one = run_ranks(_fit, 1, SMALL, str(tmp_path / "one"))[0]
    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"] |= train
    for losses in run_ranks(_fit, world, values, str(tmp_path / "mesh"), timeout=180):
        assert_close(losses, one, rtol=1e-4, atol=1e-5)


def test_pipeline_needs_as_many_micro_batches_as_stages():
    from plait.train.trainer import _mesh

    train = build({"train": {"strategy": "pp", "pp": 4, "batch_size": 8, "micro_batch": 4}}).train
    with pytest.raises(
        plait.ConfigError, match=r"pp=4 stages need at least 4 micro-batches.*micro_batch in \{1, 2\}"
    ):
        _mesh(train, 4)
    with pytest.raises(plait.ConfigError, match=r"tp x pp = 1 x 4 must divide the world size 6"):
        _mesh(train, 6)
    assert _mesh(build({"train": {"strategy": "pp", "micro_batch": 2}}).train, 4) == plait.Hybrid(
        dp=2, pp=2, microbatches=8
    )


def _train_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    common = [
        "--model",
        "gpt-tiny",
        "--data",
        "synthetic",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--micro-batch",
        "1",
    ]
    return subprocess.run(
        [sys.executable, "-m", "plait.cli", "train", *common, "--eval-every", "0", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=tmp_path,
    )


def test_plait_train_on_a_mesh_from_the_command_line(tmp_path):
    done = _train_cli(
        tmp_path, "--nproc", "4", "--strategy", "hybrid", "--tp", "2", "--pp", "2", "--micro-batch", "2"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "hybrid on 4 rank(s) (dp 1 x pp 2 x tp 2)" in done.stdout and "bubble" in done.stdout
    wrong = _train_cli(tmp_path, "--nproc", "2", "--strategy", "pp", "--micro-batch", "4")
    assert wrong.returncode != 0
    assert "pp=2 stages need at least 2 micro-batches per step" in wrong.stderr
    assert "use a micro_batch in {1, 2}" in wrong.stderr


def test_memory_cap_stops_ddp_and_zero3_fits_under_it(tmp_path):
    """gpt-tiny's fp32 AdamW states are 13.4 MB per rank under ddp; zero3 on 4 ranks holds about a quarter."""
    ddp = _train_cli(tmp_path, "--nproc", "2", "--strategy", "ddp", "--mem-cap-gb", "0.008")
    assert ddp.returncode == 3  # the ranks' own status, passed on by the launcher
    assert "plait: error: out of memory: rank 0 holds 0.013 GB of model states" in ddp.stderr
    assert "over --mem-cap-gb 0.008" in ddp.stderr
    zero3 = _train_cli(tmp_path, "--nproc", "4", "--strategy", "zero3", "--mem-cap-gb", "0.008")
    assert zero3.returncode == 0, zero3.stderr[-2000:]
    assert "zero3 on 4 rank(s)" in zero3.stdout
    held = re.search(r"([0-9.]+) GB \(--mem-cap-gb 0.008\)", zero3.stdout)
    assert held is not None, zero3.stdout
    assert 0.002 < float(held.group(1)) < 0.008  # about a quarter of ddp's 0.013 GB, plus padding


def test_estimate_reproduces_the_papers_figure_1():
    from plait.estimate import model_state_bytes

    gb = {s: round(model_state_bytes(7.5e9, 64, s) / 1e9, 1) for s in ("ddp", "zero1", "zero2", "zero3")}
    assert gb == {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "estimate", "--params", "7.5e9", "--nproc", "64"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0
    for figure in ("120.0", "31.4", "16.6", "1.9"):
        assert figure in done.stdout
