"""The seed article's examples, corrected, run as a user would: `plait launch -n 2 examples/...`."""

import re
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parent.parent / "examples"


def _launch(script: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "launch", "-n", "2", str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_linear_replicas_stay_identical_and_converge():
    out = _launch("linear_two_ranks.py")
    for step in range(40):
        lines = re.findall(rf"step {step:2d} rank (\d): (w = \S+  b = \S+)", out)
        assert sorted(rank for rank, _ in lines) == ["0", "1"]
        assert lines[0][1] == lines[1][1], f"replicas differ at step {step}: {lines}"
    w, b = map(float, re.search(r"replicas identical: w = (\S+), b = (\S+)", out).groups())
    assert abs(w - 1) < 0.01 and abs(b + 1) < 0.02


def test_quadratic_uses_the_averaged_correct_gradient():
    out = _launch("quadratic.py")
    for rank in (0, 1):  # both start from rank 0's theta = 2 and step to 2 - 0.1 * 2(2 - 1) = 1.8
        assert f"step  1 rank {rank}: theta = 2.000000  grad = +2.000000" in out
        assert re.search(rf"step 10 rank {rank}: .* ->  theta = 1\.10737", out)  # 1 + 0.8**10
