"""Wall time and peak memory of the main job (`jobs/train_all.py`) on this machine.

Runs the job as a subprocess and samples, every second, the summed proportional set size (PSS:
shared pages split between the processes that map them, so Ray's shared memory and the shared
libraries are not counted once per process) of every process in its tree plus every Ray process
it started (raylet, GCS, workers, Serve replicas).
Writes bench/results/default_job.json and prints a table.

    python bench/default_job.py [--config configs/default.yaml] [--output-dir /tmp/bench-runs]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_pss(root: psutil.Process) -> int:
    procs = {root.pid: root}
    try:
        for p in root.children(recursive=True):
            procs[p.pid] = p
    except psutil.Error:
        pass
    for p in psutil.process_iter(["cmdline"]):  # Ray daemons re-parent to init
        cmd = " ".join(p.info["cmdline"] or [])
        if "ray::" in cmd or "/ray/" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            procs[p.pid] = p
    total = 0
    for p in procs.values():
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            pass
    return total


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    ap.add_argument("--output-dir", default="/tmp/emorl-bench-runs")
    ap.add_argument("--name", default=f"bench-{int(time.time())}")
    args = ap.parse_args()
    cmd = [sys.executable, str(ROOT / "jobs" / "train_all.py"), "--config", args.config,
           "--output-dir", args.output_dir, "--name", args.name]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    log_path = Path(args.output_dir) / f"{args.name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    peak = 0
    with open(log_path, "w") as log:  # the job writes its log straight to the file: no pipe to drain
        t0 = time.time()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            peak = max(peak, tree_pss(ps))
            time.sleep(1.0)
    wall = time.time() - t0
    run_dir = Path(args.output_dir) / args.name
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    result = {"command": " ".join(cmd), "exit_code": proc.returncode, "wall_s": round(wall, 1),
              "peak_pss_gib": round(peak / 2**30, 2), "cpus": os.cpu_count(),
              "machine": platform.platform(), "stage_timings_s": summary.get("timings"),
              "best_val_score": summary.get("best_val_score"), "log": str(log_path)}
    out = ROOT / "bench" / "results" / "default_job.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("| metric | value |\n|---|---|")
    for k in ("exit_code", "wall_s", "peak_pss_gib", "cpus"):
        print(f"| {k} | {result[k]} |")
    for k, v in (result["stage_timings_s"] or {}).items():
        print(f"| {k} | {v:.1f} |")
    print(json.dumps(result))
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
