"""A quiet start: `plait launch` gives each rank one thread itself, so torchrun prints no banner."""

import os
import shutil
import subprocess
import sys
from pathlib import Path


def test_launch_sets_one_thread_per_rank_without_torchrun_banner(tmp_path):
    script = Path(__file__).parent / "scripts" / "threads_script.py"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    done = subprocess.run(
        [sys.executable, "-m", "plait.cli", "launch", "-n", "2", str(script), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "OMP_NUM_THREADS" not in done.stderr + done.stdout
    for rank in range(2):
        assert (tmp_path / f"threads{rank}.txt").read_text() == "1 1\n"


def test_an_editable_install_prints_no_package_name_warning(tmp_path):
    """``make install`` builds plait editable; setuptools' import finder warned that "folders in your
    working directory with the same name as your package" may shadow it. Built here from a copy of the
    project with the installed setuptools, as pip's build backend hook would."""
    import pytest

    pytest.importorskip("setuptools.build_meta")
    root = Path(__file__).parent.parent
    project = tmp_path / "project"
    shutil.copytree(root / "plait", project / "plait", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, project / name)
    (tmp_path / "wheel").mkdir()
    build = f"import setuptools.build_meta as b; print(b.build_editable({str(tmp_path / 'wheel')!r}))"
    done = subprocess.run(
        [sys.executable, "-c", build], cwd=project, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "wheel" / done.stdout.split()[-1]).exists()
    assert "same name as your package" not in " ".join(done.stderr.split()), done.stderr[-3000:]
