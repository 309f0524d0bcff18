"""The paper's efficiency claim, measured: training data and time to convergence of EMORL (its K
single-objective runs) against the single-policy baselines Uniform and DynaOpt, on the same data,
with the same k-SCST loop, scorers, convergence rule and step cap.

Runs the main job (`jobs/train_all.py`) with `baselines.methods=[uniform, dynaopt]`, then reads
the run directory: each run's data points and training seconds at convergence (the paper's
counters), whether it converged before `training.max_steps`, the validation score it reached, and
each method's test average from the evaluation (greedy, the same decoding for every method).

EMORL's cost is the sum over its K runs (they are independent and run in parallel, so its wall
time is that of the slowest); its validation score is the searched ensemble's, the average of the
objectives as for the baselines.

    python bench/data_efficiency.py                                   # embedded default, this CPU
    python bench/data_efficiency.py --config configs/pair_smollm2.yaml --set data.path=pair.csv ...

Writes bench/results/data_efficiency.json, prints a table and, as its last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from emorl_ray.rundir import RunDir, RunManifest, SearchResult

ROOT = Path(__file__).resolve().parents[1]


def method_rows(manifests: list[RunManifest], objectives: list[str], search: SearchResult,
                tables: list[dict]) -> list[dict]:
    """One row per method: EMORL (its single-objective runs summed) and each baseline."""
    greedy = next((t for t in tables if t["split"] == "test" and t["decoding"] == "greedy"), None)
    test_avg = {m["method"]: m["average"] for m in (greedy["methods"] if greedy else [])}
    single = [m for m in manifests if m.is_ensemble_member and m.name in objectives]
    rows = [{
        "method": "EMORL", "runs": len(single),
        "data_points": sum(m.data_points for m in single),
        "train_seconds": round(sum(m.train_seconds for m in single), 1),
        "slowest_run_seconds": round(max(m.train_seconds for m in single), 1),
        "converged": all(m.converged for m in single),
        "converged_runs": sum(m.converged for m in single),
        "trained_data_points": sum(m.trained_data_points for m in single),
        "val_score": search.best_score,
        "test_average": test_avg.get("EMORL (searched weights)"),
        "per_run": {m.name: {"data_points": m.data_points, "train_seconds": m.train_seconds,
                             "converged": m.converged, "final_val_score": m.final_val_score} for m in single},
    }]
    for m in manifests:
        if m.is_ensemble_member:
            continue
        label = f"baseline: {m.name}" + ("" if m.lora else " (full fine-tune)")
        rows.append({"method": {"uniform": "Uniform", "dynaopt": "DynaOpt"}.get(m.name, m.name), "runs": 1,
                     "data_points": m.data_points, "train_seconds": m.train_seconds,
                     "slowest_run_seconds": m.train_seconds, "converged": m.converged,
                     "converged_runs": int(m.converged), "trained_data_points": m.trained_data_points,
                     "val_score": m.final_val_score, "test_average": test_avg.get(label)})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--output-dir", default="/tmp/emorl-bench-runs")
    ap.add_argument("--name", default=f"data-efficiency-{int(time.time())}")
    args = ap.parse_args()
    cmd = [sys.executable, str(ROOT / "jobs" / "train_all.py"), "--config", args.config, "--output-dir",
           args.output_dir, "--name", args.name, "--set", "baselines.methods=[uniform, dynaopt]"]
    for item in args.set:
        cmd += ["--set", item]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    t0 = time.time()
    log_path = Path(args.output_dir) / f"{args.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if code != 0:
        print(f"the job failed (exit {code}); its log: {log_path}", file=sys.stderr)
        return code
    run_dir = Path(args.output_dir) / args.name
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    objectives = list(cfg["objectives"])
    rd = RunDir.at(str(run_dir))
    rows = method_rows(rd.runs(), objectives, rd.search_result(), rd.eval_result().tables)
    t = cfg["training"]
    result = {"command": " ".join(["python"] + sys.argv), "job": " ".join(cmd), "job_wall_s": round(wall, 1),
              "cpus": os.cpu_count(), "run_dir": str(run_dir),
              "rule": {"max_steps": t["max_steps"], "val_every": t["val_every"], **t["convergence"],
                       "batch_size": t["batch_size"], "k": t["k"]},
              "methods": rows}
    out = ROOT / "bench" / "results" / "data_efficiency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"convergence: the last {t['convergence']['window']} validations (every {t['val_every']} steps) with "
          f"std/mean < {t['convergence']['threshold']}; cap {t['max_steps']} steps of {t['batch_size']} prompts")
    print("| method | runs | data points to converge | training s (summed) | slowest run s | converged | "
          "val score | test average (greedy) |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        test = "-" if r["test_average"] is None else f"{r['test_average']:.4f}"
        print(f"| {r['method']} | {r['runs']} | {r['data_points']} | {r['train_seconds']} | "
              f"{r['slowest_run_seconds']} | "
              f"{r['converged_runs']}/{r['runs']} | {r['val_score']:.4f} | {test} |")
    print(json.dumps({r["method"]: {k: r[k] for k in ("data_points", "train_seconds", "converged", "val_score",
                                                      "test_average")} for r in rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
