"""The weight search against a real ensemble deployment (tiny model, Serve scorers, Tune)."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import start_local_ray, tiny_raw_config

pytestmark = pytest.mark.e2e


def test_cube_search_scores_the_origin_and_reports_the_weights_used(tiny_causal, tmp_path):
    """The authors' cube holds w = 0: it decodes empty responses, scored low but finite, so a
    sub-box with the origin can still win; the result says which weights the decoder applied."""
    import ray
    from ray import serve
    from test_ensemble import _random_adapters

    from emorl_ray.config import parse_config
    from emorl_ray.ensemble.deployment import APP_NAME, evaluator_app
    from emorl_ray.rewards.serve import deploy_scorers
    from emorl_ray.search.run import run_search

    raw = tiny_raw_config(tiny_causal, tmp_path / "runs")
    raw["search"].update(parameterization="cube", levels=1)
    cfg = parse_config(raw)
    _, adapters = _random_adapters(tiny_causal, tmp_path, names=("overlap", "brevity"))
    start_local_ray()
    try:
        deploy_scorers(cfg, alongside=[evaluator_app(cfg, adapters)])
        handle = serve.get_app_handle(APP_NAME)
        origin = handle.evaluate.remote({"overlap": 0.0, "brevity": 0.0}, "val", 4, True).result()
        assert origin["responses"] == [""] * len(origin["responses"])
        assert origin["mean"] == origin["mean"] and origin["weights_used"] == {"overlap": 0.0, "brevity": 0.0}
        scaled = handle.evaluate.remote({"overlap": 2.0, "brevity": 6.0}, "val", 4).result()
        assert scaled["weights_used"] == {"overlap": 0.25, "brevity": 0.75}
        result = run_search(cfg, cfg.run_dir, ["overlap", "brevity"])
        # A driver killed while Tune starts leaves tuner.pkl without an experiment state; a rerun
        # must search again rather than restore trials that have lost their config.
        exp = Path(cfg.run_dir.ray_storage) / "search-overlap-brevity"
        for f in exp.glob("experiment_state-*.json"):
            f.unlink()
        again = run_search(cfg, cfg.run_dir, ["overlap", "brevity"])
        assert again.trials == 9 and again.failed_trials == 0 and again.best_score == result.best_score
    finally:
        serve.shutdown()
        ray.shutdown()
    points = pq.read_table(Path(cfg.run_dir.search()) / "points.parquet").to_pylist()
    assert len(points) == 9 and all(p["score"] is not None for p in points)
    at_origin = next(p for p in points if p["w/overlap"] == 0 and p["w/brevity"] == 0)
    assert at_origin["score"] == pytest.approx(origin["mean"])
    for p in points:
        total = p["w/overlap"] + p["w/brevity"]
        if total:
            assert p["used/overlap"] == pytest.approx(p["w/overlap"] / total)
    saved = json.loads((Path(cfg.run_dir.search()) / "result.json").read_text())
    assert saved == result.to_dict() and result.weights_scale_invariant
    total = sum(result.best_weights.values())
    assert result.best_weights_used == pytest.approx({o: w / total for o, w in result.best_weights.items()})
