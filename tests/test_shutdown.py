"""A finished run exits 0: a 2-rank script that ends with ``plait.shutdown()``, many times, beside a busy core.

Before the fix 1 run of 14 (`plait launch -n 2`, one core kept busy) lost a rank to SIGABRT
("terminate called without an active exception") in interpreter teardown. The ranks here are real
interpreters (not the harness's forked workers, which end with ``os._exit`` and so never tear
down), joined through a store this process hosts as torchrun's agent would.
"""

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch.distributed as dist

SCRIPT = Path(__file__).parent / "scripts" / "shutdown_script.py"
ROOT = str(Path(__file__).parents[1])


def _job(*args: str) -> list[subprocess.CompletedProcess]:
    """One 2-rank run of the script; each run its own keys (a run id), as torchrun gives each job."""
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
    common = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2",
              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port),
              "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": uuid.uuid4().hex}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            env={**common, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outputs = [p.communicate(timeout=120) for p in ranks]
    return [subprocess.CompletedProcess(p.args, p.returncode, *out) for p, out in zip(ranks, outputs)]


@pytest.fixture
def busy_core():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    spinner.kill()
    spinner.wait()


def test_a_script_ending_with_shutdown_exits_0_every_time(busy_core, tmp_path):
    """30 runs; the ranks fork from one interpreter that imported torch (the import is most of a run's
    cost), then each runs the script and tears down on its own (tests/scripts/shutdown_zygote.py)."""
    stderr = open(tmp_path / "stderr", "w+")  # noqa: SIM115 - read back at the end
    zygote = subprocess.Popen(
        [sys.executable, str(SCRIPT.parent / "shutdown_zygote.py"), str(SCRIPT)],
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
    )  # fmt: skip
    codes = []
    try:
        for _ in range(30):
            store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, wait_for_workers=False)
            zygote.stdin.write(f"{store.port} {uuid.uuid4().hex}\n")
            zygote.stdin.flush()
            codes.append(zygote.stdout.readline().split())
            del store
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=60)
    stderr.seek(0)
    assert codes == [["0", "0"]] * 30, f"{codes}\n{stderr.read()[-3000:]}"


def test_the_exit_status_survives_the_shortcut():
    raised, exited = _job("raise"), _job("exit5")
    assert [d.returncode for d in raised] == [1, 1]
    assert "RuntimeError: a failure after shutdown" in raised[0].stderr
    assert [d.returncode for d in exited] == [5, 5]
