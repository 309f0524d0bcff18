"""Hierarchical grid search over ensemble weights as a Ray Tune `Searcher` (docs/method.md §4).

Level by level: hand out every point of the current region at once (Tune runs them as parallel
trials), return None until the level is complete, keep the half-size sub-region whose corner
points have the highest summed score, repeat `levels` times, then FINISHED.

- "cube" is the authors' algorithm: box [0,1]^d, 3 points per axis, 2^d half-size sub-boxes.
  With `cache=False` all 3^d points are run every level, in the authors' order (first axis
  slowest); with `cache=True` a point already scored is never run again.
- "simplex" (default) uses that the ensemble is scale-invariant (w and c*w decode the same), so
  only directions matter: refine a simplex by its vertices and edge midpoints and keep the best
  of its 2^(d-1) edgewise sub-simplices. Levels cost d + d(d-1)/2 points, then d(d-1)/2 new ones.

State is plain JSON (`get_state`/`set_state`, `save`/`restore`), so `Tuner.restore` resumes the
search at the right level without re-running finished points. Before a restore, `replay` rebuilds
that state from Tune's own record of trials, which is the one Tune acts on (search/run.py).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
from typing import Optional

from ray.tune.search import Searcher

from emorl_ray.config import PARAMETERIZATIONS

log = logging.getLogger(__name__)



def _key(point) -> str:
    return ",".join(f"{x:.12g}" for x in point)


def kuhn_subsimplices(n: int) -> list[list[tuple[int, ...]]]:
    """The 2^n sub-simplices of the edgewise (factor-2) subdivision of an n-simplex.

    Each is given by its n+1 vertices as barycentric multi-indices summing to 2 (so a vertex is
    sum_j (m_j / 2) * V_j). Built from Kuhn's triangulation of the doubled cube, restricted to the
    simplex 2 >= y_1 >= ... >= y_n >= 0 (Freudenthal; Edelsbrunner & Grayson 2000).
    """
    def inside(y):
        return all(2 >= a >= b >= 0 for a, b in zip((2,) + y, y + (0,)))

    def barycentric(y):
        return tuple(a - b for a, b in zip((2,) + y, y + (0,)))

    out = []
    for corner in itertools.product((0, 1), repeat=n):
        for perm in itertools.permutations(range(n)):
            verts, y = [corner], list(corner)
            for j in perm:
                y[j] += 1
                verts.append(tuple(y))
            if all(inside(v) for v in verts):
                out.append([barycentric(v) for v in verts])
    assert len(out) == 2 ** n
    return out


class HierarchicalGridSearcher(Searcher):
    def __init__(self, objectives: list[str], metric: str, mode: str = "max", levels: int = 5,
                 parameterization: str = "simplex", cache: bool = True):
        if not isinstance(objectives, (list, tuple)) or len(objectives) < 2:
            raise ValueError(f"objectives: need at least 2 objective names to weigh, got {objectives!r}")
        if len(set(objectives)) != len(objectives):
            raise ValueError(f"objectives: names must be unique, got {objectives!r}")
        if not isinstance(levels, int) or levels < 1:
            raise ValueError(f"levels: must be an integer >= 1, got {levels!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization: must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if mode not in ("max", "min"):
            raise ValueError(f"mode: must be 'max' or 'min', got {mode!r}")
        super().__init__(metric=metric, mode=mode)
        self.objectives = list(objectives)
        self.levels = levels
        self.parameterization = parameterization
        self.cache = cache
        d = len(objectives)
        self._subsimplices = kuhn_subsimplices(d - 1) if parameterization == "simplex" else None
        # Region of the current level: a box (lo, hi) or the simplex's vertices.
        self.region = ([0.0] * d, [1.0] * d) if parameterization == "cube" else \
            [[float(i == j) for j in range(d)] for i in range(d)]
        self.level = 0                      # levels completed
        self.scores: dict[str, Optional[float]] = {}   # point key -> score (None = failed)
        self.level_scores: dict[str, Optional[float]] = {}
        self.queue: list[list[float]] = []  # points of this level not yet handed out
        self.pending: dict[str, list[float]] = {}      # trial id -> point
        self.trials: list[dict] = []        # every finished trial, in order
        self.path: list[dict] = []          # the region chosen at each level
        self.finished = False
        self.max_concurrent: int | None = None  # set by Tune (`set_max_concurrency`)
        self._start_level()

    # -- geometry -------------------------------------------------------------------------------

    def level_points(self) -> list[list[float]]:
        if self.parameterization == "cube":
            lo, hi = self.region
            axes = [(a, (a + b) / 2, b) for a, b in zip(lo, hi)]
            return [list(p) for p in itertools.product(*axes)]
        V = self.region
        d = len(V)
        multis = sorted((m for m in itertools.product(range(3), repeat=d) if sum(m) == 2), reverse=True)
        return [self._combine(V, m) for m in multis]

    @staticmethod
    def _combine(V, m) -> list[float]:
        return [sum(mi / 2 * V[i][j] for i, mi in enumerate(m)) for j in range(len(V[0]))]

    def _subregions(self) -> list[tuple[object, list[list[float]]]]:
        """(next region, its corner points) for every candidate sub-region, in tie-break order."""
        if self.parameterization == "cube":
            lo, hi = self.region
            axes = [(a, (a + b) / 2, b) for a, b in zip(lo, hi)]
            out = []
            for s in itertools.product((0, 1), repeat=len(lo)):
                corners = [[axes[j][s[j] + c[j]] for j in range(len(lo))]
                           for c in itertools.product((0, 1), repeat=len(lo))]
                region = ([axes[j][s[j]] for j in range(len(lo))], [axes[j][s[j] + 1] for j in range(len(lo))])
                out.append((region, corners))
            return out
        out = []
        for sub in self._subsimplices:
            verts = [self._combine(self.region, m) for m in sub]
            out.append((verts, verts))
        return out

    # -- level bookkeeping ----------------------------------------------------------------------

    def _start_level(self) -> None:
        self.level_scores = {}
        points = self.level_points()
        if self.cache:
            for p in points:
                if _key(p) in self.scores:
                    self.level_scores[_key(p)] = self.scores[_key(p)]
            points = [p for p in points if _key(p) not in self.scores]
            # Equal points within one level (none in either geometry, but be safe) run once.
            points = list({_key(p): p for p in points}.values())
        self.queue = points

    def _utility(self, score: Optional[float]) -> float:
        if score is None or not math.isfinite(score):
            return -math.inf  # failed trials count as the worst possible score
        return score if self.mode == "max" else -score

    def _maybe_advance(self) -> None:
        while not self.finished and not self.queue and not self.pending:
            candidates = self._subregions()
            sums = [sum(self._utility(self.level_scores.get(_key(c))) for c in corners)
                    for _, corners in candidates]
            best = max(range(len(sums)), key=lambda i: (sums[i], -i))  # ties: first
            self.path.append({"level": self.level + 1, "region": self.region, "chosen": candidates[best][0],
                              "corner_sum": sums[best] if math.isfinite(sums[best]) else None})
            self.region = candidates[best][0]
            self.level += 1
            if self.level >= self.levels:
                self.finished = True
                log.info("hierarchical search finished after %d levels, %d trials", self.level, len(self.trials))
            else:
                self._start_level()

    # -- Searcher API ---------------------------------------------------------------------------

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if metric and self._metric is None:
            self._metric = metric
        if mode and self._mode is None:
            self._mode = mode
        return True

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        # Count running trials here rather than in Tune's ConcurrencyLimiter: the limiter saves its
        # own list of live trials, one more state that a killed driver can leave behind Tune's
        # record of trials, and a stale list stalls the restored search for good. `pending` is
        # rebuilt from that record (`replay`).
        self.max_concurrent = max_concurrent
        return True

    def suggest(self, trial_id: str):
        self._maybe_advance()
        if self.finished:
            return Searcher.FINISHED
        if not self.queue:
            return None  # the level's last trials are still running
        if self.max_concurrent and len(self.pending) >= self.max_concurrent:
            return None
        point = self.queue.pop(0)
        self.pending[trial_id] = point
        return {"weights": dict(zip(self.objectives, point)), "level": self.level + 1}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        point = self.pending.pop(trial_id, None)
        if point is None:
            return
        score = None
        if not error and result is not None and self.metric in result:
            value = result[self.metric]
            score = float(value) if value is not None and math.isfinite(float(value)) else None
        if score is None:
            log.warning("trial %s at weights %s failed or reported no finite %r; scored as worst",
                        trial_id, point, self.metric)
        self.level_scores[_key(point)] = score
        self.scores[_key(point)] = score
        self.trials.append({"trial_id": trial_id, "level": self.level + 1, "weights": point, "score": score})
        self._maybe_advance()

    # -- results --------------------------------------------------------------------------------

    def best(self) -> tuple[list[float], float] | None:
        """The best point seen at any level (the authors return the global best too)."""
        scored = [(p, s) for p, s in self.scores.items() if s is not None]
        if not scored:
            return None
        key, score = max(scored, key=lambda ps: self._utility(ps[1]))
        return [float(x) for x in key.split(",")], score

    # -- state ----------------------------------------------------------------------------------

    _STATE_KEYS = ("objectives", "levels", "parameterization", "cache", "region", "level", "scores",
                   "level_scores", "queue", "pending", "trials", "path", "finished", "_metric", "_mode")

    def get_state(self) -> dict:
        return {k: getattr(self, k) for k in self._STATE_KEYS}

    def set_state(self, state: dict) -> None:
        for k in self._STATE_KEYS:
            setattr(self, k, state[k])
        if self.parameterization == "simplex":
            self._subsimplices = kuhn_subsimplices(len(self.objectives) - 1)
        # `pending` is kept: Tune's restore (resume_unfinished=True) re-runs those trials under
        # their old ids and reports them here (`replay` first rebuilds it from Tune's record).

    def replay(self, tune_trials: list[dict]) -> list[str]:
        """Rebuild a fresh searcher's progress from Tune's saved record of trials, [{"trial_id",
        "status", "level", "weights", "score"}], in any order; returns the ids of trials that fit
        no point of the search (they are left out).

        Tune saves that record and this searcher's state one after the other, and uploads them to
        cloud storage in any order, so after a killed driver the saved state can be behind or
        ahead of the record (seen in CI). The record is what Tune acts on when it restores: it
        re-runs its unfinished trials under their old ids and runs nothing it finished. Level by
        level, each recorded trial takes its point from the queue; finished ones report their
        score, unfinished ones stay pending until Tune re-runs them, and points Tune never
        recorded stay queued. Within a level the order of trials means nothing to the search, so
        neither does the record's order.
        """
        if self.trials or self.pending or self.level:
            raise RuntimeError("replay: needs a fresh searcher, this one has already run trials")
        left = list(tune_trials)
        while not self.finished:
            placed = []
            for t in left:
                if t.get("level") != self.level + 1:
                    continue
                match = next((i for i, p in enumerate(self.queue) if _key(p) == _key(t["weights"])), None)
                if match is not None:
                    self.pending[t["trial_id"]] = self.queue.pop(match)
                    placed.append(t)
            if not placed:
                break
            left = [t for t in left if t not in placed]
            for t in placed:  # the last finished one completes the level and starts the next
                if t["status"] in ("TERMINATED", "ERROR"):
                    ok = t["status"] == "TERMINATED" and t["score"] is not None
                    self.on_trial_complete(t["trial_id"], {self.metric: t["score"]} if ok else None, error=not ok)
        return [t["trial_id"] for t in left]

    def save(self, checkpoint_path: str) -> None:
        tmp = f"{checkpoint_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.get_state(), f)
        os.replace(tmp, checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))
