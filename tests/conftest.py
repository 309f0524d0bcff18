import contextlib
import os

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray Train's controller polls its workers every 2 s by default: on the tests' tiny runs (about a
# second of training each) that poll is a good part of each run's wall time (a report is taken up,
# and a finished run noticed, up to 2 s late). Every Ray Train run the tests start, in this process
# or in the job processes they launch with this environment, polls every 0.5 s instead.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")

import pytest  # noqa: E402

from emorl_ray.config import parse_config  # noqa: E402
from emorl_ray.testing import build_tiny_model  # noqa: E402

# Each process of the suite (pytest, or each pytest-xdist worker) and everything it starts keeps its
# Ray temp dir apart from any other Ray on the host (a developer's own `ray start`, say): the session
# dirs, and the address file that a `ray start` (or a `ray.cluster_utils.Cluster`) leaves and a
# plain `ray.init()`, like the job's, joins. Short: Ray's Unix sockets live under it (~107 bytes).
os.environ["RAY_TMPDIR"] = f"/tmp/rt-{os.environ.get('PYTEST_XDIST_WORKER', 'main')}"

# The test files that start Ray. With pytest-xdist (`pytest -n 2`, the README's command) they all
# run on one worker, one test after another, while the unit tests run on the other. Not two groups
# of them at once: tried, the suite took 16.6 min instead of 18.7 with each long Ray test about
# twice as long (the 2 cores are busier than pytest's own CPU time shows: Ray's processes are not its
# children), and the CLI cluster's head answered "No available agent" to `ray job submit` for 7 min
# (likely the other Ray's dashboard agent on the default port 52365 that the head's agent wanted;
# test_cluster_cli now gives each node its own).
# The controller schedules by test id, without the marks, hence a list.
RAY_TEST_FILES = frozenset({"test_cluster_cli.py", "test_gpu.py", "test_http.py", "test_pipeline_e2e.py",
                            "test_placement.py", "test_search_e2e.py", "test_search_tune.py", "test_storage.py",
                            "test_training_e2e.py"})


def pytest_runtest_setup(item):
    if item.get_closest_marker("e2e") and item.path.name not in RAY_TEST_FILES:
        pytest.fail(f"{item.path.name} has tests marked e2e (they start Ray): add it to RAY_TEST_FILES in "
                    "tests/conftest.py", pytrace=False)


class RayTestsApart:
    """pytest-xdist's scheduler hook (registered only where xdist is installed)."""

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "load":  # `-n N` alone; an explicit --dist is left to xdist
            return None
        from xdist.scheduler import LoadScopeScheduling

        class Scheduling(LoadScopeScheduling):
            """Every test its own unit, except one unit of all the Ray tests (it goes out first, the
            largest unit: the suite's critical path)."""

            def _split_scope(self, nodeid: str) -> str:
                return "ray" if nodeid.split("::")[0].rsplit("/", 1)[-1] in RAY_TEST_FILES else nodeid

        return Scheduling(config, log)


RAY_TESTS_LAST = ("test_cluster_cli.py",)


def pytest_collection_modifyitems(items):
    """The Ray tests that start several nodes of their own (`ray start`) run after the other Ray
    tests, when they have the machine to themselves: under `-n 2` the unit tests keep the other
    worker busy for the suite's first minutes, and three nodes sharing the 2 cores with them were
    slow. Measured with `pytest -n 2 --durations=40`: the node-loss test took 252 s run first, 109 s
    run last; the whole suite 1,222 s against 1,042 s in that pair of runs (a run here varies by
    about 100 s)."""
    items.sort(key=lambda item: item.path.name in RAY_TESTS_LAST)  # stable: the rest keep their order


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(RayTestsApart())


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_processes_with_env(entry: str) -> None:
    """SIGKILL every process whose environment holds `entry` ("KEY=VALUE"): the nodes a test started
    with `ray start` and all they spawned (they inherit its environment), and nothing else. Not `ray
    stop`: that stops every Ray on the host, a developer's own too."""
    import signal
    import time
    from pathlib import Path

    def matching() -> list[int]:
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if entry.encode() in (proc / "environ").read_bytes().split(b"\0"):
                        pids.append(int(proc.name))
                except OSError:  # gone, or not ours to read
                    pass
        return pids

    deadline = time.time() + 30
    while (pids := matching()) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)  # killed ones are zombies until reaped; a node may have started one more
    assert not pids, f"processes with {entry} still alive after 30 s: {pids}"


