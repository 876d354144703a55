"""Real ``plait train --max-restarts`` jobs whose ranks are SIGKILLed inside the checkpoint code.

``PLAIT_FAULT`` (plait/checkpoint/faults.py) names the points: each entry kills one rank at one
point on one attempt (torchrun's restart count), so every kill happens exactly where it is meant
to, with no timing involved. Each job must end with exit 0 and the undisturbed run's losses and
final state, bit for bit: the last checkpoint's shards (model, optimizer state, RNG) have the
same sha256 as the undisturbed run's.
"""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 12


def _train(run_dir: Path, *extra: str, fault: str = "", restarts: int = 0) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "plait.cli", "train", "--nproc", "2", "--model", "gpt-tiny", "--n-layer", "1",
        "--n-embd", "32", "--block-size", "16", "--data", "synthetic", "--synthetic-tokens", "20000",
        "--steps", str(STEPS), "--batch-size", "4", "--micro-batch", "2", "--eval-every", "0",
        "--save-every", "2", "--keep-checkpoints", "2", "--no-progress", "--run-dir", str(run_dir),
        "--max-restarts", str(restarts), *extra,
    ]  # fmt: skip
    env = {**os.environ, "PLAIT_FAULT": fault}
    return subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)


def _records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _final_files(run_dir: Path) -> dict:
    return json.loads((run_dir / "checkpoints" / f"step_{STEPS:06d}" / "manifest.json").read_text())["files"]


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("undisturbed")
    done = _train(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def _assert_same_run(run_dir: Path, undisturbed: Path, what: str) -> None:
    losses = {(r["rank"], r["step"]): r["loss"] for r in _records(run_dir, "step")}  # the last attempt wins
    expected = {(r["rank"], r["step"]): r["loss"] for r in _records(undisturbed, "step")}
    assert losses == expected, f"{what}: the losses differ from the undisturbed run's"
    assert _final_files(run_dir) == _final_files(undisturbed), f"{what}: the final state differs"


@pytest.mark.timeout(300)
def test_kills_at_each_point_of_saving_and_loading(tmp_path, undisturbed):
    """Attempt 0 dies in the very first save; then rank 0 dies after writing the manifest, after the
    rename, while pruning; then rank 1 dies while loading; then rank 0 dies once the final checkpoint is
    in place, so the last attempt finds the run complete. Each restart resumes where it must."""
    faults = [
        "write:rank=1:step=2:attempt=0",
        "manifest:rank=0:step=6:attempt=1",
        "commit:rank=0:step=8:attempt=2",
        "prune:rank=0:attempt=3",
        "load:rank=1:attempt=4",
        "commit:rank=0:step=12:attempt=5",
    ]
    run_dir = tmp_path / "killed"
    done = _train(run_dir, fault=",".join(faults), restarts=len(faults))
    assert done.returncode == 0, done.stderr[-3000:]
    # 1: nothing saved yet; 2: step 6 never committed; 3: step 8 was in place; 4 died loading step 10;
    # 6: step 12 was in place, and the run summarizes its logged steps
    resumed = [r["step"] for r in _records(run_dir, "resume") if r["rank"] == 0]
    assert resumed == [4, 8, 10, 12], resumed
    assert "already complete at step 12" in done.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == STEPS
    _assert_same_run(run_dir, undisturbed, "named kills")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000010", "step_000012"]


@pytest.mark.timeout(300)
def test_random_kills_until_the_run_ends(tmp_path, undisturbed):
    """Background saves; each attempt dies at a random point of the checkpoint code on a random rank.

    ``PLAIT_FAULT_SEED`` replays a schedule; the seed is in every failure message.
    """
    seed = int(os.environ.get("PLAIT_FAULT_SEED", random.SystemRandom().randrange(10**6)))
    draw = random.Random(seed)
    points = {"async": [0, 1], "manifest": [0], "commit": [0], "prune": [0], "load": [0, 1]}
    faults = []
    for attempt in range(3):
        point = draw.choice(sorted(points))
        step = draw.choice(range(2, STEPS + 1, 2))
        faults.append(f"{point}:rank={draw.choice(points[point])}:step={step}:attempt={attempt}")
    what = f"PLAIT_FAULT_SEED={seed} PLAIT_FAULT={','.join(faults)}"
    run_dir = tmp_path / "killed"
    done = _train(run_dir, "--async-checkpoint", fault=",".join(faults), restarts=len(faults))
    assert done.returncode == 0, f"{what}\n{done.stderr[-3000:]}"
    _assert_same_run(run_dir, undisturbed, what)
