"""The whole pipeline on a tiny model through real Ray Train, Serve and Tune."""

import json

import pyarrow.parquet as pq
import pytest
from peft import PeftModel

from emorl_ray.models import Policy

pytestmark = pytest.mark.e2e


def test_pipeline_end_to_end_and_resume(tiny_config):
    from emorl_ray.pipeline import run

    summary = run(tiny_config)
    run_dir = tiny_config.run_dir
    assert summary["run_dir"] == str(run_dir)

    manifest = json.loads((run_dir / "training" / "manifest.json").read_text())["runs"]
    assert {m["name"] for m in manifest} == {"overlap", "brevity"}
    for m in manifest:
        assert m["steps"] == 4 and m["data_points"] == 8 and m["train_seconds"] > 0
        PeftModel.from_pretrained(Policy(tiny_config.model).model, m["adapter_path"])  # plain peft load
        rows = pq.read_table(m["metrics_path"]).to_pylist()
        assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]
        assert [r["step"] for r in rows if r["kind"] == "val"] == [2, 4]

    points = pq.read_table(run_dir / "search" / "points.parquet").to_pylist()
    assert len(points) == 4  # simplex, d = 2, 2 levels: 3 points, then 1 new midpoint
    assert all(p["score"] is not None for p in points)
    result = json.loads((run_dir / "search" / "result.json").read_text())
    assert result["best_score"] == max(p["score"] for p in points)

    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    methods = [m["method"] for m in metrics["methods"]]
    assert methods[0] == "base model" and "EMORL (searched weights)" in methods
    assert all(m["n_prompts"] == 4 for m in metrics["methods"])
    report = (run_dir / "report.md").read_text()
    assert "## Test results" in report and "EMORL (searched weights)" in report

    # Re-running the same experiment resumes: nothing is trained or searched again.
    trial_dirs = sorted(p.name for p in (run_dir / "ray" / "search").iterdir() if p.is_dir())
    again = run(tiny_config)
    assert again["best_weights"] == summary["best_weights"]
    assert sorted(p.name for p in (run_dir / "ray" / "search").iterdir() if p.is_dir()) == trial_dirs
    assert json.loads((run_dir / "training" / "manifest.json").read_text())["runs"] == manifest
