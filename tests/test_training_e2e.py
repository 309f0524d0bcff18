"""Ray Train runs of the k-SCST loop on a tiny model: concurrency and recovery from a failure."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from emorl_ray.rundir import RunDir
from emorl_ray.testing import FailOnce, KillScorersOnce

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_with_scorers(tiny_causal, tmp_path_factory):
    import ray
    from conftest import start_local_ray, tiny_raw_config
    from ray import serve

    from emorl_ray.config import parse_config
    from emorl_ray.rewards.serve import deploy_scorers

    # 8 steps: time enough to kill a worker between its first checkpoint and its end.
    cfg = parse_config(tiny_raw_config(tiny_causal, tmp_path_factory.mktemp("runs"), max_steps=8, val_every=2,
                                       max_failures=1))
    start_local_ray()
    serve.start(proxy_location="Disabled")  # handles only: no port 8000
    deploy_scorers(cfg)
    yield cfg
    ray.shutdown()


@pytest.fixture(scope="module")
def clean_overlap(ray_with_scorers, tmp_path_factory):
    """The fixture experiment's undisturbed "overlap" run: what a disturbed one must end like."""
    from emorl_ray.training.launch import TrainJob, fit

    return fit(ray_with_scorers, RunDir.at(tmp_path_factory.mktemp("clean")), TrainJob("overlap", {"overlap": 1.0}, 0))


