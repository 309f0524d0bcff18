"""Launch one Ray Train `TorchTrainer` per (objective, seed), all at once, and collect manifests.

A run is named `<objective>-s<seed>`; re-running with the same run directory resumes unfinished
runs from their last checkpoint (Train V2 finds them by `RunConfig(name, storage_path)`) and
skips finished ones (their manifest exists).
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from emorl_ray.config import ExperimentConfig
from emorl_ray.io import atomic_write_json, atomic_copytree, write_parquet

log = logging.getLogger(__name__)


@dataclass
class TrainJob:
    name: str                     # objective name (or baseline name)
    reward_weights: dict          # objective -> weight in the scalarised reward
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.name}-s{self.seed}"


def single_objective_jobs(cfg: ExperimentConfig, objectives: list[str] | None = None) -> list[TrainJob]:
    return [TrainJob(o, {o: 1.0}, s) for o in (objectives or cfg.objective_names) for s in cfg.training.seeds]


def manifest_path(run_dir: Path, job: TrainJob) -> Path:
    return run_dir / "training" / job.run_name / "manifest.json"


def fit(cfg: ExperimentConfig, run_dir: Path, job: TrainJob, extra: dict | None = None) -> dict:
    """Run (or resume) one trainer to the end and write its adapter, metrics and manifest."""
    from ray.train import Checkpoint, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from emorl_ray.training.loop import ADAPTER_DIR, FULL_MODEL_DIR, HISTORY_FILE, STATE_FILE, train_loop_per_worker

    mpath = manifest_path(run_dir, job)
    if mpath.exists():
        log.info("[%s] already trained (%s); skipping", job.run_name, mpath)
        return json.loads(mpath.read_text())
    sc = cfg.training.scaling
    resources = {"CPU": sc.cpus_per_worker}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker or 1
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"experiment": cfg.to_dict(),
                           "run": {"name": job.run_name, "reward_weights": job.reward_weights, "seed": job.seed},
                           **(extra or {})},
        scaling_config=ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=f"train-{job.run_name}", storage_path=str(run_dir / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.training.max_failures)),
    )
    result = trainer.fit()
    ckpt: Checkpoint = result.checkpoint
    if ckpt is None:
        raise RuntimeError(f"[{job.run_name}] finished without a checkpoint")
    out = run_dir / "training" / job.run_name
    with ckpt.as_directory() as d:
        d = Path(d)
        state = json.loads((d / STATE_FILE).read_text())
        history = [json.loads(line) for line in (d / HISTORY_FILE).read_text().splitlines() if line]
        src = d / (ADAPTER_DIR if cfg.training.lora is not None else FULL_MODEL_DIR)
        atomic_copytree(src, out / "adapter")
    write_parquet(out / "metrics.parquet", history)
    manifest = {
        "name": job.name, "seed": job.seed, "reward_weights": job.reward_weights,
        "lora": cfg.training.lora is not None,
        "steps": state["step"], "data_points": state["data_points"],
        "train_seconds": round(state["train_seconds"], 3), "converged": state["converged"],
        "final_val_score": state["val_history"][-1] if state["val_history"] else None,
        "adapter_path": str(out / "adapter"), "metrics_path": str(out / "metrics.parquet"),
        "ray_checkpoint": ckpt.path,
    }
    atomic_write_json(mpath, manifest)
    log.info("[%s] done: %d steps, %d data points, %.1f s, val %.4f", job.run_name, manifest["steps"],
             manifest["data_points"], manifest["train_seconds"], manifest["final_val_score"] or float("nan"))
    return manifest


def train_all(cfg: ExperimentConfig, run_dir: Path, jobs: list[TrainJob], extra: dict | None = None) -> list[dict]:
    """Fit every job concurrently (one driver thread each; `fit()` blocks on its own trainer)."""
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = [pool.submit(fit, cfg, run_dir, job, extra) for job in jobs]
        manifests = [f.result() for f in futures]
    atomic_write_json(run_dir / "training" / "manifest.json", {"runs": manifests})
    return manifests

