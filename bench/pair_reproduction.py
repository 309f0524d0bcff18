"""The paper's comparison on real data: EMORL vs the single adapters, the logit and parameter
aggregations and the Uniform / DynaOpt baselines, on PAIR prompts with SmolLM2-135M-Instruct
(`configs/pair_smollm2.yaml`), tested on PAIR's test prompts and on AnnoMI client utterances.

    python bench/pair_reproduction.py --pair /path/to/topic_clean_umich.csv --annomi /path/to/AnnoMI-simple.csv

Trains the reflection scorer first if `--scorer` does not exist yet (jobs/train_scorer.py), then runs
the whole pipeline. Sizes are those of the config (CPU: batch 4 x k 2, 16 steps, 12 validation and
32 test prompts); `--set key=value` changes any of them, e.g. the paper's scale on a GPU:
`--set training.batch_size=16 --set training.k=3 --set training.max_steps=10000 --set training.val_every=8
--set training.convergence.window=20 --set training.scaling.use_gpu=true ...`.
Writes bench/results/pair_reproduction.json and prints the results table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

SHARED = ROOT.parent / "shared" / "data"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default=str(SHARED / "pair" / "topic_clean_umich.csv"))
    p.add_argument("--annomi", default=str(SHARED / "annomi" / "AnnoMI-simple.csv"))
    p.add_argument("--scorer", default=str(ROOT / "models" / "reflection_scorer"))
    p.add_argument("--scorer-epochs", type=int, default=3)
    p.add_argument("--config", default=str(ROOT / "configs" / "pair_smollm2.yaml"))
    p.add_argument("--output-dir", default=str(ROOT / "bench" / "results" / "runs"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for flag, path in (("--pair", args.pair), ("--annomi", args.annomi)):
        if not Path(path).is_file():
            print(f"error: {flag} {path}: no such file (bring your own copy of the data)", file=sys.stderr)
            return 2

    t0 = time.time()
    if not (Path(args.scorer) / "config.json").exists():
        from jobs.train_scorer import main as train_scorer

        rc = train_scorer(["--pair", args.pair, "--annomi", args.annomi, "--out", args.scorer,
                           "--epochs", str(args.scorer_epochs)])
        if rc:
            return rc
    scorer_s = time.time() - t0
    scorer_metrics = json.loads((Path(args.scorer) / "scorer_metrics.json").read_text())

    from emorl_ray.config import ConfigError, load_config
    from emorl_ray.pipeline import run_pipeline

    overrides = {"data.path": args.pair, "evaluation.generalization.path": args.annomi,
                 "objectives.reflection.scorer.model": str(Path(args.scorer).resolve()),
                 "output_dir": args.output_dir}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = run_pipeline(cfg)
    metrics = cfg.run_dir.eval_result().to_dict()
    objectives = cfg.objective_names
    out = {"command": "python bench/pair_reproduction.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "config": cfg.to_dict(), "scorer": {k: v for k, v in scorer_metrics.items() if k != "history"},
           "scorer_wall_s": round(scorer_s, 1), "pipeline": summary, "tables": metrics["tables"],
           "pareto": metrics.get("pareto")}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "pair_reproduction.json").write_text(json.dumps(out, indent=2))
    from emorl_ray.evaluation.report import results_table, to_markdown

    for t in metrics["tables"]:
        where = "PAIR test" if t["split"] == "test" else f"{t['source']} (generalisation)"
        print(f"\n{where}, {t['decoding']} decoding ({t['methods'][0]['n_prompts']} prompts):\n")
        print(to_markdown([("table", *results_table(t["methods"], objectives))]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
