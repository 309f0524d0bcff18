"""Serve a finished run's ensemble over HTTP, with weights chosen per request.

    python jobs/serve_ensemble.py --run-dir runs/default
    curl -s 127.0.0.1:8000/emorl/generate -H 'content-type: application/json' \\
        -d '{"prompts": ["I feel stuck at work."], "weights": {"reflection": 0.6, "empathy": 0.3, "fluency": 0.1}}'

Binds to 127.0.0.1 unless `serving.host` (or --host) says otherwise. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import sys
import time

from emorl_ray.config import ConfigError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a run directory written by jobs/train_all.py (path or URI)")
    ap.add_argument("--host", help="override serving.host")
    ap.add_argument("--port", type=int, help="override serving.port")
    ap.add_argument("--bandit", action="store_true",
                    help="also serve weights 'bandit': a contextual bandit over the searched weights that learns "
                         "from the scorers (needs the run's router; deploys the scorers; state in <run>/bandit/)")
    args = ap.parse_args(argv)
    from emorl_ray import storage
    from emorl_ray.rundir import RunDir

    run_dir = RunDir.at(args.run_dir)
    if not run_dir.exists() or not storage.is_file(run_dir.manifest):
        print(f"error: --run-dir {args.run_dir}: no config.yaml and training/manifest.json; "
              "point it at a finished jobs/train_all.py run", file=sys.stderr)
        return 2
    overrides = {k: v for k, v in (("serving.host", args.host), ("serving.port", args.port)) if v is not None}
    try:
        cfg = run_dir.load_config(overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from emorl_ray.training.launch import ensemble_adapters, read_manifest

    try:
        adapters = ensemble_adapters(cfg, read_manifest(run_dir))
    except RuntimeError as e:
        print(f"error: --run-dir {args.run_dir}: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from emorl_ray.ensemble.http import deploy_http
    from emorl_ray.pipeline import connect_ray

    searched = run_dir.file("search", "result.json")
    default_weights = storage.read_json(searched)["best_weights"] if storage.is_file(searched) else None
    router = run_dir.router if storage.is_file(storage.join(run_dir.router, "router.json")) else None
    if args.bandit and router is None:
        print(f"error: --bandit needs the run's router; fit it first: python jobs/train_router.py {run_dir}",
              file=sys.stderr)
        return 2
    if args.bandit and cfg.serving.num_replicas != 1:
        print("error: --bandit: the bandit learns in one replica; set serving.num_replicas to 1", file=sys.stderr)
        return 2
    bandit = run_dir.file("bandit", "state.json") if args.bandit else None
    connect_ray()
    serve.start(http_options={"host": cfg.serving.host, "port": cfg.serving.port})
    if bandit is not None:  # the bandit learns from the scorers' rewards
        from emorl_ray.pipeline import trained_scorers
        from emorl_ray.rewards.serve import deploy_scorers

        trained_scorers(cfg, train=False)
        deploy_scorers(cfg)
    deploy_http(cfg, adapters, default_weights, router, bandit)
    base = f"http://{cfg.serving.host}:{cfg.serving.port}{cfg.serving.route_prefix}"
    auto = (", weights 'auto' = the run's router" if router else "") + (", 'bandit' = the bandit" if bandit else "")
    print(f"ensemble of {list(adapters)} serving at {base}/generate and, OpenAI-shaped, at {base}/v1 "
          f"(model {cfg.name!r}{auto})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
        ray.shutdown()
    return 0

