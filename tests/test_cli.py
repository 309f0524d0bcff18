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


def test_serve_refuses_a_port_in_use_before_starting_ray(tiny_causal, tmp_path):
    """`emorl serve` on its own local Ray checks it can listen on serving.host:serving.port first:
    Serve's proxy would fail to bind only after Ray and the replicas are up."""
    import os
    import socket

    from conftest import stub_finished_run

    run_dir = stub_finished_run(tiny_causal, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        out = subprocess.run([str(EMORL), "serve", "--run-dir", run_dir.location, "--port", str(port)], cwd=ROOT,
                             capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use); pass --port" in out.stderr
    assert "Ray" not in out.stderr  # refused before a local Ray was started


def test_serve_changes_only_how_the_run_is_served(tiny_causal, tmp_path):
    from conftest import stub_finished_run

    run_dir = stub_finished_run(tiny_causal, tmp_path)
    for bad, words in ((["--set", "model.id=gpt2"], "--set model.id: emorl serve changes only how the run is served"),
                       (["--set", "objectives.overlap.scorer.function=os:getcwd"], "--set objectives.overlap.scorer"),
                       (["--set", "serving.num_gpus"], "--set 'serving.num_gpus': expected KEY=VALUE"),
                       (["--set", "serving.num_gpus=-1"], "serving.num_gpus")):
        out = _run(EMORL, "serve", "--run-dir", run_dir.location, *bad)
        assert out.returncode == 2 and words in out.stderr, (bad, out.stderr[-2000:])
        assert "Ray" not in out.stderr


def test_the_ray_joined_is_ray_address_else_a_live_ray_start_on_this_machine(tmp_path, monkeypatch, caplog):
    """`ray_to_join` follows a plain `ray.init()`: RAY_ADDRESS, else the address `ray start` left
    in the Ray temp dir; an address where nothing listens (a Ray stopped without `ray stop`) is
    not joined (ray.init() would hang in retries for minutes): the job starts its own."""
    import socket

    from conftest import free_port

    from emorl_ray.pipeline import ray_to_join

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_to_join() is None
    port = free_port()
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}")
    assert ray_to_join() is None
    assert f"nothing listens at 127.0.0.1:{port}" in caplog.text
    with socket.create_server(("127.0.0.1", port)):
        assert ray_to_join() == f"127.0.0.1:{port}"
        monkeypatch.setenv("RAY_ADDRESS", "10.0.0.9:6379")
        assert ray_to_join() == "10.0.0.9:6379"
