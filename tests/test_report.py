"""Pareto filter and hypervolume, the evaluation's table rows, and the report built from a small
hand-made run directory (every section, every figure; rendered by headless Chromium when present)."""

import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_raw_config

from emorl_ray.config import parse_config
from emorl_ray.evaluation.methods import decode_key, methods_to_evaluate, result_row
from emorl_ray.evaluation.pareto import hypervolume, non_dominated, pareto_summary
from emorl_ray.evaluation.stats import per_prompt_means
from emorl_ray.rundir import EvalResult, RunManifest, SearchResult
from emorl_ray.storage import write_json, write_parquet


def test_non_dominated_on_a_known_set():
    pts = [(1, 0), (0, 1), (0.5, 0.5), (0.4, 0.4), (0.5, 0.5), (1, 0)]
    assert non_dominated(pts) == [0, 1, 2, 4, 5]  # (0.4, 0.4) is beaten by (0.5, 0.5); ties are kept
    assert non_dominated([(0.2, 0.3, 0.9), (0.2, 0.3, 0.8), (0.9, 0.1, 0.1)]) == [0, 2]
    assert non_dominated([]) == []


def test_hypervolume_by_hand():
    assert hypervolume([(1.0, 0.5), (0.5, 1.0)], (0, 0)) == pytest.approx(0.75)  # 0.5 + 0.5 - 0.25
    assert hypervolume([(0.5, 0.5)], (0.25, 0.0)) == pytest.approx(0.125)
    assert hypervolume([(0.5, 0.5), (0.4, 0.4)], (0, 0)) == pytest.approx(0.25)  # dominated adds nothing
    assert hypervolume([(0.2, 0.3, 0.5)], (0, 0, 0)) == pytest.approx(0.03)
    # Boxes of 0.5 and 0.25 overlapping in [0, .5]^3: 0.5 + 0.25 - 0.125
    assert hypervolume([(1, 1, 0.5), (0.5, 0.5, 1)], (0, 0, 0)) == pytest.approx(0.625)
    assert hypervolume([(-1, 2)], (0, 0)) == 0.0  # below the reference point in one objective
    # 4 objectives, by inclusion-exclusion: |A| + |B| - |A and B|, the intersection a box too
    a, b = (0.4, 0.4, 0.4, 0.4), (0.5, 0.5, 0.5, 0.2)
    inter = 0.4 * 0.4 * 0.4 * 0.2
    assert hypervolume([a, b], (0, 0, 0, 0)) == pytest.approx(0.4 ** 4 + 0.5 ** 3 * 0.2 - inter)


def test_pareto_summary_of_points_and_methods():
    obj = ["x", "y"]
    points = [{"w/x": 1, "w/y": 0, "score/x": 0.9, "score/y": 0.1},
              {"w/x": 0, "w/y": 1, "score/x": 0.1, "score/y": 0.9},
              {"w/x": 1, "w/y": 1, "score/x": 0.4, "score/y": 0.4},
              {"w/x": 2, "w/y": 1, "score/x": 0.3, "score/y": 0.3},   # dominated
              {"w/x": 1, "w/y": 2, "score/x": None, "score/y": None}]  # failed trial
    methods = [{"method": "a", "x": 0.5, "y": 0.5}, {"method": "b", "x": 0.4, "y": 0.4}]
    s = pareto_summary(points, obj, methods)
    assert s["search"]["points"] == 4
    assert [f["weights"] for f in s["search"]["front"]] == [{"x": 1, "y": 0}, {"x": 0, "y": 1}, {"x": 1, "y": 1}]
    # Union of the boxes under (.9,.1), (.1,.9), (.4,.4): .09 + .09 + .16 - .04 - .04 - .01 + .01
    assert s["search"]["hypervolume"] == pytest.approx(0.26)
    assert [r["non_dominated"] for r in s["methods"]["rows"]] == [True, False]
    assert s["methods"]["hypervolume"] == pytest.approx(0.25)


def test_per_prompt_means_and_result_row():
    # Two passes over three prompts: generation j * 3 + i belongs to prompt i.
    assert per_prompt_means([1, 2, 3, 3, 4, 5], 3) == [2, 3, 4]
    res = {"n": 4, "prompts": ["a b", "c d"] * 2, "responses": ["a b", "x y", "a b", "x z"],
           "scores": {"o1": [1.0, 0.0, 0.0, 0.0], "o2": [0.5, 0.5, 0.5, 0.5]}}
    cost = {"o1": (8, 2.0), "o2": (4, 1.0)}  # run -> (data points, seconds)
    row = result_row("m", {"weights": {"o1": 1, "o2": 1}, "runs": ["o1", "o2"]}, res, ["o1", "o2"], cost, 2)
    assert row["o1"] == pytest.approx(0.25) and row["o2"] == 0.5 and row["average"] == pytest.approx(0.375)
    assert row["edit_rate"] == pytest.approx(0.5 * 0 + 0.5 * 1)  # two copies, two full rewrites
    assert row["train_data_points"] == 12 and row["n_prompts"] == 2 and row["n_generations"] == 4


