"""Run EMORL end to end: train one adapter per objective (Ray Train, in parallel), search the
ensemble weights (Ray Tune), evaluate, and write a run directory.

    python jobs/train_all.py --config configs/default.yaml
    ray job submit --working-dir . -- python jobs/train_all.py --config configs/default.yaml

Re-running with the same config resumes: finished trainings and search trials are not redone.
`--resume RUN_DIR` does the same from the run directory alone (after a killed driver, say):

    python jobs/train_all.py --resume runs/default

`--check` validates the config, reads the data, loads the model's config, takes a test write in the
run directory's place and checks the resource requests against the cluster (counting the nodes its
autoscaler may start), then exits without training: 0 when the job can run, 2 with the field to fix.
"""

from __future__ import annotations

import argparse
import json
import sys

from emorl_ray.cli.args import DEFAULT_CONFIG, add_config_args, config_from_args
from emorl_ray.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR with the experiment saved there (its config.yaml); "
                        "finished trainings and search trials are kept")
    p.add_argument("--check", action="store_true",
                   help="check config, data, model, storage and resources, then exit without training")
    args = p.parse_args(argv)
    if args.resume:
        from emorl_ray.rundir import RunDir

        run_dir = RunDir.at(args.resume)
        if not run_dir.exists():
            print(f"error: --resume {run_dir}: no config.yaml there; give a run directory "
                  "(<output_dir>/<name>, a path or a URI) that jobs/train_all.py wrote", file=sys.stderr)
            return 2
        if args.name or args.output_dir or args.config != str(DEFAULT_CONFIG):
            print("error: --resume takes the run's own config, name and output dir; drop --config, --name "
                  "and --output-dir", file=sys.stderr)
            return 2
        args.config, args.name, args.output_dir = run_dir.config, run_dir.name, run_dir.output_dir
    cfg = config_from_args(args)
    if cfg is None:
        return 2
    from emorl_ray.pipeline import check, run_pipeline

    try:
        if args.check:
            print(json.dumps(check(cfg), indent=2))
            print("\nThe job can run: start it without --check.")
            return 0
        summary = run_pipeline(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    print(f"\nResults are in {summary['run_dir']} (report: {summary['report']})")
    return 0

