"""Multi-node jobs on emulated hosts (plait.testing.hosts): the same losses as on one host."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from torch.testing import assert_close

from plait.metrics import read_metrics
from plait.testing.hosts import Hosts, unavailable

pytestmark = pytest.mark.skipif(unavailable() is not None, reason=str(unavailable()))

TINY = [
    "--model", "gpt-tiny", "--n-layer", "2", "--n-embd", "64", "--block-size", "32",
    "--data", "synthetic", "--synthetic-tokens", "50000", "--warmup-steps", "2",
    "--steps", "4", "--batch-size", "8", "--micro-batch", "2", "--eval-every", "0", "--no-progress",
]  # fmt: skip
PORT = 29500


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def _plait_train(*args: str) -> list[str]:
    return [sys.executable, "-m", "plait.cli", "train", *TINY, *args]


def _losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir, "step") if r["rank"] == 0]


def _run_on_hosts(
    hosts: Hosts, nproc: int, run_dir, timeout: float = 120
) -> list[subprocess.CompletedProcess]:
    """`plait train` on every host at once, one node each, rendezvous on host a by name."""
    args = ["--nproc", str(nproc), "--nnodes", str(len(hosts)), "--rdzv-endpoint", hosts.endpoint(PORT),
            "--rdzv-id", "plait-hosts-test-3c5e1d", "--run-dir", str(run_dir)]  # fmt: skip
    jobs = [hosts.popen(i, _plait_train(*args), _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) for i in range(len(hosts))]  # fmt: skip
    outputs = [j.communicate(timeout=timeout) for j in jobs]
    return [subprocess.CompletedProcess(j.args, j.returncode, *out) for j, out in zip(jobs, outputs)]


def _netns() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_hosts_have_names_shaped_links_and_leave_nothing_behind():
    with pytest.raises(KeyError), Hosts(3, rate="100mbit") as hosts:
        made = [h.netns for h in hosts] + [hosts.bridge]
        assert all(name in _netns() for name in made)
        probe = "hostname; getent hosts hosta hostc; tc qdisc show dev eth0"
        out = hosts[1].run(["sh", "-c", probe], capture_output=True, text=True, check=True).stdout
        assert out.startswith("hostb\n") and "10.77.0.1 " in out and "10.77.0.3 " in out, out
        assert "tbf" in out and "rate 100Mbit" in out, out
        sleeper = hosts.popen(2, ["sleep", "600"])
        raise KeyError("the body fails: the hosts must still go")
    assert sleeper.returncode is not None  # killed, not left running
    assert not any(name in _netns() for name in made)
    assert not any(os.path.exists(f"/etc/netns/{name}") for name in made)


def test_gloo_interface_is_the_route_to_the_endpoint():
    code = "from plait.launch import interface_towards as f; print(f('hostb:29500'), f('localhost:29500'))"
    with Hosts(2) as hosts:
        done = hosts[0].run([sys.executable, "-c", code], _env(), timeout=60, capture_output=True, text=True)
    assert done.stdout.split() == ["eth0", "None"], done.stderr[-2000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("one-host")
    done = subprocess.run(_plait_train("--run-dir", str(run_dir)), env=_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return _losses(run_dir)


@pytest.mark.parametrize("nproc", [1, 2])
def test_two_hosts_train_like_one(nproc, reference, tmp_path):
    with Hosts(2, rate="1gbit") as hosts:
        done = _run_on_hosts(hosts, nproc, tmp_path)
    for d in done:
        assert d.returncode == 0, d.stderr[-3000:]
    records = read_metrics(tmp_path, "step")
    assert {r["rank"] for r in records} == set(range(2 * nproc))
    for r in records:  # ddp's ring: a rank's bytes cross the hosts when its successor is on the other one
        crosses = (r["rank"] + 1) % nproc == 0
        assert r["inter_host_bytes"] == (r["bytes_sent"] if crosses else 0), r
    assert_close(_losses(tmp_path), reference, rtol=1e-5, atol=1e-6)
    assert reference[-1] < reference[0]


def _records(run_dir) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (FileNotFoundError, ValueError):  # not written yet, or a line being appended
        return []


def _wait_for(run_dir, condition, job: subprocess.Popen, timeout: float = 90) -> list[dict]:
    """Poll the shared metrics file until ``condition(records)`` holds (the job must stay alive)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        records = _records(run_dir)
        if condition(records):
            return records
        assert job.poll() is None, f"host a's job ended early with {job.returncode}"
        time.sleep(0.2)  # polling a file another process appends to; nothing waits on this
    raise AssertionError(f"timed out; last records: {_records(run_dir)[-5:]}")


