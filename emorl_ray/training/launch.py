"""Launch one Ray Train `TorchTrainer` per run, all at once, and collect manifests.

The runs are EMORL's single-objective ones, one per (objective, seed), and the single-policy
baselines (Uniform, DynaOpt) per seed. Ray starts each trainer as soon as the cluster has room for
it, so more runs than fit at once simply queue (the job logs how many fit, and a queued trainer
waits without Ray Train's once-a-minute timeout). A run is named `<objective or baseline>-s<seed>`;
re-running with the same run directory resumes unfinished
runs from their last checkpoint (Train V2 finds them by `RunConfig(name, storage_path)`) and
skips finished ones (their manifest exists).
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from emorl_ray import storage
from emorl_ray.config import ExperimentConfig
from emorl_ray.rundir import RunDir, RunManifest

log = logging.getLogger(__name__)

PROCESS_GROUP_ATTEMPTS = 3
# How long a trainer waits for its workers' resources before Ray Train gives up on that request
# and makes it again. Its default, 60 s, suits a cluster that is scaling up; a run queued behind
# others waits for them to finish, and at 60 s its controller logs a traceback
# (WorkerGroupStartupTimeoutError, "RETRY") into the job's output every minute until then,
# with retries unlimited either way. The variable, if set, wins; Ray Train passes it on from the driver.
START_TIMEOUT_VAR = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
QUEUED_TRAINER_WAIT_S = 24 * 3600


@dataclass
class TrainJob:
    name: str                     # objective name (or baseline name)
    reward_weights: dict          # objective -> weight in the scalarised reward (DynaOpt: the objectives)
    seed: int
    method: str = "single"        # "single" (EMORL), "uniform" or "dynaopt"
    lora: bool = True

    @property
    def run_name(self) -> str:
        return f"{self.name}-s{self.seed}"


def single_objective_jobs(cfg: ExperimentConfig, objectives: list[str] | None = None) -> list[TrainJob]:
    lora = cfg.training.lora is not None
    return [TrainJob(o, {o: 1.0}, s, "single", lora)
            for o in (objectives or cfg.objective_names) for s in cfg.training.seeds]


def baseline_jobs(cfg: ExperimentConfig) -> list[TrainJob]:
    """Uniform: r = (1/K) sum_i f(s_i). DynaOpt: bandit weights (`weighting.DynaOpt`)."""
    objectives = cfg.objective_names
    lora = cfg.training.lora is not None and not cfg.baselines.full_finetune
    uniform = {o: 1.0 / len(objectives) for o in objectives}
    return [TrainJob(m, uniform, s, m, lora) for m in cfg.baselines.methods for s in cfg.training.seeds]


def run_trainer(cfg: ExperimentConfig, run_dir: RunDir, job: TrainJob, hooks: list | None = None):
    """One `TorchTrainer` for the job, run to its end (or resumed: the same RunConfig name)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    from emorl_ray.placement import trainer_worker_request
    from emorl_ray.training.loop import train_loop_per_worker

    sc = cfg.training.scaling
    resources = trainer_worker_request(sc)
    os.environ.setdefault(START_TIMEOUT_VAR, str(QUEUED_TRAINER_WAIT_S))  # read by trainer.fit()
    for attempt in range(1, PROCESS_GROUP_ATTEMPTS + 1):
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"experiment": cfg.to_dict(), "run": job, "hooks": hooks or []},
            scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"train-{job.run_name}",
                                 storage_path=cfg.training.storage_path or run_dir.ray_storage,
                                 failure_config=FailureConfig(max_failures=cfg.training.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=cfg.training.keep_checkpoints)),
        )
        try:
            return trainer.fit()
        except TrainingFailedError as e:
            # Ray Train picks the process group's port, closes it, then binds it: another trainer
            # starting on the same host at that moment can take it (EADDRINUSE in setup, before any
            # step). Running the same RunConfig again resumes the run, here from its start.
            if "EADDRINUSE" not in str(e) or attempt == PROCESS_GROUP_ATTEMPTS:
                raise
            log.warning("[%s] the process group's port was taken (attempt %d); starting the trainer again",
                        job.run_name, attempt)


def trained(run_dir: RunDir, job: TrainJob) -> RunManifest | None:
    """The job's manifest if an earlier run of the experiment finished it (then it is skipped)."""
    done = run_dir.read_run(job.run_name)
    if done is not None:
        log.info("[%s] already trained (%s); skipping", job.run_name, run_dir.run_manifest(job.run_name))
    return done


def fit(cfg: ExperimentConfig, run_dir: RunDir, job: TrainJob, hooks: list | None = None) -> RunManifest:
    """Run (or resume) one trainer to the end and write its adapter, metrics and manifest; a
    finished job is skipped. `hooks`: called by every worker before every step
    (`training.loop.SCSTRecipe`); tests only."""
    done = trained(run_dir, job)
    return done if done is not None else _train(cfg, run_dir, job, hooks)


