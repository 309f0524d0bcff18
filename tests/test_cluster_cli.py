"""A multi-node cluster started with the `ray` CLI, exactly as the README's cluster section does:
a head and two worker nodes on this host (token auth on, custom resources), the job submitted with
`ray job submit --working-dir . -- python jobs/train_all.py ...`, its run directory on S3 (a real
S3-compatible server), and a whole worker node removed (its raylet SIGKILLed) while it trains.

Several nodes on one host: each gets its own `--temp-dir`. With a shared one, the worker node's
runtime-env agent deletes the job's unpacked working directory under the shared session
directory when its own last task there ends, while the driver on the head still runs in it
(`FileNotFoundError` from `os.getcwd()` at the end of the search). On a real cluster every host
has its own temp dir, so this is a property of the one-host test, not of the job.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import free_port, tiny_raw_config

from emorl_ray import storage
from emorl_ray.rundir import RunDir

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]


def _raylet_pids(temp_dir: str) -> list[int]:
    """The raylet of the node started with `temp_dir` (its command line names its session there)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/raylet") and any(temp_dir.encode() in c for c in cmd):
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def cli_cluster(s3_server):
    """Head (1 CPU) + two worker nodes (1 CPU and one `trainer_node` each), started by `ray start`
    from this environment (the job's `python` is the first on the PATH of the shell that started
    the node). Token auth: every node and the submitter carry the head's token."""
    ray_cli = str(Path(sys.executable).parent / "ray")  # installed with ray[...]: a missing one fails here
    token = secrets.token_hex(32)
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", TOKENIZERS_PARALLELISM="false",
               **s3_server)
    # Short paths: Ray's Unix sockets live under the temp dir and have a ~107-byte limit.
    temps = [tempfile.mkdtemp(prefix="rh", dir="/tmp"), tempfile.mkdtemp(prefix="rw", dir="/tmp"),
             tempfile.mkdtemp(prefix="rw", dir="/tmp")]
    gcs, dash = free_port(), free_port()

    def start(*args):
        subprocess.run([ray_cli, "start", *args], env=env, check=True, capture_output=True, timeout=180)

    try:
        start("--head", f"--port={gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
              f"--temp-dir={temps[0]}")
        for t in temps[1:]:
            start(f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"trainer_node": 1}', f"--temp-dir={t}")
        yield {"env": env, "ray": ray_cli, "dashboard": f"http://127.0.0.1:{dash}", "worker_temps": temps[1:]}
    finally:
        subprocess.run([ray_cli, "stop", "--force"], env=env, capture_output=True, timeout=120)
        for t in temps:
            shutil.rmtree(t, ignore_errors=True)


def test_job_submitted_to_a_cli_cluster_survives_losing_a_node(cli_cluster, tiny_causal, s3_bucket, tmp_path):
    env = cli_cluster["env"]
    raw = tiny_raw_config(tiny_causal, s3_bucket + "/runs", max_steps=8, val_every=2, max_failures=2)
    raw["training"]["scaling"]["resources"] = {"trainer_node": 1}
    cfg_file = tmp_path / "cluster.yaml"
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = RunDir.at(s3_bucket + "/runs/tiny")

    # The documented pre-flight: config, data, model, storage and resources, nothing trained.
    # Right after `ray start` the head's job agent may not be up yet; Ray answers "No available
    # agent to submit job, please try again later" (seen in CI): try again, for up to a minute.
    for _ in range(30):
        check = subprocess.run([cli_cluster["ray"], "job", "submit", "--address", cli_cluster["dashboard"],
                                "--working-dir", ".", "--", "python", "jobs/train_all.py", "--config", str(cfg_file),
                                "--check"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        if check.returncode == 0 or "No available agent" not in check.stderr:
            break
        time.sleep(2)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-3000:]
    assert '"training": "fits"' in check.stdout and not storage.exists(run.config)

    log = open(tmp_path / "job.log", "w")
    job = subprocess.Popen([cli_cluster["ray"], "job", "submit", "--address", cli_cluster["dashboard"],
                            "--working-dir", ".", "--", "python", "jobs/train_all.py", "--config", str(cfg_file)],
                           cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    # Remove a whole worker node once its trainer has saved a checkpoint: its raylet dies, and with it
    # the node's workers; Ray Train restarts that run from its checkpoint on a node that is left.
    victim = cli_cluster["worker_temps"][0]
    deadline, killed = time.time() + 600, False
    while time.time() < deadline and job.poll() is None and not killed:
        ckpts = [n for n in ("overlap", "brevity")
                 if any(name.startswith("checkpoint_")
                        for name, _ in storage.listdir(storage.join(run.ray_storage, f"train-{n}-s0")))]
        if ckpts:
            pids = _raylet_pids(victim)
            assert pids, "no raylet found for the worker node"
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.3)
    assert killed, (tmp_path / "job.log").read_text()[-3000:]
    rc = job.wait(timeout=900)
    log.close()
    out = (tmp_path / "job.log").read_text()
    assert rc == 0 and "Job 'raysubmit_" in out and "succeeded" in out, out[-5000:]
    assert "[FailurePolicy] RETRY" in out  # Ray Train saw the lost worker and restarted the run

    manifest = storage.read_json(run.manifest)["runs"]
    assert sorted(m["name"] for m in manifest) == ["brevity", "overlap"]
    for m in manifest:  # the counters of an uninterrupted run, whichever run lost its node
        assert (m["steps"], m["data_points"]) == (8, 16), json.dumps(m)
        rows = storage.read_parquet(m["metrics_path"])
        assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 9))  # no step twice
    assert storage.is_file(run.eval_metrics) and storage.is_file(run.file("report.html"))
    assert not (ROOT / "s3:").exists()
