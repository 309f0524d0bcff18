"""Fit the per-prompt router on a finished run's search and save it to <run>/router/.

    python jobs/train_router.py runs/default
    python jobs/evaluate.py runs/default --methods emorl,router   # the router's row beside EMORL's

The router picks, for each prompt, one of the weight vectors the search scored, by the prompt's
nearest validation prompts (emorl_ray/routing/router.py). It prints its leave-one-out validation
score next to the single searched vector's, measured the same way. `search.router: true` makes it
a stage of jobs/train_all.py instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from emorl_ray.cli.args import setup_job
from emorl_ray.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory jobs/train_all.py wrote (path or URI)")
    args = p.parse_args(argv)
    setup_job()
    from emorl_ray.routing import fit_run_router
    from emorl_ray.rundir import RunDir

    run_dir = RunDir.at(args.run_dir)
    try:
        if not run_dir.exists():
            raise ConfigError("run_dir", f"{run_dir} holds no run (no config.yaml)")
        cfg = run_dir.load_config()
        metrics = fit_run_router(cfg, run_dir)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2))
    print(f"\nRouter saved to {run_dir.router}")
    return 0