def _train(cfg: ExperimentConfig, run_dir: RunDir, job: TrainJob, hooks: list | None = None) -> RunManifest:
    from ray.train import Checkpoint

    from emorl_ray.training.checkpoint import ADAPTER_DIR, FULL_MODEL_DIR, read_state

    result = run_trainer(cfg, run_dir, job, hooks)
    ckpt: Checkpoint = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"[{job.run_name}] finished without a checkpoint")
    out = run_dir.training_run(job.run_name)
    with ckpt.as_directory() as d:
        d = Path(d)
        state, history = read_state(d)
        weights_dir = storage.join(out, "adapter" if job.lora else "model")
        storage.upload_dir(d / (ADAPTER_DIR if job.lora else FULL_MODEL_DIR), weights_dir)
    metrics_path = storage.join(out, "metrics.parquet")
    storage.write_parquet(metrics_path, history)
    # The paper's counters stop at convergence; under `faithful` training went on to the epoch's end.
    reported = state.get("converged_at") or state
    manifest = RunManifest(
        name=job.name, seed=job.seed, method=job.method, reward_weights=job.reward_weights, lora=job.lora,
        steps=reported["step"], data_points=reported["data_points"],
        train_seconds=round(reported["train_seconds"], 3), converged=state["converged"],
        trained_steps=state["step"], trained_data_points=state["data_points"],
        final_val_score=state["val_history"][-1] if state["val_history"] else None,
        metrics_path=metrics_path, ray_checkpoint=ckpt.path,
        **{("adapter_path" if job.lora else "model_path"): weights_dir})
    # Written last: on object storage, where a directory cannot be renamed into place, the
    # manifest is what says the adapter above is complete.
    run_dir.write_run(job.run_name, manifest)
    log.info("[%s] done: %d steps, %d data points, %.1f s, val %.4f", job.run_name, manifest.steps,
             manifest.data_points, manifest.train_seconds, manifest.final_val_score or float("nan"))
    return manifest


def log_queue(cfg: ExperimentConfig, jobs: list[TrainJob]) -> int:
    """Say how many of `jobs` the live nodes can train at once beside the scorers; returns that number."""
    from emorl_ray.placement import live_nodes, resource_requests, trainers_at_once

    objectives = sorted({o for j in jobs for o in j.reward_weights})
    live = [n["Resources"] for n in live_nodes()]
    at_once = trainers_at_once(resource_requests(cfg, objectives), live, len(jobs))
    if at_once < len(jobs):
        log.info("training %d runs; the live nodes have room for %d at once beside the scorers: the others "
                 "wait for one to finish (or for nodes the autoscaler adds)", len(jobs), at_once)
    return at_once


def train_runs(cfg: ExperimentConfig, run_dir: RunDir, jobs: list[TrainJob]) -> list[RunManifest]:
    """Train every unfinished job concurrently (one driver thread each, blocked on its own trainer)
    and add them all to the run directory's `training/manifest.json`, which the later stages read."""
    by_run = {j.run_name: trained(run_dir, j) for j in jobs}
    todo = [j for j in jobs if by_run[j.run_name] is None]
    if todo:
        log_queue(cfg, todo)
        with ThreadPoolExecutor(max_workers=len(todo)) as pool:
            futures = [pool.submit(_train, cfg, run_dir, j) for j in todo]
            by_run.update((j.run_name, f.result()) for j, f in zip(todo, futures))
    manifests = [by_run[j.run_name] for j in jobs]
    these = {(m.name, m.seed) for m in manifests}
    earlier = run_dir.runs() if storage.is_file(run_dir.manifest) else []
    runs = [m for m in earlier if (m.name, m.seed) not in these] + manifests
    run_dir.write_runs(runs)
    return runs


def ensemble_adapters(cfg: ExperimentConfig, runs: list[RunManifest]) -> dict[str, str]:
    """The adapters the ensemble combines: each objective's single-objective run of the first seed."""
    seed = cfg.training.seeds[0]
    found = {m.name: m.adapter_path for m in runs if m.is_ensemble_member and m.seed == seed}
    missing = [o for o in cfg.objective_names if o not in found]
    if missing:
        raise RuntimeError(f"no trained adapter (seed {seed}) for objectives {missing}; train them first")
    return {o: found[o] for o in cfg.objective_names}


def baseline_runs(cfg: ExperimentConfig, runs: list[RunManifest]) -> list[RunManifest]:
    seed = cfg.training.seeds[0]
    return [m for m in runs if not m.is_ensemble_member and m.seed == seed and m.name in cfg.baselines.methods]
