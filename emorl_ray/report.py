"""A short Markdown report of a run: data, training cost, search, test results, samples."""

from __future__ import annotations

from pathlib import Path

from emorl_ray.io import atomic_write_text


def _fmt(x, nd=4):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 100 else f"{x:.{nd}f}"
    return str(x)


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]


def write_report(run_dir: Path, cfg, data_summary: dict, manifests: list[dict], search: dict, evaluation: dict,
                 samples: list[dict], samples_per_method: int = 3) -> Path:
    objectives = cfg.objective_names
    lines = [f"# EMORL run `{cfg.name}`", "",
             f"Policy `{cfg.model.id}`, objectives {', '.join(objectives)}, faithful={cfg.faithful}.", "",
             "## Data", "", f"Source `{cfg.data.source}`; split sizes {data_summary['sizes']}; "
             f"dropped rows {data_summary['dropped'] or 'none'}.", "",
             "## Stage 1: single-objective training (k-SCST + LoRA, one Ray Train run each)", ""]
    lines += _table(["run", "steps", "data points", "train s", "converged", "final val"],
                    [[m["name"] + f" (seed {m['seed']})", m["steps"], m["data_points"], m["train_seconds"],
                      m["converged"], m["final_val_score"]] for m in manifests])
    lines += ["", f"Total: {sum(m['data_points'] for m in manifests)} data points, "
              f"{sum(m['train_seconds'] for m in manifests):.1f} s of training (summed over runs).", "",
              f"## Stage 2+3: hierarchical search of the ensemble weights ({cfg.search.aggregation} aggregation)", "",
              f"{search['parameterization']} parameterisation, {search['levels']} levels, {search['trials']} trials "
              f"({search['failed_trials']} failed). Best validation score {search['best_score']:.4f} at "
              + ", ".join(f"{o}={w:.4f}" for o, w in search["best_weights_normalized"].items())
              + " (normalised). All points: `search/points.parquet`.", ""]
    if (run_dir / "search" / "heatmap.png").exists():
        lines += ["![searched weights](search/heatmap.png)", ""]
    lines += [f"## Test results ({evaluation['decoding']} decoding, {evaluation['methods'][0]['n_prompts']} prompts, "
              "95% CI over prompts)", ""]
    header = ["method"] + objectives + ["average", "distinct-2", "edit rate", "train data points", "train s"]
    rows = []
    for r in evaluation["methods"]:
        rows.append([r["method"]] + [f"{r[o]:.4f} ± {r[o + '_ci95']:.4f}" for o in objectives] +
                    [r["average"], r["distinct_2"], r["edit_rate"], r["train_data_points"], r["train_seconds"]])
    lines += _table(header, rows)
    lines += ["", "distinct-2 = distinct bigrams / bigrams over all generations; edit rate = word-level "
              "edit distance to the prompt / length (0 = copy). Samples: `eval/samples.parquet`.", ""]
    lines += ["## Samples (test prompts)", ""]
    for i in range(samples_per_method):
        group = [s for s in samples if s["i"] == i]
        if not group:
            break
        lines += [f"**Client:** {group[0]['prompt']}", ""]
        lines += [f"- *{s['method']}*: {s['response'] or '(empty)'}" for s in group] + [""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
