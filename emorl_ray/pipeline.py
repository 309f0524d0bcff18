"""EMORL end to end: scorers up, train one adapter per objective in parallel, search the ensemble
weights, evaluate on the test split, write the run directory. `jobs/train_all.py` (`emorl run`) calls `run_pipeline`."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

import yaml

from emorl_ray import storage
from emorl_ray.config import ConfigError, ExperimentConfig
from emorl_ray.rundir import RunDir, RunManifest, SearchResult

log = logging.getLogger(__name__)


def saved_experiment(run_dir: RunDir) -> dict | None:
    """The experiment a run directory holds, re-read with today's schema (fields added since it
    was written take their defaults), or None when there is none or it no longer parses."""
    from emorl_ray.config import parse_config

    if not run_dir.exists():
        return None
    try:
        return parse_config(yaml.safe_load(storage.read_text(run_dir.config))).to_dict()
    except ConfigError:
        return None


def prepare_run_dir(cfg: ExperimentConfig) -> RunDir:
    """Create the run directory, or resume it if it holds the same experiment."""
    run_dir = cfg.run_dir
    if run_dir.exists():
        # Where the directory is (name, output_dir) is not part of the experiment: it may have moved.
        def experiment(d):
            return {k: v for k, v in (d or {}).items() if k not in ("name", "output_dir")}

        if experiment(saved_experiment(run_dir)) != experiment(cfg.to_dict()):
            raise ConfigError("name", f"run directory {run_dir} holds a different experiment; choose another "
                              "`name` (or --name), or delete that directory")
        log.info("resuming run directory %s", run_dir)
    storage.write_text(run_dir.config, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run_dir


def ray_to_join() -> str | None:
    """The running Ray this process joins, by the rule of a plain `ray.init()`: RAY_ADDRESS (which
    `ray job submit` sets), else the Ray that `ray start` runs on this machine (its address file).
    None: there is none, and the job starts its own."""
    from ray._private.services import get_ray_address_from_environment, parse_address

    address = get_ray_address_from_environment(None, None)  # Ray's own lookup, not a copy of it
    if address is None or os.environ.get("RAY_ADDRESS"):
        return address
    # The address file outlives a Ray stopped without `ray stop` (a killed head, an OOM): joining
    # it would hang in GCS retries for minutes. Nothing listening there means nothing to join.
    host, port = parse_address(address)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        log.warning("nothing listens at %s, the address of the Ray last started on this machine by `ray start` "
                    "(stopped without `ray stop`?): starting a local Ray", address)
        return None
    return address


def joins_a_cluster() -> bool:
    """Whether the job joins a running Ray rather than starting its own on this machine."""
    return ray_to_join() is not None


def connect_ray(join: bool | None = None) -> bool:
    """Join the running Ray of `ray_to_join`, else start a local one; True if we started it. Joined,
    the job must leave the cluster as it found it: `ray_session` removes only its own apps.
    `join`: `joins_a_cluster()` where the caller has already asked it."""
    import ray

    if ray.is_initialized():
        return False
    if join is None:
        join = joins_a_cluster()
    if join:
        # No address passed: ray.init() finds the same one, and sets up the token auth of a Ray
        # that `ray start --head` started on this machine as only it does for an address it found.
        # Under `ray job submit`, the job's runtime_env applies.
        ray.init()
        return False
    # address="local": a Ray whose address file appeared since the lookup is not joined by accident.
    ray.init(address="local", dashboard_host="127.0.0.1",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    return True


@contextlib.contextmanager
def ray_session(apps: list[str]):
    """Ray + Serve for one job. On our own local Ray everything goes down at the end; on a shared
    cluster only our Serve applications are removed."""
    from ray import serve

    started = connect_ray()
    if started:
        # Our scorers and evaluator are called through handles only, so our own Ray needs no HTTP
        # proxy: one process fewer, and the job still runs while something else on this machine
        # (an `emorl serve` endpoint, say) holds Serve's port 8000, where the proxy would fail to bind.
        serve.start(proxy_location="Disabled")
    else:
        # A cluster's Serve outlives this job (a later `emorl serve` there needs its proxy), so it
        # is started as any Serve would be, on 127.0.0.1.
        serve.start(http_options={"host": "127.0.0.1"})
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
        else:
            delete_apps(apps)


def delete_apps(names: list[str], timeout_s: float = 60.0) -> None:
    """Remove Serve applications from a cluster that stays up, all at once: `serve.delete` waits
    for each app's replicas to drain (seconds) before the next one is asked."""
    from ray import serve

    try:
        for name in names:
            serve.delete(name, _blocking=False)
        deadline = time.time() + timeout_s
        while left := set(names) & set(serve.status().applications):
            if time.time() > deadline:
                log.warning("Serve applications %s still shutting down after %.0f s", sorted(left), timeout_s)
                return
            time.sleep(0.1)
    except Exception:  # Serve itself is down: nothing of ours is left
        pass


