"""The layout of a run directory and the records the stages hand each other, in one place. Every
stage, job and benchmark finds a run's files through `RunDir` and reads and writes its records
(`RunManifest`, `SearchResult`, `EvalResult`) through it, by way of `emorl_ray.storage`, so a run
lives on a local disk, a shared mount or an object store alike.

    <output_dir>/<name>/
      config.yaml              the experiment, as validated (a resume re-reads it)
      data_split.json          sizes and hashes of the splits
      training/manifest.json   every finished training run (the later stages read only this)
      training/<run>/          adapter/ (or model/), metrics.parquet, manifest.json
      ray/                     Ray Train checkpoints and Ray Tune experiments (resume state)
      search/                  result.json, points.parquet, heatmap.png; search/<aggregation>/ likewise
      router/                  router.json, metrics.json (search.router or jobs/train_router.py)
      eval/                    metrics.json, samples.parquet
      plots/                   the report's figures
      report.md, report.html, summary.json
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from emorl_ray import storage


class _Record:
    """A JSON file's typed view: unknown keys are kept out, missing optional ones take defaults."""

    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class RunManifest(_Record):
    """One finished training run (training/<run>/manifest.json, and a row of training/manifest.json).
    `steps`, `data_points`, `train_seconds` are the paper's counters: at convergence where the rule
    fired (docs/method.md §2); `trained_*` what was actually trained."""
    name: str                    # the objective, or the baseline method
    seed: int
    method: str                  # "single" (an EMORL adapter), "uniform" or "dynaopt"
    reward_weights: dict
    lora: bool
    steps: int
    data_points: int
    train_seconds: float
    converged: bool
    trained_steps: int
    trained_data_points: int
    final_val_score: float | None
    metrics_path: str
    ray_checkpoint: str
    adapter_path: str | None = None  # LoRA runs
    model_path: str | None = None    # full fine-tunes

    @property
    def is_ensemble_member(self) -> bool:
        return self.method == "single"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items()
                if v is not None or k not in ("adapter_path", "model_path")}


@dataclass
class SearchResult(_Record):
    """One aggregation's weight search (search/result.json, or search/<aggregation>/result.json)."""
    aggregation: str
    parameterization: str
    levels: int
    trials: int
    failed_trials: int
    best_score: float
    best_weights: dict           # as searched
    best_weights_used: dict      # as decoded (ensemble/weights.py)
    weights_scale_invariant: bool
    best_per_objective: dict
    path: list = field(default_factory=list)  # the sub-boxes / sub-simplices the search kept


@dataclass
class EvalResult(_Record):
    """The evaluation (eval/metrics.json): one table per (split, decoding), each with a row per method."""
    aggregation: str
    sampling: dict | None
    evaluation: dict             # the evaluation section it ran with
    tables: list
    pareto: dict | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k != "pareto"}


@dataclass(frozen=True)
class RunDir:
    location: str  # an absolute local path or a URI (storage.normalize)

    @classmethod
    def at(cls, location: str) -> "RunDir":
        return cls(storage.normalize(location))

    def __str__(self) -> str:
        return self.location

    def file(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    @property
    def name(self) -> str:
        return storage.basename(self.location)

    @property
    def output_dir(self) -> str:
        return storage.parent(self.location)

    @property
    def config(self) -> str:
        return self.file("config.yaml")

    @property
    def manifest(self) -> str:
        return self.file("training", "manifest.json")

    def training_run(self, run_name: str) -> str:
        return self.file("training", run_name)

    @property
    def ray_storage(self) -> str:
        return self.file("ray")

    def search(self, aggregation: str | None = None) -> str:
        """search/ for the main aggregation, search/<aggregation>/ for a compared one."""
        return self.file("search", aggregation) if aggregation else self.file("search")

    @property
    def router(self) -> str:
        return self.file("router")

    @property
    def eval_metrics(self) -> str:
        return self.file("eval", "metrics.json")

    # -- records -------------------------------------------------------------------------------

    def run_manifest(self, run_name: str) -> str:
        return storage.join(self.training_run(run_name), "manifest.json")

    def read_run(self, run_name: str) -> RunManifest | None:
        path = self.run_manifest(run_name)
        return RunManifest.from_dict(storage.read_json(path)) if storage.is_file(path) else None

    def write_run(self, run_name: str, manifest: RunManifest) -> None:
        storage.write_json(self.run_manifest(run_name), manifest.to_dict())

    def runs(self) -> list[RunManifest]:
        """Every finished training run; FileNotFoundError before the first one."""
        if not storage.is_file(self.manifest):
            raise FileNotFoundError(f"{self.manifest} does not exist: train the run first (jobs/train_all.py)")
        return [RunManifest.from_dict(m) for m in storage.read_json(self.manifest)["runs"]]

    def write_runs(self, runs: list[RunManifest]) -> None:
        storage.write_json(self.manifest, {"runs": [m.to_dict() for m in runs]})

    def search_result_file(self, aggregation: str | None = None) -> str:
        return storage.join(self.search(aggregation), "result.json")

    def points_file(self, aggregation: str | None = None) -> str:
        return storage.join(self.search(aggregation), "points.parquet")

    def has_search_result(self, aggregation: str | None = None) -> bool:
        return storage.is_file(self.search_result_file(aggregation))

    def search_result(self, aggregation: str | None = None) -> SearchResult:
        return SearchResult.from_dict(storage.read_json(self.search_result_file(aggregation)))

    def write_search_result(self, result: SearchResult, aggregation: str | None = None) -> None:
        storage.write_json(self.search_result_file(aggregation), result.to_dict())

    def eval_result(self) -> EvalResult:
        return EvalResult.from_dict(storage.read_json(self.eval_metrics))

    def write_eval_result(self, result: EvalResult) -> None:
        storage.write_json(self.eval_metrics, result.to_dict())

    def exists(self) -> bool:
        return storage.is_file(self.config)

    def load_config(self, overrides: dict | None = None):
        """The experiment saved here, located where the directory is now (it may have moved)."""
        from emorl_ray.config import load_config

        return load_config(self.config, {**(overrides or {}), "name": self.name, "output_dir": self.output_dir})
