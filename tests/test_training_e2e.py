"""Ray Train runs of the k-SCST loop on a tiny model: concurrency and recovery from a failure."""

import json

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ray_with_scorers(tiny_causal, tmp_path_factory):
    import ray
    from ray import serve

    from emorl_ray.config import parse_config
    from emorl_ray.rewards.serve import deploy_scorers
    from conftest import tiny_raw_config

    cfg = parse_config(tiny_raw_config(tiny_causal, tmp_path_factory.mktemp("runs"), max_steps=5, val_every=2,
                                       max_failures=1))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1"})
    deploy_scorers(cfg)
    yield cfg
    ray.shutdown()


def test_killed_worker_resumes_with_the_same_counters(ray_with_scorers, tmp_path):
    """A worker failing at step 3 restarts from the step-2 checkpoint; nothing is counted twice,
    and since sampling is seeded per step the resumed run equals the uninterrupted one."""
    from emorl_ray.training.launch import TrainJob, fit

    cfg = ray_with_scorers
    job = TrainJob("overlap", {"overlap": 1.0}, seed=0)
    clean = fit(cfg, tmp_path / "clean", job)
    marker = tmp_path / "failed-once"
    failed = fit(cfg, tmp_path / "failed", job, extra={"fail_at_step": 3, "fail_marker": str(marker)})
    assert marker.exists()  # the failure really happened
    for key in ("steps", "data_points", "final_val_score", "converged"):
        assert failed[key] == clean[key], key
    assert clean["steps"] == 5 and clean["data_points"] == 10
    a = pq.read_table(clean["metrics_path"]).to_pylist()
    b = pq.read_table(failed["metrics_path"]).to_pylist()
    assert [r["step"] for r in a] == [r["step"] for r in b]  # no step logged twice
    assert [r["reward"] for r in a if r["kind"] == "train"] == [r["reward"] for r in b if r["kind"] == "train"]


def test_objectives_train_concurrently_and_rerun_is_skipped(ray_with_scorers, tmp_path):
    from emorl_ray.training.launch import single_objective_jobs, train_all

    cfg = ray_with_scorers
    manifests = train_all(cfg, tmp_path, single_objective_jobs(cfg))
    assert {m["name"] for m in manifests} == {"overlap", "brevity"}
    runs = json.loads((tmp_path / "training" / "manifest.json").read_text())["runs"]
    assert runs == manifests
    again = train_all(cfg, tmp_path, single_objective_jobs(cfg))  # finished runs are not redone
    assert again == manifests