def check_inputs(cfg: ExperimentConfig):
    """Everything that can fail on bad input, before Ray starts: the data reads and splits, the
    model config loads (a GGUF is converted once, here in the driver), the run directory's place
    takes a write. Returns the splits."""
    from emorl_ray.data import load_splits
    from emorl_ray.models import model_kind, resolve

    splits = load_splits(cfg.data, cfg.faithful)
    if cfg.evaluation.generalization is not None:
        load_splits(cfg.evaluation.generalization, cfg.faithful)
    model_kind(resolve(cfg.model.id, cfg.model.gguf_file, cfg.model.cache_dir), cfg.model)
    probe = cfg.run_dir.file(".write-check")
    try:
        storage.write_text(probe, "emorl-ray can write here\n")
        storage.remove_file(probe)
    except OSError as e:
        raise ConfigError("output_dir", f"cannot write the run directory {cfg.run_dir}: {e}; fix the path, "
                          "the bucket or its credentials") from None
    return splits


def trained_scorers(cfg: ExperimentConfig, train: bool = True) -> dict[str, str]:
    """The scorers the job trains itself (`train_if_missing`): point each at its model, at
    <run>/scorers/<objective> unless `model` names a place, and train those not there yet, each as
    a Ray task with its scorer's resources (`train`; else a missing one is an error)."""
    import ray

    from emorl_ray.config import model_exists
    from emorl_ray.rewards.train_reflection import train_pair_scorer

    out = {}
    for o in cfg.objective_names:
        sc = cfg.objectives[o].scorer
        if not sc.train_if_missing:
            continue
        sc.model = sc.model or cfg.run_dir.file("scorers", o)
        if model_exists(sc.model):
            out[o] = sc.model
            continue
        if not train:
            raise ConfigError(f"objectives.{o}.scorer.model", f"{sc.model} holds no trained scorer; resume the "
                              "run with jobs/train_all.py, which trains it first")
        log.info("training the %s scorer on %s into %s (train_if_missing)", o, cfg.data.path, sc.model)
        task = ray.remote(train_pair_scorer).options(num_cpus=sc.num_cpus, num_gpus=sc.num_gpus,
                                                     resources=sc.resources)
        ray.get(task.remote(cfg.data.path, sc.model, split_seed=cfg.data.split.seed, epochs=sc.train_epochs,
                            seed=cfg.seed, device="cuda" if sc.num_gpus > 0 else "cpu"))
        out[o] = sc.model
    return out


def check(cfg: ExperimentConfig) -> dict:
    """`jobs/train_all.py --check`: check_inputs, then the resource requests against the cluster
    (joined, or a local Ray started and stopped for the check). Trains nothing."""
    import ray

    from emorl_ray.placement import check_cluster

    splits = check_inputs(cfg)
    started = connect_ray()
    # Which Ray the placement was checked on: a "fits" from a local Ray says nothing of a cluster.
    checked_on = {"address": ray.get_runtime_context().gcs_address, "joined": not started}
    try:
        checked = check_cluster(cfg)
    finally:
        if started:
            ray.shutdown()
    return {"config": "ok", "data": splits.sizes(), "model": cfg.model.id, "run_dir": str(cfg.run_dir),
            "resumes": cfg.run_dir.exists(), "ray": checked_on, "resources": checked}


