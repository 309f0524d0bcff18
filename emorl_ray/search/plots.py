"""Explainability for three objectives: every scored weight vector on a ternary plot."""

from __future__ import annotations

import math


def _xy(w: list[float]) -> tuple[float, float] | None:
    s = sum(w)
    if s <= 0:
        return None
    a, b, c = (x / s for x in w)
    # Vertices: objective 0 bottom-left, 1 bottom-right, 2 top.
    return b + c / 2, c * math.sqrt(3) / 2


def ternary_heatmap(points: list[dict], objectives: list[str], path: str, best: dict | None = None,
                    search_path: list | None = None, title: str = "") -> str:
    """`points`: rows with `w/<objective>` and `score`; `search_path`: the searcher's chosen region
    per level (drawn for the simplex mode, whose regions are triangles; cube boxes are not drawn)."""
    from emorl_ray.evaluation.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 5.8))
    tri = [(0, 0), (1, 0), (0.5, math.sqrt(3) / 2), (0, 0)]
    ax.plot(*zip(*tri), color="black", lw=1)
    for (x, y), name, (dx, dy) in zip(tri[:3], objectives, [(-0.04, -0.05), (0.04, -0.05), (0, 0.04)]):
        ax.text(x + dx, y + dy, name, ha="center", fontsize=11)
    scored = [(p, _xy([p[f"w/{o}"] for o in objectives])) for p in points if p.get("score") is not None]
    scored = [(p, xy) for p, xy in scored if xy is not None]
    if scored:
        sc = ax.scatter([xy[0] for _, xy in scored], [xy[1] for _, xy in scored],
                        c=[p["score"] for p, _ in scored], cmap="viridis", s=70, edgecolors="k", linewidths=0.4)
        fig.colorbar(sc, ax=ax, label="validation score (mean of objectives)")
    failed = [_xy([p[f"w/{o}"] for o in objectives]) for p in points if p.get("score") is None]
    failed = [xy for xy in failed if xy is not None]
    if failed:
        ax.scatter(*zip(*failed), marker="x", color="red", s=50, label="failed trial")
    for level in search_path or []:  # simplex mode: the chosen sub-simplex of each level
        corners = [_xy(v) for v in level["chosen"]] if len(level["chosen"]) == 3 else []
        corners = [c for c in corners if c is not None]
        if len(corners) == 3:
            ax.fill(*zip(*corners), fill=False, edgecolor="orange", lw=1)
    if best:
        bxy = _xy([best[o] for o in objectives])
        if bxy:
            ax.scatter([bxy[0]], [bxy[1]], marker="*", s=300, color="red", edgecolors="k", label="chosen weights")
    ax.set_aspect("equal")
    ax.set_ylim(-0.1, 1.0)
    ax.axis("off")
    ax.set_title(title or "searched ensemble weights (normalised onto the simplex)", fontsize=10)
    if failed or best:
        ax.legend(loc="upper right", fontsize=8)
    return save_figure(fig, path)
