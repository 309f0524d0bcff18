"""The Ray Train worker: one policy trained by k-SCST on one reward (docs/method.md §2), read like a
recipe: `setup`, then `step` after `step` with a `validate` every `training.val_every` steps and a
`checkpoint` after each validation, until the step cap or the convergence rule ends the run.

Counters follow the paper: data points = prompts consumed (k samples per prompt not counted);
training seconds = loop wall time (model and scorer loading excluded; validation included).
Checkpoints resume exactly: the data and the sampling of a step are functions of (seed, step).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emorl_ray.config import ExperimentConfig, config_from_dict
from emorl_ray.placement import use_reserved_cpus
from emorl_ray.training.checkpoint import restore, save_checkpoint
from emorl_ray.training.launch import TrainJob
from emorl_ray.training.weighting import build_weighting

log = logging.getLogger(__name__)


def batch_for_step(train: list[dict], seed: int, step: int, n: int) -> list[str]:
    """The prompts of step `step`: a pure function of (seed, step), so a resumed run sees the same data."""
    rng = random.Random(seed * 1_000_003 + step)
    idx = rng.sample(range(len(train)), n) if n <= len(train) else [rng.randrange(len(train)) for _ in range(n)]
    return [train[i]["prompt"] for i in idx]


def build_trainable(cfg: ExperimentConfig, device, lora: bool = True):
    from peft import get_peft_model

    from emorl_ray.models import Policy, lora_config

    policy = Policy(cfg.model, device)
    if cfg.training.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the LoRA weights although the frozen
        # embeddings' outputs do not require grad.
        m, kw = policy.model, {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # today's name; the old one is deprecated
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if lora:
        policy.model = get_peft_model(policy.model, lora_config(cfg.training.lora, policy.kind))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.training.lr, weight_decay=cfg.training.weight_decay)
    return policy, optimizer


@dataclass
class TrainState:
    """What a checkpoint carries besides the weights; saved as JSON (`state.json`)."""
    step: int = 0
    data_points: int = 0
    train_seconds: float = 0.0
    val_history: list = field(default_factory=list)
    converged: bool = False
    converged_at: dict | None = None  # the counters when the rule fired (the paper reports these)
    weighting: dict = field(default_factory=dict)  # DynaOpt's bandit; empty for fixed weights

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def counters(self) -> dict:
        return {"step": self.step, "data_points": self.data_points, "train_seconds": self.train_seconds}


class SCSTRecipe:
    """One worker of one run. `hooks`: objects with `before_step(step, objectives)`, called before
    every step; the fault-injection tests supply them (`emorl_ray.testing`)."""

    def __init__(self, cfg: ExperimentConfig, run: TrainJob, hooks: list | None = None):
        self.cfg, self.run, self.hooks = cfg, run, hooks or []
        self.t = cfg.training
        self.state, self.history = TrainState(), []

    def setup(self) -> None:
        import ray.train
        import ray.train.torch

        from emorl_ray.data import load_splits
        from emorl_ray.rewards.serve import ServeRewards

        t, run = self.t, self.run
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device() if t.scaling.use_gpu else torch.device("cpu")
        use_reserved_cpus(t.scaling.cpus_per_worker)
        torch.manual_seed(run.seed)
        self.policy, self.optimizer = build_trainable(self.cfg, self.device, run.lora)
        self.model = self.policy.model
        self.train_model = ray.train.torch.prepare_model(self.model) if self.world > 1 else self.model
        splits = load_splits(self.cfg.data, self.cfg.faithful)
        self.train_rows, self.val_prompts = splits.train, [r["prompt"] for r in splits.val]
        self.objectives = list(run.reward_weights)
        self.rewards = ServeRewards(self.objectives)
        b = self.cfg.baselines
        self.weighting = build_weighting(run.method, run.reward_weights, b.dynaopt_gamma, b.dynaopt_history,
                                         run.seed, self.cfg.faithful)
        # The authors' convergence flag only ended the epoch (docs/method.md §8.7): under `faithful`
        # training goes on to the end of the epoch, while the reported counters stay those at convergence.
        self.steps_per_epoch = max(1, len(splits.train) // (t.batch_size * self.world))
        # A fresh scaler after a resume re-calibrates within a few steps; its state is not checkpointed.
        self.scaler = torch.amp.GradScaler(self.device.type) if t.precision == "fp16" else None
        self.state.weighting = self.weighting.state_dict()

    def resume(self) -> None:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if not ckpt:
            return
        state, self.history = restore(ckpt, self.model, self.optimizer, self.run.lora, self.run.run_name)
        self.state = TrainState.from_dict(state)
        if self.state.weighting:  # checkpoints of fixed-weight runs carry none
            self.weighting.load_state_dict(self.state.weighting)
        log.info("[%s] resumed at step %d (%d data points)", self.run.run_name, self.state.step, self.state.data_points)

    def finished(self) -> bool:
        s = self.state
        if s.step >= self.t.max_steps:
            return True
        if not s.converged:
            return False
        return not self.cfg.faithful or s.step % self.steps_per_epoch == 0

    def step(self) -> dict:
        """One k-SCST update on this step's prompts (this worker's share of them)."""
        from emorl_ray.training.scst import scst_step

        t, s, run = self.t, self.state, self.run
        torch.manual_seed(run.seed * 1_000_003 + s.step * self.world + self.rank)  # step-determined sampling
        prompts = batch_for_step(self.train_rows, run.seed, s.step, t.batch_size * self.world)
        prompts = prompts[self.rank * t.batch_size:(self.rank + 1) * t.batch_size]
        stats = scst_step(self.policy, self.train_model, self.optimizer, prompts, self.rewards,
                          self.weighting.weights(), t, self.cfg.faithful, gen_model=self.model, scaler=self.scaler)
        s.step += 1
        s.data_points += t.batch_size * self.world
        return {"kind": "train", "step": s.step, "data_points": s.data_points, **stats,
                "scorer_retries": self.rewards.retried, "rollout_tokens": stats["response_tokens"] * len(prompts) * t.k}

    def validate(self) -> dict:
        """Greedy responses to the validation prompts, scored; updates the convergence rule and
        DynaOpt's weights. Returns the validation row (its `train_seconds` are filled in later)."""
        import ray

        from emorl_ray.decoding.engine import generate_texts
        from emorl_ray.training.scst import adapter_routing, converged

        s, conv = self.state, self.t.convergence
        with adapter_routing(self.model):
            texts = generate_texts(self.policy, self.model, self.val_prompts, self.t.max_new_tokens)
        val = self.rewards.score_all(self.val_prompts, texts, self.objectives)
        means = {o: sum(v) / len(v) for o, v in val.items()}
        value = sum(means.values()) / len(means)
        s.val_history.append(value)
        self.weighting.observe_validation(val)
        s.weighting = self.weighting.state_dict()
        s.converged = s.converged or converged(s.val_history, conv.window, conv.threshold)
        return {"kind": "val", "step": s.step, "data_points": s.data_points, "val_score": value,
                **{f"val/{o}": m for o, m in means.items()}, "converged": s.converged,
                "node_id": ray.get_runtime_context().get_node_id(), "sample": texts[0] if texts else ""}

    def checkpoint(self, val_row: dict) -> None:
        """Report the validation to Ray Train, with a checkpoint from rank 0."""
        import ray.train

        metrics = {k: v for k, v in val_row.items() if k != "sample"}
        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), self.model, self.optimizer, dataclasses.asdict(self.state), self.history,
                            self.run.lora)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    def train(self) -> None:
        from emorl_ray.metrics import record_train_step, record_validation

        s, t, name = self.state, self.t, self.run.run_name
        while not self.finished():
            for hook in self.hooks:
                hook.before_step(s.step, self.objectives)
            t0 = time.perf_counter()
            row = self.step()
            # The last step is always validated, so the saved adapter is the one last validated.
            val = self.validate() if s.step % t.val_every == 0 or self.finished() else None
            s.train_seconds += time.perf_counter() - t0
            if val is not None and s.converged and s.converged_at is None:
                s.converged_at = s.counters()
            row["train_seconds"] = s.train_seconds
            self.history.append(row)
            step_s = time.perf_counter() - t0
            log.info("[%s] step %d/%d reward %.4f (%.1f s)", name, s.step, t.max_steps, row["reward"], step_s)
            if self.rank == 0:
                record_train_step(name, s.step, row["reward"], t.batch_size * self.world,
                                  row["rollout_tokens"] * self.world, step_s)
            if val is None:
                continue
            val["train_seconds"] = s.train_seconds
            self.history.append(val)
            log.info("[%s] step %d/%d val %.4f%s", name, s.step, t.max_steps, val["val_score"],
                     " (converged)" if s.converged else "")
            if self.rank == 0:
                record_validation(name, val["val_score"])
            self.checkpoint(val)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's entry point: {"experiment": cfg.to_dict(), "run": a TrainJob, "hooks": [...]}."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    recipe = SCSTRecipe(config_from_dict(config["experiment"]), config["run"], config.get("hooks"))
    recipe.setup()
    recipe.resume()
    recipe.train()