@contextlib.contextmanager
def emorl_serving(args: list[str], env: dict):
    """`emorl serve ARGS` in a subprocess, up to the line where it says where it serves; yields its
    output so far, then Ctrl-C (SIGINT), after which it must exit 0."""
    import signal
    import subprocess
    import sys
    import threading
    from pathlib import Path

    proc = subprocess.Popen([str(Path(sys.executable).parent / "emorl"), "serve", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a deploy that hangs ends the read below
    watchdog.start()
    try:
        lines = []
        for line in proc.stdout:  # until it says where it serves (or exits)
            lines.append(line)
            if "serving at" in line:
                break
        yield "".join(lines)
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    assert rc == 0


def start_local_ray(**kwargs) -> None:
    """The local Ray every end-to-end test runs on: the 2 CPUs of this machine, quiet."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False, **kwargs)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's server mode) on a free local port, for the length of the
    session; yields the environment that points the AWS SDK (pyarrow's S3 filesystem) at it. The
    tests pass it to the processes they start, and to the test's own process while it runs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request):
    """A fresh bucket on the test server; returns its s3:// URI. The test's environment points at the server."""
    import pyarrow.fs as pafs

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    import re

    name = ("emorl-" + re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()))[:50].strip("-")
    fs, _ = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")
    fs.create_dir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_causal(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "causal", "causal")


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "t5", "seq2seq")


def tiny_raw_config(model_dir, output_dir, **training) -> dict:
    """A complete experiment on a tiny model with cheap python scorers (seconds per stage)."""
    return {
        "name": "tiny",
        "output_dir": str(output_dir),
        "model": {"id": str(model_dir), "use_chat_template": False, "max_prompt_tokens": 32},
        "data": {"source": "demo", "max_val": 4, "max_test": 4},
        "objectives": {
            "overlap": {"scorer": {"type": "python", "function": "emorl_ray.testing:word_overlap",
                                   "num_cpus": 0.05}},
            "brevity": {"scorer": {"type": "python", "function": "emorl_ray.testing:brevity",
                                   "num_cpus": 0.05}},
        },
        "training": {"batch_size": 2, "k": 2, "max_new_tokens": 6, "max_steps": 4, "val_every": 2,
                     "lora": {"r": 2, "alpha": 4, "dropout": 0.0},
                     "scaling": {"num_workers": 1, "cpus_per_worker": 0.3}, **training},
        "search": {"levels": 2, "max_new_tokens": 6, "max_concurrent_trials": 2, "evaluator_cpus": 0.2},
        "evaluation": {"max_new_tokens": 6},
    }


def stub_finished_run(model_dir, tmp_path, serving: dict | None = None):
    """A run directory with its config and a training manifest (adapter paths that hold nothing):
    enough for the `emorl serve` checks that come before anything is loaded. Returns it."""
    import yaml

    from emorl_ray import storage
    from emorl_ray.rundir import RunManifest

    raw = tiny_raw_config(model_dir, tmp_path / "runs")
    raw["serving"] = serving or {}
    cfg = parse_config(raw)
    run_dir = cfg.run_dir
    storage.write_text(run_dir.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    run_dir.write_runs([RunManifest(name=o, seed=0, method="single", reward_weights={o: 1.0}, lora=True, steps=1,
                                    data_points=2, train_seconds=1.0, converged=False, trained_steps=1,
                                    trained_data_points=2, final_val_score=None, metrics_path="", ray_checkpoint="",
                                    adapter_path=str(tmp_path / o)) for o in cfg.objective_names])
    return run_dir


@pytest.fixture
def tiny_config(tiny_causal, tmp_path):
    return parse_config(tiny_raw_config(tiny_causal, tmp_path / "runs"))
