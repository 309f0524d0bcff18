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


def _results_table(methods: list[dict], objectives: list[str]) -> list[str]:
    header = ["method"] + objectives + ["average", "distinct-2", "edit rate", "train data points", "train s"]
    rows = [[r["method"]] + [f"{r[o]:.4f} ± {r[o + '_ci95']:.4f}" for o in objectives] +
            [r["average"], r["distinct_2"], r["edit_rate"], r["train_data_points"], r["train_seconds"]]
            for r in methods]
    return _table(header, rows)


def write_report(run_dir: Path, cfg, data_summary: dict, manifests: list[dict], search: dict, evaluation: dict,
                 samples: list[dict], samples_per_method: int = 3) -> Path:
    objectives = cfg.objective_names
    lines = [f"# EMORL run `{cfg.name}`", "",
             f"Policy `{cfg.model.id}`, objectives {', '.join(objectives)}, faithful={cfg.faithful}.", "",
             "## Data", "", f"Source `{cfg.data.source}`; split sizes {data_summary['sizes']}; "
             f"dropped rows {data_summary['dropped'] or 'none'}.", "",
             "## Stage 1: training (k-SCST, one Ray Train run per objective and per baseline)", ""]
    lines += _table(["run", "method", "steps", "data points", "train s", "converged", "final val"],
                    [[m["name"] + f" (seed {m['seed']})", m.get("method", "single"), m["steps"], m["data_points"],
                      m["train_seconds"], m["converged"], m["final_val_score"]] for m in manifests])
    emorl = [m for m in manifests if m.get("method", "single") == "single"]
    lines += ["", f"EMORL total: {sum(m['data_points'] for m in emorl)} data points, "
              f"{sum(m['train_seconds'] for m in emorl):.1f} s of training (summed over its single-objective runs).",
              "",
              f"## Stage 2+3: hierarchical search of the ensemble weights ({cfg.search.aggregation} aggregation)", "",
              f"{search['parameterization']} parameterisation, {search['levels']} levels, {search['trials']} trials "
              f"({search['failed_trials']} failed). Best validation score {search['best_score']:.4f} at "
              + ", ".join(f"{o}={w:.4f}" for o, w in search["best_weights_normalized"].items())
              + " (normalised). All points: `search/points.parquet`.", ""]
    if (run_dir / "search" / "heatmap.png").exists():
        lines += ["![searched weights](search/heatmap.png)", ""]
    lines += [f"## Test results ({evaluation['decoding']} decoding, {evaluation['methods'][0]['n_prompts']} prompts, "
              "95% CI over prompts)", ""]
    lines += _results_table(evaluation["methods"], objectives)
    lines += ["", "distinct-2 = distinct bigrams / bigrams over all generations; edit rate = word-level "
              "edit distance to the prompt / length (0 = copy). Samples: `eval/samples.parquet`.", ""]
    gen = evaluation.get("generalization")
    if gen:
        lines += [f"## Generalisation: test split of `{gen['source']}` ({gen['methods'][0]['n_prompts']} prompts)", ""]
        lines += _results_table(gen["methods"], objectives) + [""]
    lines += ["## Samples (test prompts)", ""]
    for i in range(samples_per_method):
        group = [s for s in samples if s["i"] == i and s.get("split", "test") == "test"]
        if not group:
            break
        lines += [f"**Client:** {group[0]['prompt']}", ""]
        lines += [f"- *{s['method']}*: {s['response'] or '(empty)'}" for s in group] + [""]
    atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    return run_dir / "report.md"
