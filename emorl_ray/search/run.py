"""Stage 3: find the ensemble weights with the hierarchical searcher, trials run by Ray Tune.

Each trial asks the ensemble deployment to decode the validation prompts with its weights and
reports the mean of the objectives' mean scores (docs/method.md §4). Re-running with the same run
directory restores the Tune experiment, the searcher rebuilt from Tune's record of trials: finished
trials are not redone.
"""

from __future__ import annotations

import json
import logging
import math
import os

from ray import serve, tune

from emorl_ray import storage
from emorl_ray.config import ExperimentConfig
from emorl_ray.ensemble.deployment import APP_NAME
from emorl_ray.ensemble.weights import weights_used
from emorl_ray.metrics import record_trial
from emorl_ray.rundir import RunDir, SearchResult
from emorl_ray.search.hierarchical import HierarchicalGridSearcher

log = logging.getLogger(__name__)

METRIC = "score"


def weights_trial(config: dict) -> None:
    """Tune function trainable: one weight vector, one validation decode, one score."""
    weights = config["weights"]
    handle = serve.get_app_handle(config["app"])
    res = handle.evaluate.remote(weights, "val", config["max_new_tokens"], return_samples=True,
                                 aggregation=config["aggregation"]).result()
    record_trial(config["aggregation"], res["mean"])
    # Each validation prompt's scores too: what the per-prompt router learns from (emorl_ray/routing/).
    tune.report({METRIC: res["mean"], **{f"score/{o}": v for o, v in res["per_objective"].items()},
                 **{f"prompt_scores/{o}": list(v) for o, v in res["scores"].items()}})


class SearchProgress(tune.Callback):
    """One log line per finished trial in the job's log: trials done, level, score, best so far."""

    def __init__(self, aggregation: str, levels: int):
        self.aggregation, self.levels = aggregation, levels
        self.done, self.best = 0, float("-inf")

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        score = (trial.last_result or {}).get(METRIC)
        if score is not None and math.isfinite(score):
            self.best = max(self.best, score)
        log.info("search (%s): trial %d done (level %s/%d), score %s, best so far %.4f", self.aggregation,
                 self.done, trial.config.get("level"), self.levels,
                 "n/a" if score is None else f"{score:.4f}", self.best)


# What Tune saves of an experiment, beside tuner.pkl: its record of trials, the state of its
# wrappers around the searcher, and the searcher's own state.
TUNE_STATE_FILES = (("experiment_state-", ".json"), ("search_gen_state-", ".json"), ("searcher-state-", ".pkl"))


def latest_file(exp_path: str, prefix: str, suffix: str) -> str | None:
    """The newest of Tune's `<prefix><session><suffix>` files in an experiment directory: the
    last by name, as Tune's restore picks it (the session is a timestamp; modification times
    change when a file is rewritten, and clocks differ between the nodes of a cluster)."""
    names = sorted(name for name, _ in storage.listdir(exp_path) if name.startswith(prefix) and name.endswith(suffix))
    return storage.join(exp_path, names[-1]) if names else None


def searcher_state(exp_path: str) -> dict:
    """The searcher's JSON state as Tune last saved it (Tune names the file *.pkl; it is JSON)."""
    path = latest_file(exp_path, "searcher-state-", ".pkl")
    return storage.read_json(path) if path else {}


def rebuild_searcher(exp_path: str, objectives: list[str]) -> None:
    """Before a restore, rebuild the saved searcher state from Tune's saved record of trials
    (`HierarchicalGridSearcher.replay`): a killed driver can leave the two apart. Both files are
    there: `make_tuner` starts the search afresh otherwise."""
    path = latest_file(exp_path, "searcher-state-", ".pkl")
    experiment = latest_file(exp_path, "experiment_state-", ".json")
    trials = []
    for spec, runtime in storage.read_json(experiment)["trial_data"]:
        spec, result = json.loads(spec), json.loads(runtime).get("last_result") or {}
        config = spec.get("config") or {}
        if "weights" in config:
            trials.append({"trial_id": spec["trial_id"], "status": spec["status"], "level": config.get("level"),
                           "score": result.get(METRIC), "weights": [config["weights"][o] for o in objectives]})
    saved = storage.read_json(path)
    searcher = HierarchicalGridSearcher(objectives, metric=METRIC, mode=saved["_mode"], levels=saved["levels"],
                                        parameterization=saved["parameterization"], cache=saved["cache"])
    left_out = searcher.replay(trials)
    if left_out:
        log.warning("search: %d of Tune's saved trials fit no point of the search; left out: %s",
                    len(left_out), left_out)
    rebuilt = searcher.get_state()
    if any(json.dumps(rebuilt[k], sort_keys=True) != json.dumps(saved[k], sort_keys=True)
           for k in ("level", "scores", "pending", "finished")):
        log.warning("search: the saved searcher state was behind or ahead of Tune's saved trials; "
                    "rebuilt it from those before resuming")
    storage.write_json(path, rebuilt)


