"""The Ray Train worker loop: one policy trained by k-SCST on one reward, with validation,
the convergence rule, and checkpoints that resume exactly (spec §4.3).

Counters follow the paper: data points = prompts consumed (k samples per prompt not counted);
training seconds = loop wall time (model and scorer loading excluded; validation included).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from emorl_ray.config import ExperimentConfig, config_from_dict
from emorl_ray.models import use_reserved_cpus
from emorl_ray.training.weighting import build_weighting

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"      # PeftModel.from_pretrained-loadable (LoRA runs)
FULL_MODEL_DIR = "model"     # from_pretrained-loadable (full fine-tuning runs)
STATE_FILE = "state.json"
HISTORY_FILE = "history.jsonl"
OPTIMIZER_FILE = "optimizer.pt"


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


CHECKSUM_FILE = "checksums.json"


class CorruptCheckpoint(Exception):
    pass


def _file_digests(directory: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name != CHECKSUM_FILE}


def save_checkpoint(directory: Path, model, optimizer, state: dict, history: list[dict], lora: bool) -> None:
    from safetensors.torch import save_model

    if lora:
        model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
    else:
        (directory / FULL_MODEL_DIR).mkdir()
        model.config.save_pretrained(directory / FULL_MODEL_DIR)
        save_model(model, str(directory / FULL_MODEL_DIR / "model.safetensors"))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / HISTORY_FILE).write_text("".join(json.dumps(h) + "\n" for h in history))
    (directory / STATE_FILE).write_text(json.dumps(state))
    # Written last: a checkpoint whose files do not match it (truncated upload, bit rot, a copy cut
    # short) is detected before anything is loaded from it.
    (directory / CHECKSUM_FILE).write_text(json.dumps(_file_digests(directory)))


def verify_checkpoint(directory: Path) -> None:
    """Raise CorruptCheckpoint unless every file is as it was saved. Checkpoints written before
    checksums existed only need their state file."""
    if not (directory / STATE_FILE).exists():
        raise CorruptCheckpoint(f"no {STATE_FILE}")
    saved = directory / CHECKSUM_FILE
    if not saved.exists():
        return
    try:
        expected = json.loads(saved.read_text())
    except json.JSONDecodeError:
        raise CorruptCheckpoint(f"{CHECKSUM_FILE} is not valid JSON") from None
    actual = _file_digests(directory)
    bad = sorted(name for name in expected if actual.get(name) != expected[name])
    if bad:
        raise CorruptCheckpoint(f"files changed or missing since it was saved: {bad}")


def load_checkpoint(directory: Path, model, optimizer, lora: bool) -> tuple[dict, list[dict]]:
    from safetensors.torch import load_file, load_model

    verify_checkpoint(directory)
    if lora:
        from peft import set_peft_model_state_dict

        weights = load_file(str(directory / ADAPTER_DIR / "adapter_model.safetensors"))
        set_peft_model_state_dict(model, weights)
    else:
        load_model(model, str(directory / FULL_MODEL_DIR / "model.safetensors"))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))
    history = [json.loads(line) for line in (directory / HISTORY_FILE).read_text().splitlines() if line]
    return json.loads((directory / STATE_FILE).read_text()), history


def earlier_checkpoints(latest) -> list:
    """The run's other checkpoints in its storage (local or a URI), newest first."""
    import posixpath

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    parent = posixpath.dirname(latest.path.rstrip("/"))
    infos = latest.filesystem.get_file_info(pafs.FileSelector(parent))
    paths = sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                    and posixpath.basename(i.path).startswith("checkpoint_") and i.path != latest.path), reverse=True)
    return [Checkpoint(p, filesystem=latest.filesystem) for p in paths]


def restore(latest, model, optimizer, lora: bool, run_name: str) -> tuple[dict, list[dict]]:
    """Load the newest intact checkpoint, the one Ray Train hands back or, if that one is
    corrupt, the newest intact earlier one (Ray keeps training.keep_checkpoints of them)."""
    tried = []
    for ckpt in [latest] + earlier_checkpoints(latest):
        try:
            with ckpt.as_directory() as d:
                state, history = load_checkpoint(Path(d), model, optimizer, lora)
        except CorruptCheckpoint as e:
            log.warning("[%s] checkpoint %s is corrupt (%s); trying the one before", run_name, ckpt.path, e)
            tried.append(ckpt.path)
            continue
        if tried:  # the steps after it are trained again, exactly as before (sampling is seeded per step)
            log.warning("[%s] resuming from the earlier checkpoint %s (step %d)", run_name, ckpt.path, state["step"])
        return state, history
    raise RuntimeError(f"[{run_name}] every checkpoint of this run is corrupt ({tried}); delete the run's "
                       "Ray Train storage (<run>/ray/train-<run name>) to train it from the start")


