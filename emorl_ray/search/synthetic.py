"""Synthetic objectives on ensemble weights, for tests and the search benchmark.

Each is scale-invariant like the real hidden-state ensemble: weights are normalised onto the
simplex first, and the all-zero vector has no value (NaN).
"""

from __future__ import annotations

import math
import time


def _normalise(w: list[float]) -> list[float] | None:
    s = sum(w)
    return None if s <= 0 else [x / s for x in w]


def concave(w: list[float], target: list[float]) -> float:
    """Negative squared distance to `target` on the simplex; maximum 0 at the target."""
    p = _normalise(w)
    if p is None:
        return float("nan")
    return -sum((a - b) ** 2 for a, b in zip(p, target))


def multimodal(w: list[float], peaks: list[tuple[list[float], float, float]]) -> float:
    """A sum of Gaussian bumps (centre, height, width) on the simplex: local optima included."""
    p = _normalise(w)
    if p is None:
        return float("nan")
    return sum(h * math.exp(-sum((a - b) ** 2 for a, b in zip(p, c)) / (2 * s * s)) for c, h, s in peaks)


FUNCTIONS = {
    "concave": lambda w: concave(w, [0.55, 0.3, 0.15][:len(w)] if len(w) == 3 else [1 / len(w)] * len(w)),
    "multimodal": lambda w: multimodal(w, [([0.7, 0.2, 0.1], 1.0, 0.12), ([0.1, 0.3, 0.6], 0.8, 0.2),
                                           ([0.3, 0.6, 0.1], 0.6, 0.08)]),
}


def synthetic_trial(config: dict) -> None:
    """Tune function trainable: score config["weights"] with config["function"].

    `fail_on` (a list of weight lists) raises for those points, to exercise failure handling;
    `sleep_s` makes a trial take time, to interrupt a run in the middle of a level.
    """
    from ray import tune

    w = list(config["weights"].values())
    if any(all(abs(a - b) < 1e-9 for a, b in zip(w, f)) for f in config.get("fail_on", [])):
        raise RuntimeError(f"injected failure at weights {w}")
    time.sleep(config.get("sleep_s", 0.0))
    tune.report({"score": FUNCTIONS[config["function"]](w)})
