"""The trainer and the two commands a user types: `plait train` and `plait launch`."""

import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import plait
from plait.comm import delta
from plait.metrics import read_metrics
from plait.train import RunConfig, Trainer
from plait.train.config import build, load_toml, to_toml
from plait.train.trainer import lr_at
from tests.harness import RankFailure, run_ranks

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


def _subnormal_after_setup(values: dict, run_dir: str) -> float:
    values = {k: dict(v) for k, v in values.items()}
    values["train"]["run_dir"] = run_dir
    Trainer(build(values))
    return (torch.tensor([1e-39]) * 1.5).item()  # 1e-39 is below fp32's smallest normal, 1.18e-38


@pytest.mark.parametrize("flush", [True, False])
def test_the_trainer_flushes_subnormals_unless_told_not_to(flush, tmp_path):
    """A CPU computes on subnormal floats many times slower; the trainer flushes them to zero by default."""
    values = SMALL | {"train": SMALL["train"] | {"flush_denormal": flush}}
    product = run_ranks(_subnormal_after_setup, 1, values, str(tmp_path / "run"))[0]
    assert (product == 0.0) == flush, product


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
        (
            {"train": {"strategy": "zero2"}, "strategy": {"tp": 2}},
            r"strategy 'zero2' has no option\(s\) \['tp'\]; its options: \['bucket_mb'",
        ),
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
        (2, {"train": {"strategy": "tp"}}),
        (2, {"train": {"strategy": "pp"}, "strategy": {"schedule": "gpipe"}}),
        (4, {"train": {"strategy": "hybrid"}, "strategy": {"tp": 2, "pp": 2}}),
        (4, {"train": {"strategy": "hybrid"}, "strategy": {"pp": 2, "zero": 1}}),
    ],
    ids=["tp2", "pp2-gpipe", "tp2xpp2", "dp2xpp2-zero1"],
)
def test_trainer_on_a_mesh_matches_single_process(world, train, tmp_path):
    """plait train --strategy tp|pp|hybrid: the pipeline runs the trainer's micro-batches, clipping
    counts every element once, and the losses are the single-process run's."""
    one = run_ranks(_fit, 1, SMALL, str(tmp_path / "one"))[0]
    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"] |= train["train"]
    values["strategy"] = train.get("strategy", {})
    for losses in run_ranks(_fit, world, values, str(tmp_path / "mesh"), timeout=180):
        assert_close(losses, one, rtol=1e-4, atol=1e-5)


def _evaluate(values: dict, run_dir: str) -> dict:
    """On every rank: a Trainer's validation loss, and what evaluating sent (per op kind)."""
    values = {k: dict(v) for k, v in values.items()}
    values["train"]["run_dir"] = run_dir
    trainer = Trainer(build(values))
    before = trainer.ctx.stats.snapshot()
    val = trainer.evaluate()
    sent = {op: t.bytes_sent for op, t in delta(trainer.ctx.stats.snapshot(), before).items() if t.calls}
    return {"val": val, "sent": sent}


def test_eval_under_tp_uses_the_vocabulary_parallel_loss(tmp_path):
    """Evaluation computes its loss as training does: under tp the two small all-reduces of the
    vocabulary-parallel cross-entropy per batch, never an all-gather of the (B, T, V) logits (before:
    one per batch, of 8 x 32 x 256 fp32 logits here). The loss is the single process's."""
    one = run_ranks(_evaluate, 1, SMALL, str(tmp_path / "one"))[0]
    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"] = values["train"] | {"strategy": "tp"}
    for result in run_ranks(_evaluate, 2, values, str(tmp_path / "tp")):
        assert "all_gather" not in result["sent"], result["sent"]
        assert_close(result["val"], one["val"], rtol=1e-5, atol=1e-6)


def test_uneven_shares_are_refused_under_a_pipeline(tmp_path):
    """A pipeline's stages run the same micro-batches, so --balance with shares is an error naming it."""
    values = {k: dict(v) for k, v in SMALL.items()}
    values["train"] = values["train"] | {"strategy": "pp", "balance": "8"}
    with pytest.raises(RankFailure, match=r"balance='8' needs a synchronous .* not strategy='pp'"):
        run_ranks(_evaluate, 2, values, str(tmp_path / "pp"))


def test_pipeline_needs_as_many_micro_batches_as_stages():
    config = build(
        {"train": {"strategy": "hybrid", "batch_size": 8, "micro_batch": 4}, "strategy": {"pp": 4}}
    )
    with pytest.raises(
        plait.ConfigError, match=r"pp=4 stages need at least 4 micro-batches.*micro_batch in \{1, 2\}"
    ):
        config.strategy.for_batch(4, config.train.batch_size, config.train.micro_batch)
    config = build({"train": {"strategy": "pp", "micro_batch": 2}})
    fitted = config.strategy.for_batch(4, config.train.batch_size, config.train.micro_batch)
    assert fitted == plait.Pipeline(stages=2, microbatches=8)


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


# -- resuming never silently changes a run (issue 11 item 1) ------------------------------------------

RESUMABLE = {k: dict(v) for k, v in SMALL.items()} | {
    "train": SMALL["train"] | {"save_every": 2, "eval_every": 0, "steps": 2}
}


def _start(values: dict, run_dir: str, fit: bool) -> dict:
    """On every rank: build a Trainer (and train, if ``fit``); what the resumed optimizer and sampler hold."""
    values = {k: dict(v) for k, v in values.items()}
    values["train"]["run_dir"] = run_dir
    trainer = Trainer(build(values))
    group = trainer.optimizer.param_groups[0]
    held = {
        "betas": tuple(group["betas"]),
        "weight_decay": group["weight_decay"],
        "seed": trainer.sampler.seed,
        "step": trainer.sampler.step,
    }
    if fit:
        trainer.fit()
    return held