def make_tuner(cfg: ExperimentConfig, run_dir: RunDir, objectives: list[str], aggregation: str,
               name: str) -> tune.Tuner:
    """A new Tune experiment with the hierarchical searcher, or the saved one restored (finished
    trials are not run again)."""
    se = cfg.search
    exp_path = storage.join(run_dir.ray_storage, name)
    trainable = tune.with_resources(weights_trial, {"cpu": se.trial_cpus})
    # Tune saves the experiment state (what a restore knows is finished) at most every 10 s by
    # default; trials here take seconds, so a killed driver would redo several. Save every second.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    if tune.Tuner.can_restore(exp_path) and any(latest_file(exp_path, *f) is None for f in TUNE_STATE_FILES):
        # A driver killed while Tune was starting leaves tuner.pkl without some of its first saved
        # state. Without the record of trials Tune's restore runs trials without their config;
        # without the wrappers' state it restores no searcher, and a fresh one runs every point
        # again; without the searcher's own state it fails. Nothing had finished yet: start afresh.
        log.warning("the search in %s was stopped before Tune had saved all of its state; starting it again",
                    exp_path)
        storage.remove_dir(exp_path)
    if tune.Tuner.can_restore(exp_path):
        log.info("resuming the search from %s", exp_path)
        rebuild_searcher(exp_path, objectives)
        return tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=False)
    searcher = HierarchicalGridSearcher(objectives, metric=METRIC, mode="max", levels=se.levels,
                                        parameterization=se.parameterization, cache=se.cache)
    return tune.Tuner(
        trainable,
        param_space={"app": APP_NAME, "max_new_tokens": se.max_new_tokens, "aggregation": aggregation},
        # Not reuse_actors: with it, the experiment state Tune saved to an S3 run directory stayed
        # at its first two trials for a whole search (Ray 2.60; seen under the killed-driver test of
        # tests/test_pipeline_e2e.py), and a driver killed mid-search would redo every trial.
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                    max_concurrent_trials=se.max_concurrent_trials),
        run_config=tune.RunConfig(name=name, storage_path=run_dir.ray_storage,
                                  failure_config=tune.FailureConfig(max_failures=se.max_failures), verbose=1,
                                  callbacks=[SearchProgress(aggregation, se.levels)]),
    )


def searched_points(grid, objectives: list[str], aggregation: str) -> list[dict]:
    """One row per trial: its weights as searched and as decoded, its scores (None if it failed)."""
    points = []
    for r in grid:
        if r.config is None or "weights" not in r.config:
            continue
        metrics = r.metrics or {}
        score = metrics.get(METRIC)
        ok = r.error is None and score is not None and math.isfinite(score)
        w = [r.config["weights"][o] for o in objectives]
        # What the decoder applied (the weight convention of ensemble/weights.py).
        used = weights_used(w, objectives, aggregation) if sum(w) > 0 else dict.fromkeys(objectives, 0.0)
        points.append({"level": r.config.get("level"), **{f"w/{o}": x for o, x in zip(objectives, w)},
                       "score": score if ok else None,
                       **{f"score/{o}": metrics.get(f"score/{o}") for o in objectives},
                       **{f"prompt_scores/{o}": metrics.get(f"prompt_scores/{o}") for o in objectives},
                       "error": None if r.error is None else str(r.error)[:500],
                       **{f"used/{o}": used[o] for o in objectives}})
    # Tune's result order is not stable across restores: sort, so ties break the same way every time.
    points.sort(key=lambda p: (p["level"] or 0, [-p[f"w/{o}"] for o in objectives]))
    return points


def run_search(cfg: ExperimentConfig, run_dir: RunDir, objectives: list[str],
               aggregation: str | None = None) -> SearchResult:
    """Search the weights of `aggregation` (default: search.aggregation). Results go to `search/`,
    or to `search/<aggregation>/` for the comparisons of search.compare_aggregations."""
    se = cfg.search
    aggregation = aggregation or se.aggregation
    out = None if aggregation == se.aggregation else aggregation
    # One experiment per set of adapters: adding an objective (jobs/train_objective.py) starts a new search.
    name = "search-" + ("" if out is None else aggregation + "-") + "-".join(objectives)
    points = searched_points(make_tuner(cfg, run_dir, objectives, aggregation, name).fit(), objectives, aggregation)
    scored = [p for p in points if p["score"] is not None]
    exp_path = storage.join(run_dir.ray_storage, name)
    if not scored:
        raise RuntimeError(f"the search finished without a single successful trial; see the Tune logs in {exp_path}")
    best = max(scored, key=lambda p: p["score"])
    result = SearchResult(
        aggregation=aggregation, parameterization=se.parameterization, levels=se.levels, trials=len(points),
        failed_trials=len(points) - len(scored), best_score=best["score"],
        best_weights={o: best[f"w/{o}"] for o in objectives},
        best_weights_used={o: best[f"used/{o}"] for o in objectives},
        weights_scale_invariant=aggregation != "parameter",
        best_per_objective={o: best[f"score/{o}"] for o in objectives},
        path=searcher_state(exp_path).get("path", []))
    storage.write_parquet(run_dir.points_file(out), points)
    if len(objectives) == 3:
        from emorl_ray.search.plots import ternary_heatmap

        ternary_heatmap(points, objectives, storage.join(run_dir.search(out), "heatmap.png"),
                        best=result.best_weights, search_path=result.path,
                        title=f"{aggregation}: {se.parameterization} search, {len(points)} trials, "
                              f"best {best['score']:.4f}")
    run_dir.write_search_result(result, out)
    log.info("search (%s): %d trials, best %.4f at %s", aggregation, len(points), best["score"], result.best_weights)
    return result