def test_methods_to_evaluate_groups():
    base = [RunManifest(name="uniform", seed=0, method="uniform", reward_weights={"a": 0.5, "b": 0.5}, lora=True,
                        steps=1, data_points=1, train_seconds=1.0, converged=False, trained_steps=1,
                        trained_data_points=1, final_val_score=None, metrics_path="", ray_checkpoint="",
                        adapter_path="/x")]
    all_ = methods_to_evaluate(["a", "b"], {"a": 1, "b": 0}, base, {"logit": {"a": 1, "b": 1}})
    assert list(all_) == ["base model", "single: a", "single: b", "ensemble, equal weights",
                          "EMORL (searched weights)", "logit aggregation (searched weights)", "baseline: uniform"]
    # The search needed every adapter trained, also the one whose weight came out 0.
    assert all_["EMORL (searched weights)"]["runs"] == ["a", "b"]
    assert all_["single: a"]["runs"] == ["a"] and all_["baseline: uniform"]["runs"] == ["uniform"]
    some = methods_to_evaluate(["a", "b"], {"a": 1, "b": 0}, base, {"logit": {"a": 1, "b": 1}},
                               include=["emorl", "baselines"])
    assert list(some) == ["EMORL (searched weights)", "baseline: uniform"]


def test_methods_that_decode_the_same_thing_share_a_request():
    """Searched weights that came out one-hot decode what the single adapter does, and weights that
    normalise to the same w / sum w decode alike; anything else keeps its own request."""
    methods = methods_to_evaluate(["a", "b", "c"], {"a": 2.0, "b": 0.0, "c": 0.0}, (),
                                  {"logit": {"a": 1, "b": 1, "c": 1}, "parameter": {"a": 1, "b": 1, "c": 1}})
    for m in methods.values():
        m.setdefault("aggregation", "hidden_state")
    adapters = ["a", "b", "c"]
    key = {name: decode_key(m, adapters) for name, m in methods.items()}
    assert key["EMORL (searched weights)"] == key["single: a"] != key["single: b"]
    assert len(set(key.values())) == len(key) - 1  # only that pair: logit, parameter and equal differ
    same = {"weights": {"a": 0.25, "b": 0.25, "c": 0.5}, "aggregation": "hidden_state"}
    assert decode_key(same, adapters) == decode_key({**same, "weights": {"a": 1, "b": 1, "c": 2}}, adapters)
    # parameter aggregation depends on the scale of w
    assert decode_key({**same, "aggregation": "parameter"}, adapters) != decode_key(
        {"weights": {"a": 1, "b": 1, "c": 2}, "aggregation": "parameter"}, adapters)
    assert decode_key({"weights": None}, adapters) != decode_key({"weights": None, "model_path": "/full"}, adapters)
    assert decode_key({"weights_by_split": {}, "aggregation": "hidden_state"}, adapters) is None
    assert decode_key({"weights": {"a": 0.0}, "aggregation": "hidden_state"}, adapters) == ("origin",)


