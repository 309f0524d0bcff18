"""The training section (EMORL's stage 1, docs/method.md §2) and the single-policy baselines (§5)."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from emorl_ray.config.checks import check, check_location, check_positive, check_resources

BaselineMethod = Literal["uniform", "dynaopt"]
BASELINE_METHODS = typing.get_args(BaselineMethod)


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names

    def validate(self, path: str) -> None:
        check(self.r >= 1, f"{path}.r", "must be >= 1")
        check(self.alpha > 0, f"{path}.alpha", "must be > 0")
        check(0 <= self.dropout < 1, f"{path}.dropout", "must be in [0, 1)")
        tm = self.target_modules
        check(tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm)),
              f"{path}.target_modules", "must be 'all-linear' or a list of module names")


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off. The authors' runs used 50 implicitly (docs/method.md §8.5).
    top_p: float = 1.0

    def validate(self, path: str) -> None:
        check(self.temperature > 0, f"{path}.temperature", "must be > 0")
        check(self.top_k >= 0, f"{path}.top_k", "must be >= 0 (0 = off)")
        check(0 < self.top_p <= 1, f"{path}.top_p", "must be in (0, 1]")


@dataclass
class ConvergenceConfig:
    window: int = 20
    threshold: float = 0.015

    def validate(self, path: str) -> None:
        check(self.window >= 2, f"{path}.window", "must be >= 2")
        check(self.threshold > 0, f"{path}.threshold", "must be > 0")


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # Custom Ray resources per worker (e.g. {trainer_node: 1}): pins trainers to the nodes that
    # advertise them (`ray start --resources='{"trainer_node": 4}'`).
    resources: dict = field(default_factory=dict)

    def validate(self, path: str) -> None:
        check(self.num_workers >= 1, f"{path}.num_workers", "must be >= 1")
        check(self.cpus_per_worker > 0, f"{path}.cpus_per_worker", "must be > 0")
        check(self.gpus_per_worker >= 0, f"{path}.gpus_per_worker", "must be >= 0")
        check(not (self.gpus_per_worker > 0 and not self.use_gpu), f"{path}.gpus_per_worker",
              "is > 0 but use_gpu is false; set training.scaling.use_gpu: true")
        check_resources(self.resources, f"{path}.resources")


@dataclass
class TrainingConfig:
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    batch_size: int = 4
    k: int = 2  # samples per prompt
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    max_new_tokens: int = 24
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward_transform: Literal["log", "identity"] = "log"
    baseline: Literal["rloo", "mean"] = "rloo"
    loss_reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    kl_coef: float = 0.0
    # Autocast of the rollout and loss forwards; weights, optimizer state and the log-softmax stay
    # float32. fp16 adds a gradient scaler and needs a GPU.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Recompute each layer's activations in the backward pass instead of keeping them: the loss
    # forward over prompt + response is most of a trainer's memory (SmolLM2, 160-token prompts,
    # 8 rows: 4.9 -> 2.5 GB peak) for about a quarter more step time.
    gradient_checkpointing: bool = False
    max_steps: int = 40
    val_every: int = 5
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    seeds: list = field(default_factory=lambda: [0])
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    max_failures: int = 2
    # Checkpoints Ray Train keeps per run (the newest ones): a corrupt newest checkpoint is replaced
    # by the one before it on resume, so keep at least 2.
    keep_checkpoints: int = 2
    # Where Ray Train keeps checkpoints: a local directory or a URI Ray's storage understands
    # (s3://, gs://, file://...); default <run dir>/ray. Adapters and manifests stay in the run dir.
    storage_path: Optional[str] = None

    def validate(self, path: str = "training") -> None:
        if self.lora is not None:
            self.lora.validate(f"{path}.lora")
        check(self.k >= 2 or self.baseline == "mean", f"{path}.k",
              "the leave-one-out (rloo) baseline needs k >= 2 samples per prompt")
        check_positive(self, path, ("batch_size", "k", "max_new_tokens", "max_steps", "val_every"))
        check(self.lr > 0, f"{path}.lr", "must be > 0")
        check(self.weight_decay >= 0, f"{path}.weight_decay", "must be >= 0 (weights and decays are never negative)")
        check(self.grad_clip > 0, f"{path}.grad_clip", "must be > 0")
        self.sampling.validate(f"{path}.sampling")
        check(self.kl_coef >= 0, f"{path}.kl_coef", "must be >= 0 (a negative KL weight rewards drifting away)")
        self.convergence.validate(f"{path}.convergence")
        check(len(self.seeds) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) for x in self.seeds),
              f"{path}.seeds", "must be a non-empty list of integers")
        check(len(set(self.seeds)) == len(self.seeds), f"{path}.seeds", "must not repeat a seed")
        self.scaling.validate(f"{path}.scaling")
        check(self.precision != "fp16" or self.scaling.use_gpu, f"{path}.precision",
              "fp16 autocast needs a GPU (training.scaling.use_gpu: true); use bf16 or fp32 on CPU")
        if self.storage_path is not None:
            check("://" in self.storage_path or Path(self.storage_path).expanduser().is_absolute(),
                  f"{path}.storage_path", "must be an absolute directory or a URI such as s3://bucket/prefix")
            check_location(self.storage_path, f"{path}.storage_path")
        check(self.max_failures >= -1, f"{path}.max_failures", "must be >= 0 (or -1 for unlimited)")
        check(self.keep_checkpoints >= 1, f"{path}.keep_checkpoints",
              "must be >= 1 (2 or more to survive a corrupt one)")


@dataclass
class BaselinesConfig:
    """Single-policy baselines trained beside the EMORL adapters and evaluated with them (docs/method.md §5)."""
    # "uniform": one policy on the mean of the objectives' rewards; "dynaopt": Exp3-weighted rewards.
    methods: list = field(default_factory=list)
    # The paper's baselines were full fine-tunes; by default they get a LoRA adapter like EMORL's
    # runs (the same trainable budget, docs/method.md §8.25).
    full_finetune: bool = False
    dynaopt_gamma: float = 0.07
    dynaopt_history: int = 200  # past individual validation scores the bandit reward compares with

    def validate(self, path: str = "baselines") -> None:
        for i, m in enumerate(self.methods):
            check(m in BASELINE_METHODS, f"{path}.methods[{i}]",
                  f"must be one of {', '.join(map(repr, BASELINE_METHODS))}; got {m!r}")
        check(len(set(self.methods)) == len(self.methods), f"{path}.methods", "must not repeat a method")
        check(0 < self.dynaopt_gamma <= 1, f"{path}.dynaopt_gamma", "Exp3's exploration rate must be in (0, 1]")
        check(self.dynaopt_history >= 1, f"{path}.dynaopt_history", "must be >= 1")
