"""Run EMORL end to end: train one adapter per objective (Ray Train, in parallel), search the
ensemble weights (Ray Tune), evaluate, and write a run directory.

    python jobs/train_all.py --config configs/default.yaml
    ray job submit --working-dir . -- python jobs/train_all.py --config configs/default.yaml

Re-running with the same config resumes: finished trainings and search trials are not redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout (or a `ray job submit` working dir) without installing

from emorl_ray.config import ConfigError, load_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"), help="experiment YAML")
    p.add_argument("--name", help="run name (overrides `name` in the config)")
    p.add_argument("--output-dir", help="where run directories go (overrides `output_dir`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.max_steps=10 (value parsed as YAML)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        overrides[key] = yaml.safe_load(value)
    if args.name:
        overrides["name"] = args.name
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from emorl_ray.pipeline import run

    try:
        summary = run(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"\nResults are in {summary['run_dir']} (report: {summary['report']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
