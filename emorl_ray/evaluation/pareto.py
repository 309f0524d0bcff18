"""Pareto view of a multi-objective result: which points no other point beats on every objective,
and the hypervolume they dominate (all objectives maximised, scores in [0, 1])."""

from __future__ import annotations

from typing import Sequence

Point = Sequence[float]


def dominates(a: Point, b: Point) -> bool:
    """a is at least as good as b everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated(points: Sequence[Point]) -> list[int]:
    """Indices of the Pareto-optimal points (duplicates of an optimal point are all kept)."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]


def non_dominated_points(points: Sequence[Point]) -> list[Point]:
    return [points[i] for i in non_dominated(points)]


def hypervolume(points: Sequence[Point], reference: Point) -> float:
    """Volume of the region dominated by `points` and bounded below by `reference`.

    Exact, by slicing along the last objective: between consecutive distinct values of it, the
    slice is the (d-1)-dimensional hypervolume of the points reaching that value. O(n^d): meant for
    the tens to hundreds of points a search produces, in a few objectives."""
    pts = [tuple(p) for p in points if all(x > r for x, r in zip(p, reference))]
    if not pts:
        return 0.0
    if len(reference) == 1:
        return max(p[0] for p in pts) - reference[0]
    levels = sorted({p[-1] for p in pts}, reverse=True)
    total = 0.0
    for i, z in enumerate(levels):
        below = levels[i + 1] if i + 1 < len(levels) else reference[-1]
        slice_pts = [p[:-1] for p in pts if p[-1] >= z]
        total += (z - below) * hypervolume(non_dominated_points(slice_pts), reference[:-1])
    return total


def pareto_summary(points: list[dict], objectives: list[str], methods: list[dict]) -> dict:
    """`points`: searched weight vectors with `score/<objective>` (validation); `methods`: result
    rows with one mean per objective (test). Each set gets its front and hypervolume (reference 0)."""
    ref = [0.0] * len(objectives)
    scored = [p for p in points if all(p.get(f"score/{o}") is not None for o in objectives)]
    vecs = [[p[f"score/{o}"] for o in objectives] for p in scored]
    front = non_dominated(vecs)
    mvecs = [[m[o] for o in objectives] for m in methods]
    mfront = set(non_dominated(mvecs))
    return {
        "objectives": objectives,
        "reference": ref,
        "search": {
            "points": len(scored),
            "front": [{"weights": {o: scored[i][f"w/{o}"] for o in objectives},
                       "scores": dict(zip(objectives, vecs[i]))} for i in front],
            "hypervolume": hypervolume([vecs[i] for i in front], ref),
        },
        "methods": {
            "rows": [{"method": m["method"], "scores": dict(zip(objectives, v)), "non_dominated": i in mfront}
                     for i, (m, v) in enumerate(zip(methods, mvecs))],
            "hypervolume": hypervolume([mvecs[i] for i in mfront], ref),
        },
    }
