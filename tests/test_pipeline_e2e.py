"""The whole pipeline on a tiny model through real Ray Train, Serve and Tune."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import start_local_ray, tiny_raw_config
from peft import PeftModel

from emorl_ray.models import Policy

pytestmark = pytest.mark.e2e


def test_pipeline_end_to_end_and_resume(tiny_causal, tmp_path, monkeypatch, request):
    import ray
    from ray import serve

    from emorl_ray.config import parse_config
    from emorl_ray.pipeline import run_pipeline

    secret = "emorl-test-secret-5f1c9a"  # a credential in the environment must not reach the run directory
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    # One local Ray for the whole test, which each job below joins as it would a cluster's (its Serve
    # apps are removed at its end). Starting and stopping Ray five times in one process is flaky on
    # Ray 2.60: a daemon forked while the last session's gRPC threads still run can abort before it
    # logs anything. The job's own local start is covered by the killed-driver test below.
    start_local_ray(runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    request.addfinalizer(ray.shutdown)

    raw = tiny_raw_config(tiny_causal, tmp_path / "runs")
    raw["baselines"] = {"methods": ["uniform", "dynaopt"]}
    other = tmp_path / "other.csv"  # a second data set, for the generalisation table
    other.write_text("prompt\n" + "".join(f"I keep worrying about thing number {i}.\n" for i in range(30)))
    raw["evaluation"]["generalization"] = {"source": "file", "path": str(other)}
    raw["search"]["compare_aggregations"] = ["parameter"]
    raw["search"]["router"] = True  # the per-prompt router as a stage, and its row in the tables
    tiny_config = parse_config(raw)
    summary = run_pipeline(tiny_config)
    assert serve.status().applications == {}  # the job's apps are gone; the cluster stays up
    run_dir = Path(tiny_config.run_dir.location)
    assert summary["run_dir"] == str(run_dir)

    manifest = json.loads((run_dir / "training" / "manifest.json").read_text())["runs"]
    assert {m["name"] for m in manifest} == {"overlap", "brevity", "uniform", "dynaopt"}
    for m in manifest:
        assert m["steps"] == 4 and m["data_points"] == 8 and m["train_seconds"] > 0
        PeftModel.from_pretrained(Policy(tiny_config.model).model, m["adapter_path"])  # plain peft load
        rows = pq.read_table(m["metrics_path"]).to_pylist()
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
        assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]

    points = pq.read_table(run_dir / "search" / "points.parquet").to_pylist()
    assert len(points) == 4  # simplex, d = 2, 2 levels: 3 points, then 1 new midpoint
    assert all(p["score"] is not None for p in points)
    # Every point keeps each validation prompt's scores, which the router learned from.
    assert all(len(p["prompt_scores/overlap"]) == 4 and len(p["prompt_scores/brevity"]) == 4 for p in points)
    assert summary["router"]["prompts"] == 4 and summary["router"]["vectors"] >= 2
    assert (run_dir / "router" / "router.json").is_file()
    result = json.loads((run_dir / "search" / "result.json").read_text())
    assert result["best_score"] == max(p["score"] for p in points)

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert [(t["split"], t["decoding"]) for t in metrics["tables"]] == [
        ("test", "greedy"), ("test", "sampled"), ("generalization", "greedy"), ("generalization", "sampled")]
    test, test_sampled, gen, _ = (t["methods"] for t in metrics["tables"])
    methods = [m["method"] for m in test]
    assert [m["method"] for m in test_sampled] == methods
    assert methods[0] == "base model" and "EMORL (searched weights)" in methods
    assert {"baseline: uniform", "baseline: dynaopt", "parameter aggregation (searched weights)"} <= set(methods)
    compared = json.loads((run_dir / "search" / "parameter" / "result.json").read_text())
    assert compared["aggregation"] == "parameter" and compared["trials"] == 4
    by_name = {m["method"]: m for m in test}
    assert by_name["baseline: uniform"]["train_data_points"] == 8  # its own run, not the objectives'
    assert by_name["ensemble, equal weights"]["train_data_points"] == 16
    routed = by_name["EMORL + router (weights per prompt)"]
    assert routed["train_seconds"] >= by_name["EMORL (searched weights)"]["train_seconds"]  # + the router's fit
    assert abs(sum(routed["weights"].values()) - 1) < 1e-6  # the mean of the weights it decoded with
    bandit = by_name["EMORL + bandit (online over the split)"]
    assert bandit["n_prompts"] == 4 and abs(sum(bandit["weights"].values()) - 1) < 1e-6
    assert [m["n_generations"] for m in test_sampled if m["method"] == bandit["method"]] == [4]
    assert [m["method"] for m in gen] == methods and all(m["n_prompts"] == 3 for m in gen)
    assert all(m["n_prompts"] == 4 for m in test)
    front = metrics["pareto"]["search"]["front"]
    assert front and metrics["pareto"]["search"]["points"] == 4
    report = (run_dir / "report.md").read_text()
    assert "## Test split, greedy decoding" in report and "EMORL (searched weights)" in report
    assert "## Generalisation" in report and "## Pareto view" in report
    assert summary["report"] == str(run_dir / "report.html") and (run_dir / "plots" / "pareto.png").exists()
    leaked = [str(p) for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked, f"the secret was written to {leaked}"

    # jobs/evaluate.py: some methods again, sampled only, two samples per prompt; nothing retrained.
    from emorl_ray.config import ConfigError
    from emorl_ray.pipeline import evaluate_run

    with pytest.raises(ConfigError, match="training.max_steps"):
        evaluate_run(str(run_dir), {"training.max_steps": 10})
    evaluate_run(str(run_dir), {"evaluation.methods": ["emorl", "baselines", "bandit"],
                                "evaluation.decodings": ["sampled"], "evaluation.samples_per_prompt": 2,
                                "evaluation.generalization": None})
    again_metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    (table,) = again_metrics["tables"]
    assert (table["split"], table["decoding"]) == ("test", "sampled")
    assert [m["method"] for m in table["methods"]] == ["EMORL (searched weights)", "baseline: uniform",
                                                       "baseline: dynaopt", "EMORL + bandit (online over the split)"]
    assert all(m["n_prompts"] == 4 and m["n_generations"] == 8 for m in table["methods"])
    assert json.loads((run_dir / "training" / "manifest.json").read_text())["runs"] == manifest

    # Re-running the same experiment resumes: nothing is trained or searched again.
    trial_dirs = sorted(p.name for p in (run_dir / "ray" / "search-overlap-brevity").iterdir() if p.is_dir())
    again = run_pipeline(tiny_config)
    assert again["best_weights"] == summary["best_weights"]
    assert sorted(p.name for p in (run_dir / "ray" / "search-overlap-brevity").iterdir() if p.is_dir()) == trial_dirs
    assert json.loads((run_dir / "training" / "manifest.json").read_text())["runs"] == manifest

    # Add an objective later: train its adapter into the run, then search over all three.
    from emorl_ray.pipeline import train_objectives

    raw["objectives"]["vowels"] = {"scorer": {"type": "python", "function": "emorl_ray.testing:vowel_start",
                                              "num_cpus": 0.05}}
    with pytest.raises(ConfigError, match="not only in the objectives"):  # a changed experiment is refused
        train_objectives(parse_config({**raw, "seed": 1}), ["vowels"])
    bigger = parse_config(raw)
    runs = train_objectives(bigger, ["vowels"])
    assert {m.name for m in runs} == {"overlap", "brevity", "uniform", "dynaopt", "vowels"}
    assert [m.to_dict() for m in runs if m.name != "vowels"] == manifest  # the earlier runs are kept as they were
    summary3 = run_pipeline(bigger)
    assert set(summary3["best_weights"]) == {"overlap", "brevity", "vowels"}
    points3 = pq.read_table(run_dir / "search" / "points.parquet").to_pylist()
    assert all("w/vowels" in p for p in points3) and len(points3) > len(points)


def test_killed_driver_resumes_from_an_s3_run_directory(tiny_causal, tmp_path, s3_bucket, s3_server, request):
    """The run directory on S3 (a real S3-compatible server). SIGKILL the whole job (driver and
    its local Ray) during the search, then `jobs/train_all.py --resume s3://...`: trainings and the
    trials Tune had saved are not redone; then `jobs/evaluate.py s3://...` re-reads the run.
    Meanwhile something else holds Serve's port 8000 (an `emorl serve` endpoint, say): the job
    serves nothing over HTTP and runs anyway."""
    import os
    import re
    import signal
    import socket
    import subprocess
    import sys
    import time

    import yaml

    from emorl_ray import storage
    from emorl_ray.rundir import RunDir

    try:
        request.addfinalizer(socket.create_server(("127.0.0.1", 8000)).close)
    except OSError:  # already held by something else, which does as well
        pass
    root = Path(__file__).resolve().parents[1]
    raw = tiny_raw_config(tiny_causal, s3_bucket + "/runs")
    raw["search"]["levels"] = 4  # 3 + 1 + 1 + 1 trials: time to be killed in the middle
    cfg_file = tmp_path / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    run = RunDir.at(s3_bucket + "/runs/tiny")
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", EMORL_CACHE=str(tmp_path / "cache"), **s3_server)
    first_log = tmp_path / "first.log"
    with open(first_log, "w") as log:
        proc = subprocess.Popen([sys.executable, "jobs/train_all.py", "--config", str(cfg_file)], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    trial_done = re.compile(r"search \(hidden_state\): trial \d+ done")
    deadline = time.time() + 420
    while time.time() < deadline and proc.poll() is None:
        if len(trial_done.findall(first_log.read_text())) >= 2:
            break
        time.sleep(0.5)
    time.sleep(2.5)  # Tune saves its experiment state every second here (search/run.py)
    assert proc.poll() is None, f"the job ended before it was killed:\n{first_log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before_kill = len(trial_done.findall(first_log.read_text()))
    assert 2 <= before_kill < 6 and not storage.exists(run.eval_metrics), first_log.read_text()[-3000:]
    assert not (root / "s3:").exists()  # nothing went to a local folder named after the URI
    manifest = storage.read_text(run.manifest)
    checkpoints = sorted(n for n, _ in storage.listdir(storage.join(run.ray_storage, "train-overlap-s0")))

    again = subprocess.run([sys.executable, "jobs/train_all.py", "--resume", run.location], cwd=root, env=env,
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert storage.read_text(run.manifest) == manifest  # nothing retrained
    assert sorted(n for n, _ in storage.listdir(storage.join(run.ray_storage, "train-overlap-s0"))) == checkpoints
    rerun = len(trial_done.findall(again.stderr))
    assert rerun <= 6 - before_kill + 1, again.stderr[-3000:]  # at most the trial in flight when killed
    points = storage.read_parquet(storage.join(run.search(), "points.parquet"))
    assert len(points) == 6 and storage.is_file(run.eval_metrics)
    assert storage.read_bytes(run.file("report.html")).startswith(b"<!doctype html>")

    evaluated = subprocess.run([sys.executable, "jobs/evaluate.py", run.location, "--methods", "emorl",
                                "--set", "evaluation.decodings=[greedy]"], cwd=root, env=env,
                               capture_output=True, text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    tables = storage.read_json(run.eval_metrics)["tables"]
    assert [(t["decoding"], [m["method"] for m in t["methods"]]) for t in tables] == [
        ("greedy", ["EMORL (searched weights)"])]
