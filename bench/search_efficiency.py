"""How many trials each weight-search method needs, all run as real Ray Tune experiments.

Methods: hierarchical simplex (ours), hierarchical cube with and without cache (the authors'),
Tune's grid search over a simplex grid, Tune's random search, and Optuna TPE, the last three at
the same budget as the simplex search. The TPE row is skipped, with the reason, where optuna is
not installed. Reference: the best score of a dense simplex grid (1/32).

Synthetic objectives (`emorl_ray.search.synthetic`) always; with `--run-dir` also the real
ensemble objective of a finished run (the embedded default's adapters and scorers), where the
dense reference is a 1/8 grid and the simplex search is also timed per level with 1 and 2
trial workers.

    python bench/search_efficiency.py --quick          # one synthetic function, a few minutes
    python bench/search_efficiency.py                  # both synthetic functions
    python bench/search_efficiency.py --run-dir runs/default   # + the real objective (long)

Writes bench/results/search_efficiency.json, prints a table, and prints as its last line one
JSON object with at least `simplex_trials` and `simplex_gap`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# After the environment above: Ray reads it at import.
import ray  # noqa: E402
from ray import tune  # noqa: E402

from emorl_ray.search.hierarchical import HierarchicalGridSearcher  # noqa: E402
from emorl_ray.search.synthetic import FUNCTIONS  # noqa: E402

OBJECTIVES = ["a", "b", "c"]


def simplex_grid(n: int, d: int = 3) -> list[list[float]]:
    return [[i / n for i in c] for c in itertools.product(range(n + 1), repeat=d) if sum(c) == n]


def timed_trial(config: dict) -> None:
    """The synthetic trainable, stamped with its finish time (to order trials)."""
    w = list(config["weights"].values())
    tune.report({"score": FUNCTIONS[config["function"]](w), "finished_at": time.time()})


def run_tune(trainable, param_space, search_alg=None, num_samples=1, concurrency=8, storage=None) -> dict:
    t0 = time.time()
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 0.01}), param_space=param_space,
        tune_config=tune.TuneConfig(search_alg=search_alg, num_samples=num_samples, reuse_actors=True,
                                    max_concurrent_trials=concurrency, metric="score", mode="max"),
        run_config=tune.RunConfig(storage_path=storage, verbose=0))
    grid = tuner.fit()
    wall = time.time() - t0
    rows = sorted(({"score": r.metrics.get("score"), "weights": r.config["weights"],
                    "t": r.metrics.get("finished_at", r.metrics.get("timestamp", 0.0))}
                   for r in grid if r.metrics), key=lambda x: x["t"])
    return {"rows": rows, "wall_s": round(wall, 2), "grid": grid}


def summarise(name: str, out: dict, reference: float) -> dict:
    scores = [r["score"] for r in out["rows"]]
    finite = [s for s in scores if s is not None and s == s]
    best = max(finite) if finite else None
    reach, running = None, float("-inf")
    for i, s in enumerate(scores, 1):
        if s is not None and s == s:
            running = max(running, s)
        if reach is None and running >= reference - 1e-9:
            reach = i
    bw = max((r for r in out["rows"] if r["score"] is not None and r["score"] == r["score"]),
             key=lambda r: r["score"])["weights"] if finite else None
    return {"method": name, "trials": len(scores), "best": best, "gap": None if best is None else reference - best,
            "trials_to_reach_dense_best": reach, "wall_s": out["wall_s"], "best_weights": bw}


def skipped(name: str, reason: str) -> dict:
    """A row that could not run here, with the reason, instead of a number."""
    return {"method": name, "skipped": reason, "trials": None, "best": None, "gap": None,
            "trials_to_reach_dense_best": None, "wall_s": None, "best_weights": None}


def table_row(m: dict, digits: int) -> str:
    if m.get("skipped"):
        return f"| {m['method']} | skipped: {m['skipped']} | | | | |"
    return (f"| {m['method']} | {m['trials']} | {m['best']:.{digits}f} | {m['gap']:.{digits}f} | "
            f"{m['trials_to_reach_dense_best'] or '-'} | {m['wall_s']} |")


def hierarchical(objectives, param, levels, cache):
    return HierarchicalGridSearcher(objectives, "score", "max", levels=levels, parameterization=param, cache=cache)


def compare_methods(trainable, const: dict, objectives: list[str], levels: int, reference: float, storage: str,
                    concurrency: int, cube_caches=(False, True), extra_budgets=(), simplex: dict | None = None):
    """Every method on one objective; random and TPE get the simplex search's trial budget."""
    def run(space, alg=None, n=1):
        return run_tune(trainable, space, alg, n, concurrency, storage)

    simplex = simplex or run(const, hierarchical(objectives, "simplex", levels, True), -1)
    results = [summarise(f"hierarchical simplex ({levels} levels)", simplex, reference)]
    budget = results[0]["trials"]
    for cache in cube_caches:
        out = run(const, hierarchical(objectives, "cube", levels, cache), -1)
        results.append(summarise(f"hierarchical cube ({levels} levels, cache {'on' if cache else 'off'})",
                                 out, reference))
    # Tune's own grid search over the coarsest simplex grid with at least the simplex budget.
    n = next(n for n in range(1, 64) if len(simplex_grid(n, len(objectives))) >= budget)
    grid = [dict(zip(objectives, w)) for w in simplex_grid(n, len(objectives))]
    results.append(summarise(f"Tune grid search (simplex grid 1/{n})",
                             run({**const, "weights": tune.grid_search(grid)}), reference))
    try:
        import optuna  # noqa: F401  (Tune's OptunaSearch needs it; an optional benchmark row)
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        OptunaSearch = None

    space = {**const, "weights": {o: tune.uniform(0.0, 1.0) for o in objectives}}
    for b in (budget, *extra_budgets):
        results.append(summarise(f"Tune random search ({b} trials)", run(space, n=b), reference))
        if OptunaSearch is None:
            results.append(skipped(f"Optuna TPE ({b} trials)", "optuna is not installed (pip install optuna)"))
        else:
            results.append(summarise(f"Optuna TPE ({b} trials)", run(space, OptunaSearch(seed=0), b), reference))
    return results


