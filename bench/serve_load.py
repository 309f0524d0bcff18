"""Load on the Serve side: the ensemble HTTP endpoint and a scorer deployment, driven from another
process on 127.0.0.1 by 1, 8 and 32 concurrent clients for a bounded time each. Reports
requests/s, p50/p99 latency, and errors; every request sent is accounted for (ok + errors).
The endpoint is driven twice: every client with the same weights, and every request with its own
random weights (personalised traffic, which the endpoint batches with per-row weights); the
table's last column is the second's throughput over the first's.

    python bench/serve_load.py --tiny                          # tiny random model + toy scorers, ~3 min
    python bench/serve_load.py --run-dir runs/default          # a finished run (the embedded default)
    python bench/serve_load.py --run-dir runs/default --concurrency 1 8 --duration 30

Writes bench/results/serve_load-<tiny|run name>.json and prints a table. The server side (Ray,
Serve, the deployments) runs in this process; each load level runs in a fresh client process: HTTP
through aiohttp, the scorer through a Serve handle of a driver that joins this Ray cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HTTP_TARGETS = {"http": "ensemble HTTP, shared weights", "http-own-weights": "ensemble HTTP, own weights"}
PROMPTS = ["I feel like nobody at work listens to me.", "My sister and I keep fighting about our parents."]
RESPONSES = ["It sounds like you feel unheard at work.", "You are worried about your family."]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


async def drive(send, concurrency: int, duration: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered, until
    `duration` has passed; requests in flight at the deadline are waited for, not dropped."""
    latencies, errors = [], []
    sent = 0
    stop = time.perf_counter() + duration

    async def client():
        nonlocal sent
        while time.perf_counter() < stop:
            sent += 1
            t = time.perf_counter()
            try:
                await send()
                latencies.append(time.perf_counter() - t)
            except Exception as e:  # counted and reported, never hidden
                errors.append(f"{type(e).__name__}: {e}"[:300])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "duration_s": duration, "wall_s": round(wall, 2), "sent": sent,
            "ok": len(latencies), "errors": len(errors), "error_samples": errors[:3],
            "requests_per_s": round(len(latencies) / wall, 3),
            "p50_ms": round(1000 * percentile(latencies, 50), 1), "p99_ms": round(1000 * percentile(latencies, 99), 1),
            "mean_ms": round(1000 * sum(latencies) / max(len(latencies), 1), 1)}


async def http_client(url: str, body: dict, concurrency: int, duration: float, own_weights: bool) -> dict:
    """`own_weights`: every request draws its own weights (uniform on the simplex, seeded)."""
    import random

    import aiohttp

    rng = random.Random(0)

    def weights():
        if not own_weights:
            return body["weights"]
        w = [rng.expovariate(1.0) for _ in body["weights"]]
        return [x / sum(w) for x in w]

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        async def send():
            async with session.post(url, json={**body, "weights": weights()}) as r:
                payload = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}: {payload}")
                if len(payload["responses"]) != len(body["prompts"]):
                    raise RuntimeError(f"{len(payload['responses'])} responses for {len(body['prompts'])} prompts")

        return await drive(send, concurrency, duration)


async def scorer_client(app: str, concurrency: int, duration: float) -> dict:
    from ray import serve

    handle = serve.get_app_handle(app)
    prompts, responses = PROMPTS * 2, RESPONSES * 2

    async def send():
        scores = await handle.score.remote(prompts, responses)
        if len(scores) != len(prompts):
            raise RuntimeError(f"{len(scores)} scores for {len(prompts)} pairs")

    return await drive(send, concurrency, duration)


def client_main(args) -> int:
    """One load level, in its own process; prints its result as the last line."""
    if args.target in HTTP_TARGETS:
        body = json.loads(args.body)
        out = asyncio.run(http_client(args.url, body, args.concurrency, args.duration,
                                      own_weights=args.target == "http-own-weights"))
    else:
        import ray

        ray.init(address=args.address, logging_level="ERROR", log_to_driver=False)
        out = asyncio.run(scorer_client(args.target, args.concurrency, args.duration))
    print(json.dumps(out))
    return 0


def tiny_setup(tmp: Path):
    """A tiny random model, two random LoRA adapters, two toy python scorers."""
    import torch
    from peft import get_peft_model

    from emorl_ray.config import LoraConfig, parse_config
    from emorl_ray.models import Policy, lora_config
    from emorl_ray.testing import build_tiny_model

    model_dir = build_tiny_model(tmp / "model", "causal")
    raw = {"name": "serve-load", "output_dir": str(tmp / "runs"),
           "model": {"id": str(model_dir), "use_chat_template": False, "max_prompt_tokens": 32},
           "data": {"source": "demo"},
           "objectives": {"overlap": {"scorer": {"type": "python", "function": "emorl_ray.testing:word_overlap",
                                                 "num_cpus": 0.1}},
                          "brevity": {"scorer": {"type": "python", "function": "emorl_ray.testing:brevity",
                                                 "num_cpus": 0.1}}},
           "serving": {"num_cpus": 0.5, "max_new_tokens": 16}}
    cfg = parse_config(raw)
    adapters = {}
    for i, name in enumerate(cfg.objective_names):
        torch.manual_seed(i)
        policy = Policy(cfg.model)
        model = get_peft_model(policy.model, lora_config(LoraConfig(r=4, alpha=8, dropout=0.0), policy.kind))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # peft starts B at zero: make the adapters differ
        model.save_pretrained(tmp / "adapters" / name)
        adapters[name] = str(tmp / "adapters" / name)
    return cfg, adapters, 8


