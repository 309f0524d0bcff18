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
from conftest import free_port, kill_processes_with_env, tiny_raw_config

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
        # Each node's dashboard agent on a port of its own: they all default to 52365, and on one
        # host the first to bind it wins. Where a worker's agent (or another Ray's) beat the head's,
        # the head had no agent and `ray job submit` got "No available agent" for as long as it tried.
        return subprocess.Popen([ray_cli, "start", *args, f"--dashboard-agent-listen-port={free_port()}"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def started(*procs):
        for p in procs:
            out = p.communicate(timeout=180)[0]
            assert p.returncode == 0, out.decode()[-3000:]

    try:
        started(start("--head", f"--port={gcs}", "--num-cpus=1", "--dashboard-host=127.0.0.1",
                      f"--dashboard-port={dash}", f"--temp-dir={temps[0]}"))
        started(*[start(f"--address=127.0.0.1:{gcs}", "--num-cpus=1", '--resources={"trainer_node": 1}',
                        f"--temp-dir={t}") for t in temps[1:]])  # the two workers join at once
        yield {"env": env, "ray": ray_cli, "dashboard": f"http://127.0.0.1:{dash}", "gcs": gcs,
               "worker_temps": temps[1:]}
    finally:
        kill_processes_with_env(f"RAY_AUTH_TOKEN={token}")  # this cluster's processes, no other Ray's
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
    lines = check.stdout.splitlines()  # the report is the indented JSON between a "{" and a "}" line
    checked_on = json.loads("\n".join(lines[lines.index("{"):lines.index("}") + 1]))["ray"]
    assert checked_on["joined"] and checked_on["address"].endswith(f":{cli_cluster['gcs']}"), check.stdout

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


def test_emorl_serve_on_a_node_of_a_running_ray_joins_it_and_leaves_it_as_found(tiny_causal, tmp_path):
    """Where `ray start` runs on the machine (a cluster's head, say), `emorl serve` joins that Ray
    as a plain `ray.init()` would, without RAY_ADDRESS: it refuses a replica that none of its nodes
    can hold (Serve would wait for it forever) and an address other than that of its running Serve,
    does not refuse the port that Serve listens on, and at Ctrl-C leaves the Serve application
    that was there before it."""
    import textwrap
    import urllib.error
    import urllib.request

    from conftest import emorl_serving, stub_finished_run
    from test_ensemble import _random_adapters
    from test_http import _post

    bin_dir = Path(sys.executable).parent
    rt = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # where `ray start` leaves the address ray.init() joins
    # As on a machine where `ray get-auth-token --generate` made a token: the head turns token auth
    # on, and what joins it finds the token in the file, with RAY_AUTH_MODE unset.
    Path(rt, "auth_token").write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")} | {
        "RAY_TMPDIR": rt, "RAY_AUTH_TOKEN_PATH": f"{rt}/auth_token", "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    port = free_port()
    other = textwrap.dedent(f"""
        import ray
        from ray import serve
        ray.init(logging_level="ERROR")
        serve.start(http_options={{"host": "127.0.0.1", "port": {port}}})
        @serve.deployment(ray_actor_options={{"num_cpus": 0.1}})
        class Other:
            def __call__(self, request):
                return "still here"
        serve.run(Other.bind(), name="other", route_prefix="/other")
    """)

    def get(path):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
            return r.read().decode()

    try:
        subprocess.run([str(bin_dir / "ray"), "start", "--head", f"--port={free_port()}", "--num-cpus=2",
                        "--include-dashboard=false"], env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([sys.executable, "-c", other], env=env, check=True, capture_output=True, timeout=300)
        assert get("/other") == "still here"

        run_dir = stub_finished_run(tiny_causal, tmp_path, serving={"port": port, "num_gpus": 1,
                                                                    "max_new_tokens": 8})
        _random_adapters(tiny_causal, tmp_path, names=("overlap", "brevity"))  # where the stub's manifest points
        emorl = [str(bin_dir / "emorl"), "serve", "--run-dir", run_dir.location]
        out = subprocess.run(emorl, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 2, out.stderr[-3000:]
        assert "config error: serving: one unit asks for {CPU: 1, GPU: 1}, but no node of this cluster" in out.stderr
        # The running Serve keeps its address: another port would be announced where nothing listens.
        out = subprocess.run(emorl + ["--set", "serving.num_gpus=0", "--port", str(free_port())], capture_output=True,
                             text=True, timeout=300, env=env)
        assert out.returncode == 2, out.stderr[-3000:]
        assert (f"config error: serving.host/serving.port: this cluster's Serve already listens on 127.0.0.1:{port}, "
                f"and a running Serve keeps its address; pass --host 127.0.0.1 --port {port}") in out.stderr
        with emorl_serving(["--run-dir", run_dir.location, "--set", "serving.num_gpus=0", "--set",
                            "serving.num_cpus=0.5"], env) as out:
            assert "serving at" in out, out[-3000:]
            status, answer = _post(f"http://127.0.0.1:{port}/emorl/generate",
                                   json.dumps({"prompts": ["hi"], "weights": [1, 1]}).encode())
            assert status == 200 and len(answer["responses"]) == 1
        assert get("/other") == "still here"  # the cluster's Serve and its other application stay up
        with pytest.raises(urllib.error.HTTPError, match="404"):  # only the endpoint is gone
            get("/emorl/generate")
    finally:
        kill_processes_with_env(f"RAY_TMPDIR={rt}")
        shutil.rmtree(rt, ignore_errors=True)