def compare(function: str, storage: str, budget_extra: int | None) -> dict:
    f = FUNCTIONS[function]
    dense = simplex_grid(32)
    reference = max(f(w) for w in dense)
    methods = compare_methods(timed_trial, {"function": function}, OBJECTIVES, 5, reference, storage, 8,
                              extra_budgets=(budget_extra,) if budget_extra else ())
    return {"function": function, "dense_grid_points": len(dense), "dense_best": reference, "methods": methods}


def real_objective(run_dir: Path, storage: str, levels: int = 3) -> dict:
    """The embedded default's ensemble objective: deploy its scorers and ensemble, then search.

    A trial here costs a validation decode (seconds), so the budget is smaller than for the
    synthetic functions: `levels` levels, a 1/8 dense grid as the reference, and the cube only
    with its cache (without it, the greedy objective re-scores the same points identically)."""
    from emorl_ray.config import load_config
    from emorl_ray.ensemble.deployment import APP_NAME, deploy_evaluator
    from emorl_ray.rewards.serve import deploy_scorers
    from emorl_ray.rundir import RunDir
    from emorl_ray.search.run import weights_trial
    from emorl_ray.training.launch import ensemble_adapters

    run_dir = RunDir.at(run_dir)
    cfg = load_config(run_dir.config)
    adapters = ensemble_adapters(cfg, run_dir.runs())
    objectives = cfg.objective_names
    deploy_scorers(cfg)
    const = {"app": APP_NAME, "max_new_tokens": cfg.search.max_new_tokens, "aggregation": cfg.search.aggregation}

    out = {"objectives": objectives, "levels": levels}
    # Simplex search with 1 and 2 evaluator replicas (trial workers): per-level wall time.
    from ray import serve

    workers = {}
    for replicas in (1, 2):
        if replicas == 2:  # a rolling update would need room for both versions at once
            serve.delete(APP_NAME)
        cfg.search.evaluator_replicas = replicas
        cfg.search.evaluator_cpus = 0.8 if replicas == 2 else 1.5
        deploy_evaluator(cfg, adapters)
        res = run_tune(weights_trial, const, hierarchical(objectives, "simplex", levels, True), -1,
                       2 * replicas, storage)
        per_level = {}
        for r in res["grid"]:
            lv = r.config["level"]
            start, end = r.metrics["timestamp"] - r.metrics["time_total_s"], r.metrics["timestamp"]
            a, b = per_level.get(lv, (start, end))
            per_level[lv] = (min(a, start), max(b, end))
        workers[replicas] = {"wall_s": round(res["wall_s"], 1), "trials": len(res["rows"]),
                             "per_level_wall_s": {lv: round(b - a, 1) for lv, (a, b) in sorted(per_level.items())}}
        if replicas == 1:
            simplex = res
    out["simplex_per_level_1_vs_2_workers"] = workers
    serve.delete(APP_NAME)
    cfg.search.evaluator_replicas, cfg.search.evaluator_cpus = 1, 1.5
    deploy_evaluator(cfg, adapters)
    dense = run_tune(weights_trial, {**const, "weights": tune.grid_search(
        [dict(zip(objectives, w)) for w in simplex_grid(8, len(objectives))])}, concurrency=2, storage=storage)
    reference = max(r["score"] for r in dense["rows"] if r["score"] is not None and math.isfinite(r["score"]))
    out["dense_1_8"] = {"trials": len(dense["rows"]), "best": reference, "wall_s": round(dense["wall_s"], 1)}
    out["methods"] = compare_methods(weights_trial, const, objectives, levels, reference, storage, 2,
                                     cube_caches=(True,), simplex=simplex)
    serve.shutdown()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="one synthetic function, equal budgets only")
    ap.add_argument("--run-dir", type=Path, help="a finished run: also search its real ensemble objective")
    args = ap.parse_args()
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="emorl-search-bench-")
    functions = ["concave"] if args.quick else ["concave", "multimodal"]
    report = {"command": " ".join(["python"] + sys.argv), "synthetic": [compare(f, storage, None if args.quick else 50)
                                                                        for f in functions]}
    if args.run_dir:
        report["real"] = real_objective(args.run_dir.resolve(), storage)
    ray.shutdown()
    out = ROOT / "bench" / "results" / "search_efficiency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for s in report["synthetic"]:
        print(f"\n{s['function']}: dense 1/32 grid best {s['dense_best']:.6f} over {s['dense_grid_points']} points")
        print("| method | trials | best | gap to dense best | trials to reach it | wall s |\n|---|---|---|---|---|---|")
        for m in s["methods"]:
            print(table_row(m, 6))
    if "real" in report:
        r = report["real"]
        print(f"\nreal ensemble objective ({', '.join(r['objectives'])}): dense 1/8 grid best "
              f"{r['dense_1_8']['best']:.4f} in {r['dense_1_8']['trials']} trials, {r['dense_1_8']['wall_s']} s")
        print("| method | trials | best | gap to dense best | trials to reach it | wall s |\n|---|---|---|---|---|---|")
        for m in r["methods"]:
            print(table_row(m, 4))
        print("simplex search per level, 1 vs 2 trial workers:", json.dumps(r["simplex_per_level_1_vs_2_workers"]))
    first = report["synthetic"][0]
    simplex = first["methods"][0]
    print(json.dumps({"function": first["function"], "simplex_trials": simplex["trials"],
                      "simplex_gap": simplex["gap"], "cube_trials_no_cache": first["methods"][1]["trials"],
                      "cube_trials_cache": first["methods"][2]["trials"],
                      "cube_gap": first["methods"][1]["gap"],
                      "random_gap_equal_budget": first["methods"][4]["gap"],
                      "tpe_gap_equal_budget": first["methods"][5]["gap"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
