"""Evaluate a finished run again: any set of methods, under greedy and/or sampled decoding, with
the run's trained adapters and searched weights. Rewrites the run's eval/ and report.

    python jobs/evaluate.py runs/default
    python jobs/evaluate.py runs/default --methods emorl,baselines --set evaluation.decodings=[sampled]
    python jobs/evaluate.py runs/default --set evaluation.samples_per_prompt=4 --set evaluation.sampling.top_k=50

Methods: base, single, equal, emorl, compared (search.compare_aggregations), baselines, router and
bandit (the per-prompt methods; rows only where the run has a router: jobs/train_router.py).
"""

from __future__ import annotations

import argparse
import json
import sys

from emorl_ray.cli.args import parse_overrides, setup_job
from emorl_ray.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the run directory jobs/train_all.py wrote (<output_dir>/<name>)")
    p.add_argument("--methods", help="comma-separated method groups (sets evaluation.methods)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an evaluation field, e.g. --set evaluation.decodings=[greedy]")
    args = p.parse_args(argv)
    setup_job()
    overrides = parse_overrides(args.set)
    if overrides is None:
        return 2
    if args.methods:
        overrides["evaluation.methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    from emorl_ray.pipeline import evaluate_run

    try:
        summary = evaluate_run(args.run_dir, overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0

