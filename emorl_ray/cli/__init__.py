"""`emorl <command>`: the package's console entry point; each command is one module here, and
`jobs/<script>.py` runs the same module for `ray job submit`.

    emorl run --config configs/default.yaml         # jobs/train_all.py: the whole pipeline
    emorl evaluate runs/default                     # jobs/evaluate.py
    emorl serve runs/default                        # jobs/serve_ensemble.py
    emorl train-objective --objective NAME ...      # jobs/train_objective.py
    emorl train-scorer --data PAIR.csv --out DIR    # jobs/train_scorer.py
    emorl train-router runs/default                 # jobs/train_router.py
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "run": "emorl_ray.cli.run",
    "evaluate": "emorl_ray.cli.evaluate",
    "serve": "emorl_ray.cli.serve",
    "train-objective": "emorl_ray.cli.train_objective",
    "train-scorer": "emorl_ray.cli.train_scorer",
    "train-router": "emorl_ray.cli.train_router",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        return 0 if argv else 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return module.main(argv[1:])