def run_setup(run_dir: Path):
    from emorl_ray.config import load_config
    from emorl_ray.rundir import RunDir
    from emorl_ray.training.launch import ensemble_adapters

    run_dir = RunDir.at(run_dir)
    cfg = load_config(run_dir.config)
    return cfg, ensemble_adapters(cfg, run_dir.runs()), 16


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tiny", action="store_true", help="tiny random model and toy scorers")
    src.add_argument("--run-dir", type=Path, help="a finished run of jobs/train_all.py")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--duration", type=float, default=20.0, help="seconds of load per level")
    p.add_argument("--port", type=int, default=8123)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    # client mode (internal): one load level against an already running deployment
    p.add_argument("--client", dest="target", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--body", help=argparse.SUPPRESS)
    p.add_argument("--address", help=argparse.SUPPRESS)
    p.add_argument("--concurrency-one", dest="concurrency_one", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.target:
        args.concurrency = args.concurrency_one
        return client_main(args)
    if not args.tiny and args.run_dir is None:
        p.error("give --tiny or --run-dir RUN")
    if args.run_dir is not None and not (args.run_dir / "training" / "manifest.json").is_file():
        p.error(f"--run-dir {args.run_dir}: no training/manifest.json; point it at a finished jobs/train_all.py run")
    if any(c < 1 for c in args.concurrency) or args.duration <= 0:
        p.error("--concurrency values must be >= 1 and --duration > 0")

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray
    from ray import serve

    from emorl_ray.ensemble.http import deploy_http
    from emorl_ray.rewards.serve import app_name, deploy_scorers

    tmp = tempfile.TemporaryDirectory()
    cfg, adapters, max_new_tokens = tiny_setup(Path(tmp.name)) if args.tiny else run_setup(args.run_dir)
    ray.init(dashboard_host="127.0.0.1", include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    deploy_scorers(cfg)
    deploy_http(cfg, adapters)
    url = f"http://127.0.0.1:{args.port}{cfg.serving.route_prefix}/generate"
    n = len(cfg.objective_names)
    body = {"prompts": PROMPTS, "weights": [1.0 / n] * n, "max_new_tokens": max_new_tokens}
    scorer = app_name(cfg.objective_names[0])
    address = ray.get_runtime_context().gcs_address
    results = []
    for target in (*HTTP_TARGETS, scorer):
        for c in args.concurrency:
            cmd = [sys.executable, __file__, "--client", target, "--concurrency-one", str(c),
                   "--duration", str(args.duration), "--url", url, "--body", json.dumps(body), "--address", address]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration + 900)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"client for {target} at concurrency {c} failed (exit {proc.returncode})")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["target"] = HTTP_TARGETS.get(target, f"scorer {target} (handle)")
            results.append(r)
            print(f"{r['target']:32s} c={c:3d} {r['requests_per_s']:8.2f} req/s  p50 {r['p50_ms']:8.1f} ms  "
                  f"p99 {r['p99_ms']:8.1f} ms  ok {r['ok']}  errors {r['errors']}", flush=True)
    ray.shutdown()
    tmp.cleanup()

    name = "tiny" if args.tiny else args.run_dir.name
    shared = {r["concurrency"]: r["requests_per_s"] for r in results if r["target"] == HTTP_TARGETS["http"]}
    for r in results:
        if r["target"] == HTTP_TARGETS["http-own-weights"] and shared.get(r["concurrency"]):
            r["vs_shared_weights"] = round(r["requests_per_s"] / shared[r["concurrency"]], 3)
    out = {"command": "python bench/serve_load.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "model": cfg.model.id, "adapters": list(adapters), "request": {"http": body, "scorer_pairs": 4},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
           "serving": {"num_replicas": cfg.serving.num_replicas, "num_cpus": cfg.serving.num_cpus},
           "results": results}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"serve_load-{name}.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(out, indent=2))
    tmp_path.replace(path)
    print("\n| target | clients | req/s | p50 ms | p99 ms | sent | ok | errors | own / shared weights |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['target']} | {r['concurrency']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['sent']} | {r['ok']} | {r['errors']} | {r.get('vs_shared_weights', '')} |")
    print(f"\nwrote {path}")
    return 0 if all(r["errors"] == 0 and r["ok"] == r["sent"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
