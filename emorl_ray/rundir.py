"""The layout of a run directory, in one place. Every stage, job and benchmark finds a run's files
through `RunDir`, and reads and writes them through `emorl_ray.storage`, so a run lives on a
local disk, a shared mount or an object store alike.

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

from dataclasses import dataclass

from emorl_ray import storage


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

    def exists(self) -> bool:
        return storage.is_file(self.config)

    def load_config(self, overrides: dict | None = None):
        """The experiment saved here, located where the directory is now (it may have moved)."""
        from emorl_ray.config import load_config

        return load_config(self.config, {**(overrides or {}), "name": self.name, "output_dir": self.output_dir})