def _resumes(records) -> list[tuple[int, int]]:
    """(step, ranks) of each restart: every rank of a re-formed job writes one resume record."""
    out: list[tuple[int, set[int]]] = []
    for r in records:
        if r["kind"] == "resume":
            if out and out[-1][0] == r["step"] and r["rank"] not in out[-1][1]:
                out[-1][1].add(r["rank"])
            else:
                out.append((r["step"], {r["rank"]}))
    return [(step, len(ranks)) for step, ranks in out]


def test_a_lost_host_is_survived_and_rejoins(tmp_path):
    """2 hosts x 1 rank, elastic 1:2: host b is killed (launcher and rank) after the step-10
    checkpoint; host a re-forms the job at world size 1 and resumes resharded from the latest
    checkpoint; b's `plait train` started again joins at the next membership change, the job
    re-forms at world size 2 from the then latest checkpoint, and both finish with exit 0 and,
    at every step either world logged, the undisturbed run's loss (same global batch)."""
    steps = 150  # world size 1 must still be training when b is back (~3-8 s from b's start)
    common = ["--steps", str(steps), "--save-every", "5", "--slow-rank", "0", "--slow-factor", "4"]
    reference = tmp_path / "undisturbed"
    done = subprocess.run(_plait_train(*common, "--run-dir", str(reference)), env=_env(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    want = _losses(reference)
    run_dir = tmp_path / "run"
    with Hosts(2) as hosts, open(tmp_path / "a.log", "w+") as log_a, open(tmp_path / "b.log", "w+") as log_b:
        # dead nodes leave the rendezvous after keep_alive_interval x keep_alive_max_attempt (3 s, not 15)
        args = _plait_train(*common, "--run-dir", str(run_dir), "--nproc", "1", "--nnodes", "1:2",
                            "--max-restarts", "3", "--rdzv-endpoint", hosts.endpoint(PORT),
                            "--rdzv-id", "plait-lost-host-test-5d1c",
                            "--rdzv-conf", "last_call_timeout=2,keep_alive_interval=1")  # fmt: skip
        a = hosts.popen(0, args, _env(), stdout=log_a, stderr=subprocess.STDOUT)
        hosts.popen(1, args, _env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(
            run_dir, lambda rs: any(r["kind"] == "step" and r["rank"] == 1 and r["step"] >= 12 for r in rs), a
        )
        lost_at = time.monotonic()
        hosts[1].kill()
        _wait_for(run_dir, lambda rs: len(_resumes(rs)) >= 1, a)
        resumed_at = time.monotonic()
        b = hosts.popen(1, args, _env(), stdout=log_b, stderr=subprocess.STDOUT)
        _wait_for(run_dir, lambda rs: len(_resumes(rs)) >= 2, a)
        rejoined_at = time.monotonic()
        a.wait(timeout=120)
        b.wait(timeout=60)
        for job, log in ((a, log_a), (b, log_b)):
            log.seek(0)
            assert job.returncode == 0, log.read()[-3000:]
    records = read_metrics(run_dir)
    resumes = _resumes(records)
    assert len(resumes) == 2 and resumes[0] in ((10, 1), (15, 1)), resumes
    assert resumes[1][1] == 2 and resumes[0][0] < resumes[1][0] < steps and resumes[1][0] % 5 == 0, resumes
    ranks = {r["rank"] for r in records if r["kind"] == "step" and r["step"] == steps - 1}
    assert ranks == {0, 1}  # world size 2 did the last step
    logged = [(r["step"], r["loss"]) for r in records if r["kind"] == "step" and r["rank"] == 0]
    assert_close([loss for _, loss in logged], [want[step] for step, _ in logged], rtol=1e-5, atol=1e-6)
    print(f"\nlost host: {resumed_at - lost_at:.1f} s from the kill to the resumed world of 1; back: "
          f"{rejoined_at - resumed_at:.1f} s from b's start to the world of 2 (resumes {resumes}); "
          f"final loss {logged[-1][1]:.4f} vs undisturbed {want[-1]:.4f}")  # fmt: skip