def run_pipeline(cfg: ExperimentConfig) -> dict:
    from emorl_ray.ensemble.deployment import APP_NAME, deploy_evaluator
    from emorl_ray.placement import check_cluster
    from emorl_ray.rewards.serve import app_name, deploy_scorers
    from emorl_ray.search.run import run_search
    from emorl_ray.training.launch import baseline_jobs, baseline_runs, single_objective_jobs, train_runs

    t_start = time.time()
    splits = check_inputs(cfg)
    run_dir = prepare_run_dir(cfg)
    storage.write_json(run_dir.file("data_split.json"), splits.summary())

    timings = {}
    with ray_session([APP_NAME] + [app_name(o) for o in cfg.objective_names]):
        check_cluster(cfg)  # a request no node can hold would wait forever: say which, now
        t = time.time()
        trained_scorers(cfg)
        timings["train_scorers_s"] = time.time() - t
        t = time.time()
        deploy_scorers(cfg)
        timings["deploy_scorers_s"] = time.time() - t

        t = time.time()
        manifests = train_runs(cfg, run_dir, single_objective_jobs(cfg) + baseline_jobs(cfg))
        timings["train_wall_s"] = time.time() - t

        # The ensemble uses the first seed's adapter of each objective; LoRA baselines ride along
        # in the same deployment for the evaluation (weight 0 during the search).
        baselines = baseline_runs(cfg, manifests)
        t = time.time()
        deploy_evaluator(cfg, evaluator_adapters(cfg, manifests))
        search = run_search(cfg, run_dir, cfg.objective_names)
        router = None
        if cfg.search.router:
            from emorl_ray.routing import fit_run_router

            router = fit_run_router(cfg, run_dir)
            log.info("router: k=%d, leave-one-out validation score %.4f vs %.4f for the single searched vector",
                     router["k"], router["router_loo_score"], router["single_vector_loo_score"])
        # The comparison aggregations (docs/method.md §3), each with its own searched weights.
        compared = {a: run_search(cfg, run_dir, cfg.objective_names, a).best_weights
                    for a in cfg.search.compare_aggregations}
        timings["search_wall_s"] = time.time() - t

        t = time.time()
        report = evaluation_stage(cfg, run_dir, manifests, search, baselines, compared)
        timings["eval_wall_s"] = time.time() - t
    timings["total_wall_s"] = time.time() - t_start
    summary = {"run_dir": str(run_dir), "report": report["html"], "report_markdown": report["markdown"],
               "timings": timings, "best_weights": search.best_weights_used,
               "best_val_score": search.best_score, "router": router}
    storage.write_json(run_dir.file("summary.json"), summary)
    return summary


def evaluator_adapters(cfg: ExperimentConfig, manifests: list[RunManifest]) -> dict[str, str]:
    from emorl_ray.training.launch import baseline_runs, ensemble_adapters

    return ensemble_adapters(cfg, manifests) | {m.name: m.adapter_path for m in baseline_runs(cfg, manifests) if m.lora}


def evaluation_stage(cfg: ExperimentConfig, run_dir: RunDir, manifests: list[RunManifest], search: SearchResult,
                     baselines: list[RunManifest], compared: dict) -> dict[str, str]:
    """Stage 4, with the evaluator deployed: every method on the test split, then the report."""
    from emorl_ray.evaluation.methods import evaluate_methods
    from emorl_ray.evaluation.report import write_report

    evaluation, samples = evaluate_methods(cfg, run_dir, search.best_weights, manifests, baselines, compared)
    return write_report(run_dir, cfg, manifests, search, evaluation, samples)


# What jobs/evaluate.py may change: how the methods are evaluated, never what was trained or searched.
EVALUATION_FIELDS = ("evaluation.", "search.evaluator_", "search.batch_size")