def _train_worker_pids() -> list[int]:
    """Processes of Ray Train workers on this host (Ray titles them `ray::RayTrainWorker...`)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def test_sigkilled_worker_resumes_with_the_same_counters(ray_with_scorers, clean_overlap, tmp_path):
    """SIGKILL the training worker's process once it has saved a checkpoint: Ray Train restarts the
    worker, the loop resumes from that checkpoint, nothing is counted twice, and since sampling is
    seeded per step the resumed run equals the uninterrupted one."""
    import os
    import signal
    import threading
    import time

    from emorl_ray.training.launch import TrainJob, fit

    cfg, clean = ray_with_scorers, clean_overlap
    job = TrainJob("overlap", {"overlap": 1.0}, seed=0)
    result = {}
    runner = threading.Thread(target=lambda: result.update(m=fit(cfg, RunDir.at(tmp_path / "killed"), job)))
    runner.start()
    storage = tmp_path / "killed" / "ray" / f"train-{job.run_name}"
    killed = []
    deadline = time.time() + 300
    while not killed and runner.is_alive() and time.time() < deadline:
        if any(storage.glob("checkpoint_*")):
            killed = _train_worker_pids()
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    runner.join(timeout=600)
    assert killed, "the run ended before its worker could be killed"
    assert all(not Path(f"/proc/{pid}").exists() for pid in killed)
    failed = result["m"]
    for key in ("steps", "data_points", "final_val_score", "converged"):
        assert getattr(failed, key) == getattr(clean, key), key
    assert clean.steps == 8 and clean.data_points == 16
    a = pq.read_table(clean.metrics_path).to_pylist()
    b = pq.read_table(failed.metrics_path).to_pylist()
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no step logged twice
    assert [r["reward"] for r in a if r["kind"] == "train"] == [r["reward"] for r in b if r["kind"] == "train"]


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(ray_with_scorers, clean_overlap, tmp_path):
    """The worker fails after step 4 and leaves the step-4 checkpoint truncated: the restart detects it
    by its checksums, resumes from step 2, and ends exactly like an uninterrupted run."""
    from emorl_ray.training.launch import TrainJob, fit

    cfg = ray_with_scorers
    job = TrainJob("overlap", {"overlap": 1.0}, seed=0)
    clean = clean_overlap
    marker = tmp_path / "failed-once"
    storage = tmp_path / "failed" / "ray" / f"train-{job.run_name}"
    failed = fit(cfg, RunDir.at(tmp_path / "failed"), job,
                 hooks=[FailOnce(step=4, marker=str(marker), corrupt_checkpoints_in=str(storage))])
    assert marker.exists()
    for key in ("steps", "data_points", "final_val_score", "converged"):
        assert getattr(failed, key) == getattr(clean, key), key
    a = pq.read_table(clean.metrics_path).to_pylist()
    b = pq.read_table(failed.metrics_path).to_pylist()
    assert [r["step"] for r in a] == [r["step"] for r in b]  # steps 3-4 trained again, logged once
    assert [r["reward"] for r in a if r["kind"] == "train"] == [r["reward"] for r in b if r["kind"] == "train"]
    assert len([p for p in storage.glob("checkpoint_*") if p.is_dir()]) == cfg.training.keep_checkpoints


def test_scorer_replica_killed_mid_training_is_replaced(ray_with_scorers, clean_overlap, tmp_path):
    """At step 2 the trainer kills its scorer's replica: Serve starts a new one, the trainer's
    calls are retried, and the run ends exactly like an undisturbed one."""
    from emorl_ray.rewards.serve import app_name, serve_replicas
    from emorl_ray.training.launch import TrainJob, fit

    cfg = ray_with_scorers
    job = TrainJob("overlap", {"overlap": 1.0}, seed=0)
    clean = clean_overlap
    before = serve_replicas(app_name("overlap"))
    marker = tmp_path / "killed-once"
    killed = fit(cfg, RunDir.at(tmp_path / "killed"), job,
                 hooks=[KillScorersOnce(step=2, marker=str(marker))])
    assert marker.exists()
    after = serve_replicas(app_name("overlap"))
    assert len(after) == len(before) and not set(after) & set(before)  # replaced, not the same actors
    for key in ("steps", "data_points", "final_val_score"):
        assert getattr(killed, key) == getattr(clean, key), key
    a = pq.read_table(clean.metrics_path).to_pylist()
    b = pq.read_table(killed.metrics_path).to_pylist()
    assert [r["reward"] for r in a if r["kind"] == "train"] == [r["reward"] for r in b if r["kind"] == "train"]
    assert all(r["scorer_retries"] == 0 for r in b if r["kind"] == "train")  # the router went to the new replica


def test_a_call_interrupted_by_a_lost_replica_is_retried_and_counted(ray_with_scorers):
    """A scorer replica dies while it is scoring a call: the call fails, `ServeRewards` resends it
    to the replica Serve starts instead, and counts the retry (the training loop logs the count)."""
    import dataclasses
    import threading
    import time

    from emorl_ray.config import ScorerConfig
    from emorl_ray.rewards.serve import ServeRewards, app_name, deploy_scorers, serve_replicas
    from emorl_ray.testing import kill_serve_replicas

    cfg = dataclasses.replace(ray_with_scorers, objectives={**ray_with_scorers.objectives})
    cfg.objectives["slow"] = dataclasses.replace(
        cfg.objectives["overlap"],
        scorer=ScorerConfig(type="python", function="emorl_ray.testing:slow_word_overlap", num_cpus=0.05))
    deploy_scorers(cfg, ["slow"])
    rewards = ServeRewards(["slow"], retries=3)
    prompts, responses = ["I feel stuck at work"] * 4, ["stuck at work", "no", "I feel", "work work"]
    result = {}
    call = threading.Thread(target=lambda: result.update(s=rewards.score_all(prompts, responses)))
    before = serve_replicas(app_name("slow"))
    call.start()
    time.sleep(0.5)  # the replica is inside its 1.5 s call
    kill_serve_replicas([app_name("slow")])
    call.join(timeout=120)
    assert rewards.retried >= 1 and not set(serve_replicas(app_name("slow"))) & set(before)
    assert result["s"] == {"slow": [1.0, 0.0, 1.0, 1.0]}


def test_objectives_train_concurrently_and_rerun_is_skipped(ray_with_scorers, clean_overlap, tmp_path):
    from emorl_ray.training.launch import single_objective_jobs, train_runs

    cfg = ray_with_scorers
    manifests = train_runs(cfg, RunDir.at(tmp_path), single_objective_jobs(cfg))
    assert {m.name for m in manifests} == {"overlap", "brevity"}
    # Trained beside another run, a run ends as it does alone.
    (overlap,) = [m for m in manifests if m.name == "overlap"]
    alone = pq.read_table(clean_overlap.metrics_path).to_pylist()
    beside = pq.read_table(overlap.metrics_path).to_pylist()
    assert [r["reward"] for r in beside if r["kind"] == "train"] == [r["reward"] for r in alone if r["kind"] == "train"]
    runs = json.loads((tmp_path / "training" / "manifest.json").read_text())["runs"]
    assert runs == [m.to_dict() for m in manifests]
    again = train_runs(cfg, RunDir.at(tmp_path), single_objective_jobs(cfg))  # finished runs are not redone
    assert again == manifests


def test_training_progress_reaches_the_ray_metrics_agent(ray_with_scorers, tmp_path):
    """The custom metrics the dashboard charts (emorl_ray.metrics), scraped from the node's Prometheus
    endpoint while a run is held after its 4th step. Read live: a worker sends its metrics to the
    node's agent every few seconds, so a finished run's last values can end with its process."""
    import re
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from emorl_ray.testing import WaitAt
    from emorl_ray.training.launch import TrainJob, fit

    job = TrainJob("overlap", {"overlap": 1.0}, seed=7)  # a run label no other test's run has
    release = tmp_path / "release"
    pool = ThreadPoolExecutor(max_workers=1)
    run = pool.submit(fit, ray_with_scorers, RunDir.at(tmp_path), job, [WaitAt(step=4, release=str(release))])
    node = ray._private.worker.global_worker.node
    url = f"http://{node.node_ip_address}:{node.metrics_export_port}/metrics"
    wanted = {"ray_emorl_train_step", "ray_emorl_train_reward", "ray_emorl_val_score",
              "ray_emorl_train_data_points_total", "ray_emorl_tokens_per_second"}
    found: dict = {}
    try:
        deadline = time.time() + 240  # the run's start, then the agent's export interval
        while time.time() < deadline and not run.done() and not (
                wanted <= set(found) and found["ray_emorl_train_step"] >= 4):
            text = urllib.request.urlopen(url, timeout=10).read().decode()
            for name, labels, value in re.findall(r'^(ray_emorl_\w+)\{([^}]*)\} (\S+)$', text, re.M):
                if f'run="{job.run_name}"' in labels:
                    found[name] = float(value)
            time.sleep(1)
    finally:
        release.touch()
        pool.shutdown(wait=False)
    assert wanted <= set(found), f"missing {wanted - set(found)}"
    assert found["ray_emorl_train_step"] == 4  # the steps done before the hold
    assert found["ray_emorl_train_data_points_total"] == 8 and found["ray_emorl_tokens_per_second"] > 0
    assert run.result(timeout=300).steps == 8  # released, the run goes on to its end


def _config(base, **changes):
    """The fixture's experiment with `changes` (dotted keys) applied, same scorers."""
    from emorl_ray.config import config_from_dict

    raw = base.to_dict()
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = value
    return config_from_dict(raw)


