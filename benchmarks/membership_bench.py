"""What a membership change costs: a host lost, and (``--rejoin``) the same host back.

Two emulated hosts (plait.testing.hosts, needs root) x 1 rank run ``plait train --nnodes 1:2``
with a shared run dir and a checkpoint every ``--save-every`` steps. Host b (launcher and rank) is
SIGKILLed once rank 1 has logged ``--kill-after``; the script times, by polling the metrics file:

* kill -> the first step of the re-formed world (world size 1), and the steps recomputed (those
  done before the kill that the resumed world does again, from the latest checkpoint);
* with ``--cut``, host b is cut off instead (its link down, its processes left running: a power or
  network loss, where no connection reset reaches gloo and plait's watchdog must find the silent peer);
* with ``--rejoin``: b's ``plait train`` started again (same rendezvous) -> the first step at
  world size 2.

Run (root): ``python benchmarks/membership_bench.py [--rdzv-conf last_call_timeout=2] [--rejoin]``.
Prints one line per figure; the logs of every launcher are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from plait.metrics import read_metrics
from plait.testing.hosts import Hosts

TINY = [
    "--model", "gpt-tiny", "--n-layer", "2", "--n-embd", "64", "--block-size", "32",
    "--data", "synthetic", "--synthetic-tokens", "50000", "--warmup-steps", "2",
    "--batch-size", "8", "--micro-batch", "2", "--eval-every", "0", "--no-progress",
    "--slow-rank", "0", "--slow-factor", "4",
]  # fmt: skip


def records(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return []


def wait_for(run_dir: Path, condition, job: subprocess.Popen, timeout: float) -> tuple[float, list[dict]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rs = records(run_dir)
        if condition(rs):
            return time.monotonic(), rs
        if job.poll() is not None:
            raise SystemExit(f"host a's job ended early with {job.returncode}; see its log")
        time.sleep(0.05)
    raise SystemExit(f"timed out after {timeout} s; last records {rs[-3:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rdzv-conf", default=None)
    p.add_argument("--rejoin", action="store_true")
    p.add_argument("--cut", action="store_true")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--save-every", type=int, default=5)
    p.add_argument("--kill-after", type=int, default=12)
    p.add_argument("--max-restarts", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("/tmp/membership_bench"))
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    run_dir = a.out / f"run-{os.getpid()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    argv = [sys.executable, "-m", "plait.cli", "train", *TINY, "--steps", str(a.steps),
            "--save-every", str(a.save_every), "--run-dir", str(run_dir), "--nproc", "1",
            "--nnodes", "1:2", "--max-restarts", str(a.max_restarts),
            "--rdzv-id", f"plait-membership-bench-{os.getpid()}"]  # fmt: skip
    if a.rdzv_conf:
        argv += ["--rdzv-conf", a.rdzv_conf]
    logs = [a.out / f"{run_dir.name}-{n}.log" for n in ("a", "b1", "b2")]
    with (
        Hosts(2) as hosts,
        open(logs[0], "w") as log_a,
        open(logs[1], "w") as log_b,
        open(logs[2], "w") as log_b2,
    ):
        argv += ["--rdzv-endpoint", hosts.endpoint(29500)]
        job = hosts.popen(0, argv, env, stdout=log_a, stderr=subprocess.STDOUT)
        hosts.popen(1, argv, env, stdout=log_b, stderr=subprocess.STDOUT)

        def b_at(rs):
            return any(r["kind"] == "step" and r["rank"] == 1 and r["step"] >= a.kill_after for r in rs)

        _, rs = wait_for(run_dir, b_at, job, 120)
        killed = time.monotonic()
        if a.cut:
            subprocess.run(["ip", "-n", hosts[1].netns, "link", "set", "eth0", "down"], check=True)
        else:
            hosts[1].kill()
        done_before = max(r["step"] for r in records(run_dir) if r["kind"] == "step")
        n_before = len(rs)

        def first_step_after_resume(rs):
            new = rs[n_before:]
            resumes = [i for i, r in enumerate(new) if r["kind"] == "resume"]
            return bool(resumes) and any(r["kind"] == "step" for r in new[resumes[0] :])

        t1, rs = wait_for(run_dir, first_step_after_resume, job, 300)
        resume = next(r for r in rs[n_before:] if r["kind"] == "resume")
        print(f"rdzv_conf={a.rdzv_conf} cut={a.cut}: kill -> first step at world 1: {t1 - killed:.1f} s; "
              f"resumed at step {resume['step']}, steps done before the kill 0..{done_before}: "
              f"{done_before + 1 - resume['step']} recomputed", flush=True)  # fmt: skip
        if a.rejoin:
            n_before = len(rs)
            if a.cut:
                hosts[1].kill()
                subprocess.run(["ip", "-n", hosts[1].netns, "link", "set", "eth0", "up"], check=True)
            back = time.monotonic()
            hosts.popen(1, argv, env, stdout=log_b2, stderr=subprocess.STDOUT)

            def world_two(rs):
                return any(r["kind"] == "step" and r["rank"] == 1 for r in rs[n_before:])

            t2, rs = wait_for(run_dir, world_two, job, 300)
            new = rs[n_before:]
            first = next(i for i, r in enumerate(new) if r["kind"] == "resume")
            done_before = max(r["step"] for r in rs[: n_before + first] if r["kind"] == "step")
            print(f"rdzv_conf={a.rdzv_conf}: b started again -> first step at world 2: {t2 - back:.1f} s; "
                  f"resumed at step {new[first]['step']}, steps done at world 1 up to {done_before}: "
                  f"{done_before + 1 - new[first]['step']} recomputed", flush=True)  # fmt: skip
        job.wait(timeout=600)
        print(f"host a exit {job.returncode}", flush=True)
    rs = records(run_dir)
    final = [r["loss"] for r in rs if r["kind"] == "step" and r["step"] == a.steps - 1]
    worlds = []
    for r in rs:
        if r["kind"] == "resume" and r["rank"] == 0:
            worlds.append(f"resume@{r['step']}")
    print(f"final loss {final}; {worlds}; logs in {a.out}", flush=True)


if __name__ == "__main__":
    main()