def evaluate_run(location: str, overrides: dict | None = None) -> dict:
    """Re-evaluate a finished run (`jobs/evaluate.py`): its saved experiment with `overrides` of
    EVALUATION_FIELDS, its trained runs and searched weights; rewrites eval/ and the report."""
    from emorl_ray.data import load_splits
    from emorl_ray.ensemble.deployment import APP_NAME, evaluator_app
    from emorl_ray.placement import check_cluster
    from emorl_ray.rewards.serve import app_name, deploy_scorers
    from emorl_ray.training.launch import baseline_runs

    run_dir = RunDir.at(location)
    if not run_dir.exists():
        raise ConfigError("run_dir", f"{run_dir} holds no run (no config.yaml); give the directory that "
                          "jobs/train_all.py wrote (<output_dir>/<name>)")
    for key in overrides or {}:
        if not key.startswith(EVALUATION_FIELDS):
            raise ConfigError(key, "jobs/evaluate.py only changes how a run is evaluated (evaluation.*, "
                              "search.evaluator_*, search.batch_size); other fields are what the run was "
                              "trained and searched with: run jobs/train_all.py with a new name instead")
    cfg = run_dir.load_config(overrides)
    if not run_dir.has_search_result():
        raise ConfigError("run_dir", f"{run_dir.search_result_file()} does not exist: the run's search has not "
                          f"finished; resume it with jobs/train_all.py --resume {run_dir}")
    search = run_dir.search_result()
    manifests = run_dir.runs()
    compared = {}
    for a in cfg.search.compare_aggregations:
        if not run_dir.has_search_result(a):
            raise ConfigError("search.compare_aggregations", f"{run_dir.search_result_file(a)} does not exist: "
                              "resume the run with jobs/train_all.py to finish that search")
        compared[a] = run_dir.search_result(a).best_weights
    # The report reads the split sizes from here (runs from before it was written lack it).
    storage.write_json(run_dir.file("data_split.json"), load_splits(cfg.data, cfg.faithful).summary())
    t = time.time()
    with ray_session([APP_NAME] + [app_name(o) for o in cfg.objective_names]):
        check_cluster(cfg, training=False)
        trained_scorers(cfg, train=False)
        deploy_scorers(cfg, alongside=[evaluator_app(cfg, evaluator_adapters(cfg, manifests))])
        report = evaluation_stage(cfg, run_dir, manifests, search, baseline_runs(cfg, manifests), compared)
    return {"run_dir": str(run_dir), "report": report["html"], "report_markdown": report["markdown"],
            "eval_wall_s": time.time() - t, "metrics": run_dir.eval_metrics}


def train_objectives(cfg: ExperimentConfig, objectives: list[str]) -> list[RunManifest]:
    """Train more objectives into an existing run directory (`jobs/train_objective.py`).

    `cfg` must be the run's experiment plus these objectives. The run's config.yaml becomes `cfg`,
    so `run(cfg)` afterwards reuses every trained adapter and searches over all of them."""
    from emorl_ray.placement import check_cluster
    from emorl_ray.rewards.serve import app_name, deploy_scorers
    from emorl_ray.training.launch import single_objective_jobs, train_runs

    run_dir = cfg.run_dir
    saved = run_dir.config
    if not run_dir.exists():
        raise ConfigError("name", f"{run_dir} holds no run (no config.yaml); train it with jobs/train_all.py "
                          "first, or fix `name`/`output_dir`")
    for o in objectives:
        if o not in cfg.objectives:
            raise ConfigError("--objective", f"{o!r} is not an objective of this config "
                              f"({', '.join(cfg.objective_names)}); add it under `objectives:` with its scorer")
    old, new = saved_experiment(run_dir), cfg.to_dict()
    without = dict(new, objectives={k: v for k, v in new["objectives"].items() if k not in objectives})
    if old is None:
        raise ConfigError("name", f"{saved} no longer parses; start a new run")
    if old != new and old != without:
        fields = sorted(k for k in new if old.get(k) != without.get(k))
        raise ConfigError("--config", f"differs from {saved} in {fields}, not only in the objectives "
                          f"{objectives}; start from a copy of {saved} and add the objective(s)")
    with ray_session([app_name(o) for o in objectives]):
        check_cluster(cfg, objectives)
        trained_scorers(cfg)
        deploy_scorers(cfg, objectives)
        runs = train_runs(cfg, run_dir, single_objective_jobs(cfg, objectives))
    storage.write_text(saved, yaml.safe_dump(new, sort_keys=False))
    return runs