def test_uniform_and_dynaopt_baselines_train_as_full_fine_tunes(ray_with_scorers, tmp_path):
    from transformers import AutoModelForCausalLM

    from emorl_ray.training.launch import baseline_jobs, train_runs

    cfg = _config(ray_with_scorers, **{"baselines.methods": ["uniform", "dynaopt"], "baselines.full_finetune": True,
                                       "training.max_steps": 4})
    runs = {m.name: m for m in train_runs(cfg, RunDir.at(tmp_path), baseline_jobs(cfg))}
    assert set(runs) == {"uniform", "dynaopt"}
    for m in runs.values():
        assert not m.lora and m.steps == 4 and m.data_points == 8
        AutoModelForCausalLM.from_pretrained(m.model_path)  # a plain from_pretrained directory
        rows = pq.read_table(m.metrics_path).to_pylist()
        val = [r for r in rows if r["kind"] == "val"]
        assert all(r["val/overlap"] is not None and r["val/brevity"] is not None for r in val)
    train_rows = [r for r in pq.read_table(runs["uniform"].metrics_path).to_pylist() if r["kind"] == "train"]
    assert all(r["weight/overlap"] == r["weight/brevity"] == 0.5 for r in train_rows)
    dyn = [r for r in pq.read_table(runs["dynaopt"].metrics_path).to_pylist() if r["kind"] == "train"]
    assert all(abs(r["weight/overlap"] + r["weight/brevity"] - 1) < 1e-9 for r in dyn)

    # The evaluator loads a fully fine-tuned baseline on demand and decodes it like the others
    # (the ensemble's adapters need not be trained for that).
    from ray import serve
    from test_ensemble import _random_adapters

    from emorl_ray.ensemble.deployment import APP_NAME, deploy_evaluator

    _, adapters = _random_adapters(cfg.model.id, tmp_path / "adapters", names=("overlap", "brevity"))
    deploy_evaluator(cfg, adapters)
    try:
        handle = serve.get_app_handle(APP_NAME)
        full = handle.evaluate.remote(None, "test", 4, True, runs["uniform"].model_path).result()
        base = handle.evaluate.remote(None, "test", 4, True).result()
        assert full["n"] == base["n"] == len(full["responses"]) and set(full["per_objective"]) == {"overlap", "brevity"}
        mixed = handle.evaluate.remote({"overlap": 1.0}, "test", 4, True, None, "logit").result()  # brevity: 0
        assert mixed["n"] == base["n"]
    finally:
        serve.delete(APP_NAME)


