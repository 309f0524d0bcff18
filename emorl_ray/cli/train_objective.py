"""Train one more objective's adapter into an existing run directory.

Add the objective (with its scorer) to the run's config file, then:

    python jobs/train_objective.py --config my.yaml --objective politeness
    python jobs/train_all.py --config my.yaml     # search + evaluate with all adapters

The config must be the run's own (its `config.yaml`) plus the new objective(s); the other runs are
kept, the new one is added to `training/manifest.json`, and the second command reuses every trained
adapter and searches the ensemble weights of all of them.
"""

from __future__ import annotations

import argparse
import json
import sys

from emorl_ray.cli.args import add_config_args, config_from_args
from emorl_ray.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--objective", action="append", required=True, metavar="NAME",
                   help="the objective to train (repeat for several)")
    args = p.parse_args(argv)
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from emorl_ray.pipeline import train_objectives

    try:
        runs = train_objectives(cfg, args.objective)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(runs, indent=2))
    print(f"\nTrained {args.objective} into {cfg.run_dir}; now run jobs/train_all.py with the same config "
          "to search and evaluate the ensemble of all adapters.")
    return 0

