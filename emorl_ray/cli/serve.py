"""Serve a finished run's ensemble over HTTP, with weights chosen per request.

    python jobs/serve_ensemble.py --run-dir runs/default
    curl -s 127.0.0.1:8000/emorl/generate -H 'content-type: application/json' \\
        -d '{"prompts": ["I feel stuck at work."], "weights": {"reflection": 0.6, "empathy": 0.3, "fluency": 0.1}}'

Binds to 127.0.0.1 unless `serving.host` (or --host) says otherwise. Ctrl-C stops it.
"""

from __future__ import annotations

import argparse
import re
import socket
import sys
import time

from emorl_ray.cli.args import parse_overrides
from emorl_ray.config import ConfigError
from emorl_ray.pipeline import connect_ray, delete_apps, joins_a_cluster

# What --set may change: where and on what the endpoint (and the bandit's scorers) run, not the run
# itself. A run trained on GPUs is served on a CPU machine with --set serving.num_gpus=0.
SERVING_FIELDS = re.compile(r"serving\.\w+|objectives\.[^.]+\.scorer\.(num_cpus|num_gpus|num_replicas|resources)")


class UsageError(Exception):
    """What is wrong with the command line or the run directory: the message to print (exit 2)."""


def check_can_listen(host: str, port: int) -> None:
    """UsageError unless this machine can listen on host:port, checked before Ray starts: Serve's
    proxy would otherwise fail to bind only after Ray and Serve are up, with a traceback."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the proxy binds: TIME_WAIT is no clash
            s.bind((host, port))
    except OSError as e:
        raise UsageError(f"error: serving.host/serving.port: cannot listen on {host}:{port} ({e.strerror}); "
                         "pass --port with a free port (or --host), or stop what holds it") from None


def check_running_serve(host: str, port: int) -> None:
    """On a joined cluster whose Serve already runs, that Serve keeps its HTTP address
    (`serve.start` only logs that new options do not apply): an endpoint asked for elsewhere would
    be announced at an address where nothing of it listens. ConfigError naming what does."""
    from ray.serve.context import _get_global_client  # Serve's running config has no public getter

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:  # no Serve yet: serve.start starts it with ours
        return
    http = client.http_config
    if (http.host, http.port) != (host, port):
        raise ConfigError("serving.host/serving.port", f"this cluster's Serve already listens on "
                          f"{http.host}:{http.port}, and a running Serve keeps its address; pass --host "
                          f"{http.host} --port {http.port}, or stop that Serve (`serve shutdown`: every "
                          "application on it) for one on yours")


def _what_to_serve(args, overrides: dict):
    """The run's config, adapters, default weights, router and bandit state, or UsageError."""
    from emorl_ray import storage
    from emorl_ray.rundir import RunDir
    from emorl_ray.training.launch import ensemble_adapters

    for key in overrides:
        if not SERVING_FIELDS.fullmatch(key):
            raise UsageError(f"error: --set {key}: emorl serve changes only how the run is served: serving.*, and "
                             "for --bandit objectives.<objective>.scorer.num_cpus/num_gpus/num_replicas/resources")
    run_dir = RunDir.at(args.run_dir)
    if not run_dir.exists() or not storage.is_file(run_dir.manifest):
        raise UsageError(f"error: --run-dir {args.run_dir}: no config.yaml and training/manifest.json; "
                         "point it at a finished jobs/train_all.py run")
    flags = {"serving.host": args.host, "serving.port": args.port}
    overrides = overrides | {k: v for k, v in flags.items() if v is not None}
    try:
        cfg = run_dir.load_config(overrides)
    except ConfigError as e:
        raise UsageError(f"config error: {e}") from None
    try:
        adapters = ensemble_adapters(cfg, run_dir.runs())
    except RuntimeError as e:
        raise UsageError(f"error: --run-dir {args.run_dir}: {e}") from None
    default_weights = run_dir.search_result().best_weights if run_dir.has_search_result() else None
    router = run_dir.router if storage.is_file(storage.join(run_dir.router, "router.json")) else None
    if args.bandit and router is None:
        raise UsageError(f"error: --bandit needs the run's router; fit it first: python jobs/train_router.py {run_dir}")
    if args.bandit and cfg.serving.num_replicas != 1:
        raise UsageError("error: --bandit: the bandit learns in one replica; set serving.num_replicas to 1")
    bandit = run_dir.file("bandit", "state.json") if args.bandit else None
    return cfg, adapters, default_weights, router, bandit


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a run directory written by jobs/train_all.py (path or URI)")
    ap.add_argument("--host", help="override serving.host")
    ap.add_argument("--port", type=int, help="override serving.port")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a serving field, e.g. --set serving.num_gpus=0 to serve a GPU-trained run on CPUs")
    ap.add_argument("--bandit", action="store_true",
                    help="also serve weights 'bandit': a contextual bandit over the searched weights that learns "
                         "from the scorers (needs the run's router; deploys the scorers; state in <run>/bandit/)")
    args = ap.parse_args(argv)
    overrides = parse_overrides(args.set)
    if overrides is None:  # a malformed --set, said
        return 2
    try:
        cfg, adapters, default_weights, router, bandit = _what_to_serve(args, overrides)
        join = joins_a_cluster()  # asked once: a stale address file is warned of once
        if not join:  # we start a local Ray, so Serve's proxy listens on this machine
            check_can_listen(cfg.serving.host, cfg.serving.port)
    except UsageError as e:
        print(e, file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from emorl_ray.ensemble.http import HTTP_APP, deploy_http
    from emorl_ray.placement import check_serving

    started = connect_ray(join)
    try:  # a replica no node can hold would keep Serve waiting for it forever
        check_serving(cfg, with_scorers=bandit is not None)
        if not started:
            check_running_serve(cfg.serving.host, cfg.serving.port)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        ray.shutdown()  # ours stops; a joined cluster is only disconnected from
        return 2
    serve.start(http_options={"host": cfg.serving.host, "port": cfg.serving.port})
    ours = [HTTP_APP]  # what Ctrl-C takes down on a cluster that stays up
    if bandit is not None:  # the bandit learns from the scorers' rewards
        from emorl_ray.pipeline import trained_scorers
        from emorl_ray.rewards.serve import app_name, deploy_scorers

        running = set(serve.status().applications)  # a job's scorers on the same cluster stay its own
        trained_scorers(cfg, train=False)
        deploy_scorers(cfg)
        ours += [app_name(o) for o in cfg.objective_names if app_name(o) not in running]
    deploy_http(cfg, adapters, default_weights, router, bandit)
    base = f"http://{cfg.serving.host}:{cfg.serving.port}{cfg.serving.route_prefix}"
    auto = (", weights 'auto' = the run's router" if router else "") + (", 'bandit' = the bandit" if bandit else "")
    print(f"ensemble of {list(adapters)} serving at {base}/generate and, OpenAI-shaped, at {base}/v1 "
          f"(model {cfg.name!r}{auto})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        if started:
            serve.shutdown()
        else:  # a joined cluster's Serve may serve others: take down only what this command put up
            delete_apps(ours)
        ray.shutdown()
    return 0