def test_two_workers_train_one_adapter_with_ddp(ray_with_scorers, tmp_path):
    """num_workers > 1: DDP over the adapter parameters, each worker its share of the batch."""
    from emorl_ray.training.launch import TrainJob, fit

    # Checkpoints through a storage URI (file:// here; s3:// or gs:// on a cluster).
    cfg = _config(ray_with_scorers, **{"training.scaling.num_workers": 2, "training.scaling.cpus_per_worker": 0.25,
                                       "training.max_steps": 2, "training.storage_path": f"file://{tmp_path}/store"})
    m = fit(cfg, RunDir.at(tmp_path), TrainJob("overlap", {"overlap": 1.0}, seed=0))
    assert m.steps == 2 and m.data_points == 2 * 2 * 2  # steps x batch x workers
    rows = pq.read_table(m.metrics_path).to_pylist()
    assert [r["step"] for r in rows if r["kind"] == "val"] == [2]
    assert m.ray_checkpoint.startswith(str(tmp_path / "store"))


def test_faithful_training_runs_on_to_the_end_of_the_epoch(ray_with_scorers, tmp_path):
    """The authors' convergence flag only ended the epoch (docs/method.md §8.7): the counters reported are
    those at convergence, the adapter saved is the one at the epoch's end."""
    from emorl_ray.training.launch import TrainJob, fit

    cfg = _config(ray_with_scorers, **{"faithful": True, "data.limit": 20, "training.max_steps": 30,
                                       "training.convergence": {"window": 2, "threshold": 100.0}})
    m = fit(cfg, RunDir.at(tmp_path), TrainJob("brevity", {"brevity": 1.0}, seed=0))
    # 20 rows -> 16 training prompts -> 8 steps an epoch at batch 2; converged at the 2nd validation.
    assert m.converged and (m.steps, m.data_points) == (4, 8)
    assert (m.trained_steps, m.trained_data_points) == (8, 16)
