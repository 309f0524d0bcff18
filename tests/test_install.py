"""scripts/install.sh, with a stand-in for .venv's python that records what pip is asked, and
answers which torch the venv holds: the real pip run is what CI's fresh install exercises."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Records every pip call and the constraint files it gets; says which torch is installed
# ($TORCH_HAVE; none when unset) the way the script asks, through importlib.metadata.
FAKE_PYTHON = """#!/usr/bin/env bash
here=$(dirname "$0")/../..
if [[ $1 == -m && $2 == pip ]]; then
  echo "pip ${*:3}" >> "$here/pip-calls.log"
  args=("$@")
  for ((i = 0; i < ${#args[@]}; i++)); do
    [[ ${args[i]} == -c ]] && cat "${args[i + 1]}" >> "$here/constraints-given.txt"
  done
  exit 0
fi
if [[ $1 == -c && $2 == *importlib.metadata* ]]; then
  [[ -n ${TORCH_HAVE:-} ]] || exit 1
  echo "$TORCH_HAVE"
  exit 0
fi
echo "emorl-ray ready (stand-in)"
"""


def run_install(tmp_path: Path, torch_have: str | None) -> tuple[str, list[str]]:
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "install.sh", tmp_path / "scripts")
    shutil.copy(ROOT / "constraints-cpu.txt", tmp_path)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    env = {k: v for k, v in os.environ.items() if k != "TORCH_HAVE"}
    if torch_have:
        env["TORCH_HAVE"] = torch_have
    out = subprocess.run(["bash", "scripts/install.sh", "--test"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    pins = [line for line in (tmp_path / "constraints-given.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    return out, pins


def test_a_venv_without_torch_gets_the_pinned_one(tmp_path):
    out, pins = run_install(tmp_path, None)
    assert "torch==2.13.0" in pins and "ray==2.60.0" in pins
    assert "keeping torch" not in out and "ready" in out
    assert "-e .[test]" in (tmp_path / "pip-calls.log").read_text()


@pytest.mark.parametrize("have", ["2.11.0+cu130", "2.14.1"])
def test_a_torch_installed_first_is_kept(tmp_path, have):
    """A GPU node's CUDA build, installed into .venv before the script: the pin must not replace it."""
    out, pins = run_install(tmp_path, have)
    assert [p for p in pins if p.startswith("torch")] == [f"torch=={have}"]
    assert "ray==2.60.0" in pins and "peft==0.21.2" in pins  # the rest of the known-good set stays
    assert f"keeping torch {have} from .venv" in out


def test_the_pinned_torch_already_there_is_no_news(tmp_path):
    out, pins = run_install(tmp_path, "2.13.0+cpu")
    assert [p for p in pins if p.startswith("torch")] == ["torch==2.13.0+cpu"]
    assert "keeping torch" not in out
