"""The `emorl` console command (pyproject's [project.scripts]) and its job scripts: each command is
reachable, and a bad invocation exits 2 with what is wrong, before anything starts."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMORL = Path(sys.executable).parent / "emorl"


def _run(*args):
    return subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["run", "evaluate", "serve", "train-objective", "train-scorer", "train-router"])
def test_every_command_has_help(command):
    out = _run(EMORL, command, "--help")
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr


def test_unknown_command_and_bad_run_directory_exit_2():
    out = _run(EMORL, "trian")
    assert out.returncode == 2 and "unknown command 'trian'" in out.stderr
    out = _run(EMORL, "evaluate", "/nonexistent/run")
    assert out.returncode == 2 and "holds no run" in out.stderr
    # The job script is the same command (what `ray job submit -- python jobs/evaluate.py` runs).
    out = _run(sys.executable, "jobs/evaluate.py", "/nonexistent/run")
    assert out.returncode == 2 and "holds no run" in out.stderr
