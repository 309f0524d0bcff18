"""Typed experiment configuration, validated in one place per section (see `experiment.py`).

Sections: `model` and `data` (data.py), `objectives` (objectives.py), `training` and `baselines`
(training.py), `search`, `evaluation` and `serving` (search.py). Each enum is a `Literal` type
defined once, next to its section; the tuples of allowed values come from it.
"""

from emorl_ray.config.checks import ConfigError, model_exists
from emorl_ray.config.data import DataConfig, ModelConfig, SplitConfig
from emorl_ray.config.experiment import (
    FAITHFUL_DEFAULTS,
    ExperimentConfig,
    config_from_dict,
    load_config,
    parse_config,
)
from emorl_ray.config.objectives import ObjectiveConfig, ScorerConfig
from emorl_ray.config.search import (
    AGGREGATIONS,
    DECODINGS,
    EVAL_METHODS,
    PARAMETERIZATIONS,
    EvaluationConfig,
    SearchConfig,
    ServingConfig,
)
from emorl_ray.config.training import (
    BASELINE_METHODS,
    BaselinesConfig,
    ConvergenceConfig,
    LoraConfig,
    SamplingConfig,
    ScalingConfig,
    TrainingConfig,
)

__all__ = [
    "AGGREGATIONS", "BASELINE_METHODS", "DECODINGS", "EVAL_METHODS", "FAITHFUL_DEFAULTS", "PARAMETERIZATIONS",
    "BaselinesConfig", "ConfigError", "ConvergenceConfig", "DataConfig", "EvaluationConfig", "ExperimentConfig",
    "LoraConfig", "ModelConfig", "ObjectiveConfig", "SamplingConfig", "ScalingConfig", "ScorerConfig",
    "SearchConfig", "ServingConfig", "SplitConfig", "TrainingConfig", "config_from_dict", "load_config",
    "model_exists", "parse_config",
]