def _fake_run(tmp_path, tiny_causal):
    """A run directory as the pipeline leaves it, with made-up numbers."""
    from emorl_ray.search.plots import ternary_heatmap

    raw = tiny_raw_config(tiny_causal, tmp_path / "runs")
    raw["objectives"]["third"] = raw["objectives"]["brevity"]
    cfg = parse_config(raw)
    run_dir = Path(cfg.run_dir.location)
    obj = cfg.objective_names
    manifests = []
    for k, o in enumerate(obj):
        rows = []
        for step in range(1, 5):
            rows.append({"kind": "train", "step": step, "data_points": 2 * step, "reward": 0.1 * step + k / 10})
            if step % 2 == 0:
                rows.append({"kind": "val", "step": step, "data_points": 2 * step, "val_score": 0.2 * step})
        write_parquet(str(run_dir / "training" / o / "metrics.parquet"), rows)
        manifests.append(RunManifest(name=o, seed=0, method="single", reward_weights={o: 1.0}, lora=True, steps=4,
                                     data_points=8, train_seconds=3.0, converged=False, trained_steps=4,
                                     trained_data_points=8, final_val_score=0.8, ray_checkpoint="",
                                     metrics_path=str(run_dir / "training" / o / "metrics.parquet")))
    points = [{"level": 1, **{f"w/{o}": float(i == j) for j, o in enumerate(obj)}, "score": 0.3 + i / 10,
               **{f"score/{o}": 0.2 + 0.3 * (i == j) for j, o in enumerate(obj)}} for i in range(3)]
    write_parquet(str(run_dir / "search" / "points.parquet"), points)
    best = {o: float(j == 2) for j, o in enumerate(obj)}
    ternary_heatmap(points, obj, str(run_dir / "search" / "heatmap.png"), best=best)
    search = SearchResult(aggregation="hidden_state", parameterization="simplex", levels=1, trials=3,
                          failed_trials=0, best_score=0.5, best_weights=best, best_weights_used=best,
                          weights_scale_invariant=True, best_per_objective={o: 0.5 for o in obj})

    def row(name, v):
        return {"method": name, **{o: v for o in obj}, **{f"{o}_ci95": 0.01 for o in obj}, "average": v,
                "weights": {"a": 1.0}, "distinct_2": 0.5, "distinct_2_authors": 0.4, "loop_rate": 0.0,
                "edit_rate": 0.9, "train_data_points": 8,
                "train_seconds": 3.0, "n_prompts": 2, "n_generations": 2}

    methods = [row("base model", 0.2), row("EMORL (searched weights)", 0.5)]
    evaluation = {"aggregation": "hidden_state", "sampling": {"temperature": 1.0, "top_k": 50, "top_p": 1.0,
                                                               "seed": 1, "samples_per_prompt": 2},
                  "tables": [{"split": "test", "decoding": "greedy", "source": "demo", "methods": methods},
                             {"split": "test", "decoding": "sampled", "source": "demo",
                              "methods": [dict(m, n_generations=4) for m in methods]}],
                  "pareto": pareto_summary(points, obj, methods)}
    evaluation["pareto"]["methods_table"] = {"split": "test", "decoding": "greedy"}
    evaluation = EvalResult.from_dict({**evaluation, "evaluation": {}})
    samples = [{"split": "test", "decoding": d, "method": m["method"], "i": i, "pass": 0,
                "prompt": f"prompt <{i}>", "response": f"reply {i}"}
               for d in ("greedy", "sampled") for m in methods for i in range(2)]
    return cfg, run_dir, manifests, search, evaluation, samples


def test_report_has_every_section_and_figure(tmp_path, tiny_causal):
    from emorl_ray.evaluation.report import write_report

    cfg, run_dir, manifests, search, evaluation, samples = _fake_run(tmp_path, tiny_causal)
    write_json(str(run_dir / "data_split.json"), {"sizes": {"train": 4, "val": 2, "test": 2}, "dropped": {}})
    cfg.evaluation.num_samples_in_report = 2
    out = write_report(cfg.run_dir, cfg, manifests, search, evaluation, samples)
    md, page = Path(out["markdown"]).read_text(), Path(out["html"]).read_text()
    for section in ("## Data", "## Stage 1: training", "## Stages 2+3: hierarchical search",
                    "## Test split, greedy decoding (2 prompts)",
                    "## Test split, sampled decoding (2 prompts, 2 samples per prompt)",
                    "## Pareto view", "## Samples"):
        assert section in md
    for image in ("plots/training_curves.png", "search/heatmap.png", "plots/pareto.png"):
        assert f"]({image})" in md
        assert (run_dir / image).stat().st_size > 5000  # a real PNG, not an empty canvas
    assert page.count("src='data:image/png;base64,") == 3  # the HTML carries its figures
    assert "Diversity-2 (authors&#x27;)" in page and "EMORL (searched weights)" in page
    assert "prompt &lt;0&gt;" in page  # generations are escaped, never markup
    assert "3 are Pareto-optimal" in md


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")),
                    reason="needs Debian's chromium (apt-get install chromium) for the render check")
def test_report_renders_in_headless_chromium(tmp_path, tiny_causal):
    """Render report.html offline and check the screenshot is a page with content, not blank."""
    from PIL import Image

    from emorl_ray.evaluation.report import write_report

    cfg, run_dir, manifests, search, evaluation, samples = _fake_run(tmp_path, tiny_causal)
    write_json(str(run_dir / "data_split.json"), {"sizes": {}, "dropped": {}})
    out = write_report(cfg.run_dir, cfg, manifests, search, evaluation, samples)
    shot = tmp_path / "shot.png"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1280,3000",
                    f"--screenshot={shot}", Path(out["html"]).as_uri()], check=True, capture_output=True, timeout=120)
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 3000)
    colours = img.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # text, tables and plots, not a blank page
