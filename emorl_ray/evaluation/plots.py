"""The report's figures (matplotlib, written atomically as PNG): the Pareto view and the training
curves. The search's ternary heatmap lives with the search (`search/plots.py`)."""

from __future__ import annotations

import io
from itertools import combinations


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, location: str) -> str:
    """Write the figure as PNG to a local path or storage URI, in one atomic write."""
    from emorl_ray import storage

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    pyplot().close(fig)
    storage.write_bytes(str(location), buf.getvalue())
    return str(location)


def pareto_plot(pareto: dict, points: list[dict], path: str) -> str:
    """One panel per pair of objectives: every searched point (validation), the Pareto front among
    them, and where each evaluated method lands (test)."""
    plt = pyplot()
    objectives = pareto["objectives"]
    pairs = list(combinations(range(len(objectives)), 2))
    fig, axes = plt.subplots(1, len(pairs), figsize=(5.2 * len(pairs), 4.6), squeeze=False)
    scored = [p for p in points if all(p.get(f"score/{o}") is not None for o in objectives)]
    front = pareto["search"]["front"]
    methods = pareto["methods"]["rows"]
    markers = "osD^vP*Xhp<>"
    for ax, (i, j) in zip(axes[0], pairs):
        oi, oj = objectives[i], objectives[j]
        ax.scatter([p[f"score/{oi}"] for p in scored], [p[f"score/{oj}"] for p in scored], s=18, color="0.75",
                   label="searched weights (val)")
        ax.scatter([f["scores"][oi] for f in front], [f["scores"][oj] for f in front], s=30, color="tab:blue",
                   label="Pareto front of the search (val)")
        for k, m in enumerate(methods):
            ax.scatter([m["scores"][oi]], [m["scores"][oj]], marker=markers[k % len(markers)], s=70,
                       edgecolors="k", linewidths=0.5, label=m["method"] + (" *" if m["non_dominated"] else ""))
        ax.set_xlabel(oi)
        ax.set_ylabel(oj)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8,
                       title="* = no method beats it on every objective (test)", title_fontsize=8)
    fig.suptitle(f"objective space: search hypervolume {pareto['search']['hypervolume']:.4f} (val), "
                 f"methods' hypervolume {pareto['methods']['hypervolume']:.4f} (test)", fontsize=10)
    return save_figure(fig, path)


def training_curves(histories: dict[str, list[dict]], path: str) -> str:
    """Per training run: validation score and the smoothed training reward against data points."""
    plt = pyplot()
    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, rows in histories.items():
        val = [r for r in rows if r["kind"] == "val"]
        val_ax.plot([r["data_points"] for r in val], [r["val_score"] for r in val], marker="o", ms=3, label=name)
        train = [r for r in rows if r["kind"] == "train"]
        smooth, ema = [], None
        for r in train:  # exponential moving average: raw per-step rewards are noisy
            ema = r["reward"] if ema is None else 0.8 * ema + 0.2 * r["reward"]
            smooth.append(ema)
        train_ax.plot([r["data_points"] for r in train], smooth, label=name)
    val_ax.set_title("validation score (the run's own objective(s), greedy)", fontsize=10)
    train_ax.set_title("training reward as optimised (sampled, after training.reward_transform; EMA 0.8)", fontsize=9)
    for ax in (val_ax, train_ax):
        ax.set_xlabel("training data points")
        ax.grid(alpha=0.3)
    val_ax.legend(fontsize=8)
    return save_figure(fig, path)