def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from emorl_ray.data import load_splits
    from emorl_ray.metrics import record_train_step, record_validation
    from emorl_ray.rewards.serve import ServeRewards, app_name, kill_serve_replicas
    from emorl_ray.training.scst import converged, generate, scst_step

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = config_from_dict(config["experiment"])
    run = config["run"]
    t = cfg.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device() if t.scaling.use_gpu else torch.device("cpu")
    use_reserved_cpus(t.scaling.cpus_per_worker)
    torch.manual_seed(run["seed"])

    lora = run["lora"]
    policy, optimizer = build_trainable(cfg, device, lora)
    model = policy.model
    train_model = ray.train.torch.prepare_model(model) if world > 1 else model
    splits = load_splits(cfg.data, cfg.faithful)
    val_prompts = [r["prompt"] for r in splits.val]
    objectives = list(run["reward_weights"])
    rewards = ServeRewards(objectives)
    b = cfg.baselines
    weighting = build_weighting(run["method"], run["reward_weights"], b.dynaopt_gamma, b.dynaopt_history,
                                run["seed"], cfg.faithful)
    # The authors' convergence flag only ended the epoch (spec §10.7): under `faithful` training goes
    # on to the end of the epoch, while the reported counters stay those at convergence.
    steps_per_epoch = max(1, len(splits.train) // (t.batch_size * world))
    # A fresh scaler after a resume re-calibrates within a few steps; its state is not checkpointed.
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None

    state = {"step": 0, "data_points": 0, "train_seconds": 0.0, "val_history": [], "converged": False,
             "converged_at": None, "weighting": weighting.state_dict()}
    history: list[dict] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        state, history = restore(ckpt, model, optimizer, lora, run["name"])
        if state.get("weighting"):  # checkpoints of fixed-weight runs (and older ones) carry none
            weighting.load_state_dict(state["weighting"])
        state.setdefault("converged_at", None)
        log.info("[%s] resumed at step %d (%d data points)", run["name"], state["step"], state["data_points"])

    def finished() -> bool:
        if state["step"] >= t.max_steps:
            return True
        if not state["converged"]:
            return False
        return not cfg.faithful or state["step"] % steps_per_epoch == 0

    fail_at = config.get("fail_at_step")
    kill_at = config.get("kill_scorers_at_step")
    while not finished():
        # Fault-injection hook for tests: kill this run's scorer replicas once (Serve replaces them).
        if kill_at is not None and state["step"] == kill_at and not os.path.exists(config["kill_marker"]):
            Path(config["kill_marker"]).touch()
            kill_serve_replicas([app_name(o) for o in objectives])
        # Fault-injection hook for tests: fail once, after the checkpoint of an earlier step.
        if fail_at is not None and state["step"] == fail_at and not os.path.exists(config["fail_marker"]):
            Path(config["fail_marker"]).touch()
            if config.get("corrupt_latest_checkpoint_in"):  # ... and leave the newest checkpoint truncated
                newest = max(Path(config["corrupt_latest_checkpoint_in"]).glob("checkpoint_*"))
                target = max((p for p in newest.rglob("*.safetensors")), key=lambda p: p.stat().st_size)
                target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
            raise RuntimeError(f"injected failure at step {fail_at}")
        t0 = time.perf_counter()
        step = state["step"]
        torch.manual_seed(run["seed"] * 1_000_003 + step * world + rank)  # step-determined sampling
        prompts = batch_for_step(splits.train, run["seed"], step, t.batch_size * world)
        prompts = prompts[rank * t.batch_size:(rank + 1) * t.batch_size]
        stats = scst_step(policy, train_model, optimizer, prompts, rewards, weighting.weights(), t, cfg.faithful,
                          gen_model=model, scaler=scaler)
        state["step"] = step + 1
        state["data_points"] += t.batch_size * world
        row = {"kind": "train", "step": state["step"], "data_points": state["data_points"], **stats,
               "scorer_retries": rewards.retried}

        # The last step is always validated, so the saved adapter is the one last validated.
        validate = state["step"] % t.val_every == 0 or finished()
        if validate:
            texts = generate(policy, model, val_prompts, t.max_new_tokens)
            val = rewards.score_all(val_prompts, texts, objectives)
            val_means = {o: sum(v) / len(v) for o, v in val.items()}
            value = sum(val_means.values()) / len(val_means)
            state["val_history"].append(value)
            weighting.observe_validation(val)
            state["weighting"] = weighting.state_dict()
            if not state["converged"]:
                state["converged"] = converged(state["val_history"], t.convergence.window, t.convergence.threshold)
        state["train_seconds"] += time.perf_counter() - t0
        if validate and state["converged"] and state["converged_at"] is None:
            state["converged_at"] = {k: state[k] for k in ("step", "data_points", "train_seconds")}
        row["train_seconds"] = state["train_seconds"]
        history.append(row)
        step_s = time.perf_counter() - t0
        log.info("[%s] step %d/%d reward %.4f (%.1f s)", run["name"], state["step"], t.max_steps, stats["reward"],
                 step_s)
        if rank == 0:
            record_train_step(run["name"], state["step"], stats["reward"], t.batch_size * world,
                              stats["response_tokens"] * len(prompts) * t.k * world, step_s)
        if not validate:
            continue
        vrow = {"kind": "val", "step": state["step"], "data_points": state["data_points"],
                "train_seconds": state["train_seconds"], "val_score": value,
                **{f"val/{o}": m for o, m in val_means.items()}, "converged": state["converged"],
                "node_id": ray.get_runtime_context().get_node_id(),
                "sample": texts[0] if texts else ""}
        history.append(vrow)
        metrics = {k: v for k, v in vrow.items() if k != "sample"}
        log.info("[%s] step %d/%d val %.4f%s", run["name"], state["step"], t.max_steps, value,
                 " (converged)" if state["converged"] else "")
        if rank == 0:
            record_validation(run["name"], value)
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_checkpoint(Path(tmp), model, optimizer, state, history, lora)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