def test_resume_auto_refuses_a_run_with_other_settings_and_never_refuses_any(tmp_path):
    run_dir = str(tmp_path / "run")
    run_ranks(_start, 1, RESUMABLE, run_dir, True)
    same = run_ranks(
        _start, 1, RESUMABLE | {"train": RESUMABLE["train"] | {"micro_batch": 4}}, run_dir, False
    )
    assert same[0]["step"] == 2  # auto: the same settings (another micro_batch) resume
    changed = {
        **RESUMABLE,
        "optim": {"warmup_steps": 2, "beta2": 0.5},
        "train": RESUMABLE["train"] | {"seed": 9},
    }
    with pytest.raises(RankFailure, match=r"train.seed: 0 then, 9 now") as failure:
        run_ranks(_start, 1, changed, run_dir, False)
    assert "optim.beta2: 0.95 then, 0.5 now" in str(failure.value) and "--resume" in str(failure.value)
    never = RESUMABLE | {"train": RESUMABLE["train"] | {"resume": "never"}}
    with pytest.raises(
        RankFailure, match=r"--resume never, but run dir .* holds checkpoints \(up to step 2\)"
    ):
        run_ranks(_start, 1, never, run_dir, False)


def test_resume_from_a_checkpoint_keeps_the_live_settings(tmp_path):
    """Before: the checkpoint's betas, weight decay and sampler seed replaced the ones given."""
    run_ranks(_start, 1, RESUMABLE, str(tmp_path / "first"), True)
    path = str(tmp_path / "first" / "checkpoints" / "step_000002")
    changed = {
        **RESUMABLE,
        "optim": {"warmup_steps": 2, "beta2": 0.5, "weight_decay": 0.3},
        "train": RESUMABLE["train"] | {"seed": 9, "resume": path, "steps": 4},
    }
    held = run_ranks(_start, 2, changed, str(tmp_path / "second"), False)
    assert held == [{"betas": (0.9, 0.5), "weight_decay": 0.3, "seed": 9, "step": 2}] * 2


def test_a_run_dir_in_use_is_refused_naming_its_holder_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    import socket

    from plait.train.rundir import hold

    run_dir = str(tmp_path / "run")
    holder = rf"in use by pid {os.getpid()} on host '{socket.gethostname()}'"
    with hold(run_dir):
        with pytest.raises(plait.ConfigError, match=holder), hold(run_dir):
            pass
        with pytest.raises(plait.ConfigError, match=holder), hold(run_dir, job="host:1/abc"):
            pass  # another job's launcher
    with hold(run_dir, job="host:1/abc"), hold(run_dir, job="host:1/abc"):
        pass  # two launchers (hosts) of one multi-node job share it
    assert not (tmp_path / "run" / "run.lock").exists()  # released
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock = {"pid": int(dead.stdout), "host": socket.gethostname(), "job": None}
    (tmp_path / "run" / "run.lock").write_text(json.dumps(lock))
    with hold(run_dir):
        assert json.loads((tmp_path / "run" / "run.lock").read_text())["pid"] == os.getpid()
    assert "its holder, pid" in capsys.readouterr().err


def test_a_lock_left_on_another_host_is_taken_over_by_its_own_job_only(tmp_path):
    """Host b's launcher of a multi-node job was SIGKILLed: its run.lock stays. The same job (host b back,
    or host a's launcher) takes it over and releases it when the job succeeds (before: it was shared, never
    released, and the run dir refused every later job); another job is refused, told how to go on."""
    from plait.train.rundir import hold

    run_dir, path = str(tmp_path / "run"), tmp_path / "run" / "run.lock"
    path.parent.mkdir()
    job = "hosta:29400/plait-test-0d5c7e1f2a"
    path.write_text(json.dumps({"pid": 2**22 + 1, "host": "host-b-gone", "job": job}))
    refused = r"in use by pid 4194305 on host 'host-b-gone' for the multi-node job hosta:29400/.*--rdzv-id"
    for other in (None, "hosta:29400/plait-test-other-job-1"):
        with pytest.raises(plait.ConfigError, match=refused), hold(run_dir, other):
            pass
    with hold(run_dir, job) as lock:
        assert json.loads(path.read_text())["pid"] == os.getpid()  # the newest launcher of the job
        lock.succeeded = False
    assert json.loads(path.read_text())["job"] == job  # a failed job's other hosts may go on: kept
    with hold(run_dir, job):
        pass
    assert not path.exists()  # the job succeeded: over on every host
    with hold(run_dir):
        pass


def test_each_run_gets_its_own_run_dir_and_runs_latest_points_at_the_newest(tmp_path, monkeypatch, capsys):
    from plait.cli import main
    from plait.train.rundir import new_run_dir

    monkeypatch.chdir(tmp_path)
    first, second = new_run_dir("ddp"), new_run_dir("ddp")
    assert first != second and first.startswith("runs/") and second.endswith("-ddp-1")
    assert (tmp_path / "runs" / "latest").resolve() == (tmp_path / second).resolve()
    argv = [
        "train",
        "--nnodes",
        "2",
        "--rdzv-endpoint",
        "localhost:1",
        "--rdzv-id",
        "plait-test-0d5c7e1f2a",
        "--steps",
        "1",
    ]
    assert main(argv) == 2  # each host's launcher would make a directory of its own
    assert "--nnodes 2 needs --run-dir" in capsys.readouterr().err
    assert len(list((tmp_path / "runs").iterdir())) == 3  # the two runs and latest: none made for it
