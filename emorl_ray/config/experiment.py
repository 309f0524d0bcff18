"""The experiment config: one YAML file, parsed into typed sections and validated before Ray or any
model is touched. Each section validates its own fields (`validate`, next to them); the rules that
span sections are `ExperimentConfig.validate`'s. `load_config` raises `ConfigError` naming the
offending field."""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import yaml

from emorl_ray import storage
from emorl_ray.config.checks import ConfigError, check, check_location
from emorl_ray.config.data import DataConfig, ModelConfig
from emorl_ray.config.objectives import ObjectiveConfig
from emorl_ray.config.parsing import coerce, parse_dataclass
from emorl_ray.config.search import EvaluationConfig, SearchConfig, ServingConfig
from emorl_ray.config.training import BASELINE_METHODS, BaselinesConfig, TrainingConfig

if TYPE_CHECKING:
    from emorl_ray.rundir import RunDir


@dataclass
class ExperimentConfig:
    name: str = "default"
    output_dir: str = "runs"
    # Reproduce the authors' behaviour where it changes numbers (docs/method.md §8). Default: fixed.
    faithful: bool = False
    # Before anything is deployed, check that what must run at the same time fits on the cluster's
    # nodes, counting the nodes its autoscaler may start (emorl_ray/placement.py).
    check_resources: bool = True
    # The autoscaler's node types: a Ray cluster launcher YAML or a KubeRay RayCluster manifest.
    # Unset: the launcher's config on the head (~/ray_bootstrap_config.yaml) when there is one.
    autoscaler_config: Optional[str] = None
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: dict = field(default_factory=dict)  # name -> ObjectiveConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def run_dir(self) -> RunDir:
        from emorl_ray.rundir import RunDir

        return RunDir.at(storage.join(storage.normalize(self.output_dir), self.name))

    @property
    def objective_names(self) -> list[str]:
        return list(self.objectives)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, base_dir: Path | None = None) -> None:
        """Every section's own checks, then the rules across sections. `base_dir`: the config
        file's directory, against which relative data paths are resolved."""
        check(self.name.replace("-", "_").replace(".", "_").isidentifier(), "name",
              "use letters, digits, '-', '_' or '.' only (it names the run directory)")
        check_location(self.output_dir, "output_dir")
        check(len(self.objectives) >= 2, "objectives", "EMORL aggregates several objectives; configure at least two")
        self.model.validate("model")
        self.data.validate("data", base_dir)
        if self.evaluation.generalization is not None:
            self.evaluation.generalization.validate("evaluation.generalization", base_dir)
        for name, obj in self.objectives.items():
            check(name not in BASELINE_METHODS, f"objectives.{name}",
                  f"{name!r} names a baseline method; rename the objective")
            obj.scorer.validate(f"objectives.{name}.scorer", self.data.source)
        self.training.validate("training")
        self.baselines.validate("baselines")
        self.search.validate("search")
        self.evaluation.validate("evaluation")
        self.serving.validate("serving")


def parse_objectives(raw: Any) -> dict[str, ObjectiveConfig]:
    check(isinstance(raw, dict) and len(raw) > 0, "objectives",
          "must map each objective name to its scorer, e.g. {reflection: {scorer: {type: ...}}}")
    out = {}
    for name, spec in raw.items():
        p = f"objectives.{name}"
        check(isinstance(name, str) and name.isidentifier(), p,
              "objective names must be identifiers (letters, digits, underscores)")
        obj = coerce(spec if spec is not None else {}, ObjectiveConfig, p)
        check(obj.scorer is not None, f"{p}.scorer", "every objective needs a scorer; add `scorer: {type: ...}`")
        out[name] = obj
    return out


# `faithful: true` changes these defaults to the authors' values (docs/method.md §8.5, 8.6, 8.10,
# 8.15, 8.18, 8.19, 8.25); a value set explicitly in the file wins.
FAITHFUL_DEFAULTS = {
    "training.sampling.top_k": 50,
    "training.baseline": "mean",
    "training.loss_reduction": "sequence_sum",
    "training.reward_transform": "log",
    "training.max_steps": 10000,
    "search.parameterization": "cube",
    "search.cache": False,
    "baselines.full_finetune": True,
    # The authors' test: Hugging Face's sampling defaults, 4 passes over the test prompts (docs/method.md §6).
    "evaluation.sampling.top_k": 50,
    "evaluation.samples_per_prompt": 4,
}


def _apply_faithful_defaults(raw: dict) -> dict:
    for dotted, value in FAITHFUL_DEFAULTS.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for k in parents:
            if not isinstance(node.get(k, {}), dict):
                break  # a wrong type; parsing reports it
            node = node.setdefault(k, {})
        else:
            node.setdefault(leaf, value)
    return raw


def parse_config(raw: Any, base_dir: Path | None = None) -> ExperimentConfig:
    if raw is None:
        raw = {}
    check(isinstance(raw, dict), "<root>", "the config file must hold a mapping at the top level")
    raw = copy.deepcopy(raw)
    if raw.get("faithful") is True:
        raw = _apply_faithful_defaults(raw)
    objectives = parse_objectives(raw.pop("objectives", None))
    cfg = parse_dataclass(ExperimentConfig, raw, "")
    cfg.objectives = objectives
    cfg.validate(base_dir)
    return cfg


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> ExperimentConfig:
    """Read, merge dotted `overrides` (e.g. {"training.max_steps": 5}) and validate."""
    p = str(path)  # a local file or a storage URI (a run's config.yaml on an object store)
    try:
        found = storage.is_file(p)
    except OSError as e:  # no such bucket, no credentials, ...
        raise ConfigError("--config", f"cannot read {p!r}: {e}") from None
    if not found:
        raise ConfigError("--config", f"file {p!r} does not exist")
    try:
        raw = yaml.safe_load(storage.read_text(p))
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{p} is not valid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            check(isinstance(node, dict), dotted, "cannot override inside a non-mapping value")
        node[keys[-1]] = value
    return parse_config(raw, base_dir=None if storage.is_uri(p) else Path(p).parent.resolve())


def config_from_dict(d: dict) -> ExperimentConfig:
    """Rebuild a validated config from `to_dict()` output (used inside Ray workers)."""
    return parse_config(d)
