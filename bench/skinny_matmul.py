"""The two ways of writing a linear layer's product, x @ W^T (F.linear) and (W @ x^T)^T, timed on
the weight shapes of a SmolLM2 layer and LM head for row counts from a decode step's (K*B) to a
prefill's. `emorl_ray.decoding.engine.linear` uses the second on a CPU up to
`_SKINNY_ROWS` rows; this is the measurement behind that choice, to re-run on other CPUs.

    python bench/skinny_matmul.py            # about a minute on 2 cores

Each weight list holds about 200 MB, so that every product streams its weight from memory as in a
real decode step (a weight reused from cache would flatter both). Writes
bench/results/skinny_matmul-<device>.json and prints a table of microseconds per product
(best of `--repeats`) and the speedup of the second form.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from emorl_ray.decoding.engine import _SKINNY_ROWS

ROOT = Path(__file__).resolve().parents[1]

# (out, in): SmolLM2-135M's MLP up/gate, MLP down, attention q/o, attention k/v, LM head.
SHAPES = [(1536, 576), (576, 1536), (576, 576), (192, 576), (49152, 576)]


def per_product_us(rows: int, weights: list[torch.Tensor], fn, repeats: int) -> float:
    x = torch.randn(rows, weights[0].shape[1])
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for w in weights:
            fn(x, w)
        best = min(best, time.perf_counter() - t)
    return best / len(weights) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,3,6,16,48,144,768")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    forms = {"linear": lambda x, w: torch.nn.functional.linear(x, w),
             "w_xT": lambda x, w: torch.mm(w, x.t()).t().contiguous()}
    rows_list = [int(r) for r in args.rows.split(",")]
    results = []
    for out_f, in_f in SHAPES:
        weights = [torch.randn(out_f, in_f) for _ in range(max(2, 200_000_000 // (out_f * in_f * 4)))]
        for rows in rows_list:
            t = {name: per_product_us(rows, weights, fn, args.repeats) for name, fn in forms.items()}
            results.append({"shape": [out_f, in_f], "rows": rows, "linear_us": round(t["linear"], 1),
                            "w_xT_us": round(t["w_xT"], 1), "speedup": round(t["linear"] / t["w_xT"], 2)})
        del weights
    out = {"command": " ".join(["python"] + sys.argv), "device": "cpu", "cpu": platform.processor() or "cpu",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "skinny_rows": _SKINNY_ROWS,
           "results": results}
    path = ROOT / "bench" / "results" / "skinny_matmul-cpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"us per product, x @ W^T (F.linear) / (W @ x^T)^T, {torch.get_num_threads()} threads; "
          f"_linear uses the second up to {_SKINNY_ROWS} rows")
    print("| weight (out, in) | " + " | ".join(f"{r} rows" for r in rows_list) + " |")
    print("|---|" + "---|" * len(rows_list))
    for out_f, in_f in SHAPES:
        cells = [r for r in results if r["shape"] == [out_f, in_f]]
        print(f"| {out_f}x{in_f} | " + " | ".join(f"{c['linear_us']:.0f} / {c['w_xT_us']:.0f} ({c['speedup']}x)"
                                                  for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
