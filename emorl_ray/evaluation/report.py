"""The run's report, `report.md` and `report.html` (one content, two renderings): data, training
cost and curves, the search, the results tables in the paper's shape, the Pareto view, samples.
The HTML embeds its figures, so the one file opens offline anywhere."""

from __future__ import annotations

import base64
import html
import re

from emorl_ray import storage
from emorl_ray.rundir import EvalResult, RunDir, RunManifest, SearchResult


def _fmt(x, nd=4):
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.1f}" if abs(x) >= 100 else f"{x:.{nd}f}"
    return str(x)


def _weights_text(weights: dict | None) -> str:
    return "-" if not weights else ", ".join(f"{n} {w:.3g}" for n, w in weights.items())


def results_table(methods: list[dict], objectives: list[str]) -> tuple[list[str], list[list]]:
    header = (["method", "weights used"] + objectives + ["average", "Diversity-2", "Diversity-2 (authors')",
                                                         "loops", "edit rate", "train data points", "train s"])
    rows = [[r["method"], _weights_text(r["weights"])] + [f"{r[o]:.4f} ± {r[o + '_ci95']:.4f}" for o in objectives] +
            [r["average"], r["distinct_2"], r["distinct_2_authors"], r["loop_rate"], r["edit_rate"],
             r["train_data_points"], r["train_seconds"]] for r in methods]
    return header, rows


def _table_title(t: dict) -> str:
    where = "Test split" if t["split"] == "test" else f"Generalisation: test split of `{t['source']}`"
    n = t["methods"][0]["n_prompts"] if t["methods"] else 0
    gens = t["methods"][0]["n_generations"] if t["methods"] else 0
    per = "" if gens == n else f", {gens // max(n, 1)} samples per prompt"
    return f"{where}, {t['decoding']} decoding ({n} prompts{per})"


def training_blocks(run_dir: RunDir, cfg, data_summary: dict, manifests: list[RunManifest]) -> list[tuple]:
    from emorl_ray.evaluation.plots import training_curves

    b: list[tuple] = [
        ("h1", f"EMORL run `{cfg.name}`"),
        ("p", f"Policy `{cfg.model.id}`, objectives {', '.join(cfg.objective_names)}, faithful={cfg.faithful}."),
        ("h2", "Data"),
        ("p", f"Source `{cfg.data.source}`; split sizes {data_summary['sizes']}; "
              f"dropped rows {data_summary['dropped'] or 'none'}."),
        ("h2", "Stage 1: training (k-SCST, one Ray Train run per objective and per baseline)"),
        ("table", ["run", "method", "steps", "data points", "train s", "converged", "final val"],
         [[f"{m.name} (seed {m.seed})", m.method, m.steps, m.data_points, m.train_seconds, m.converged,
           m.final_val_score] for m in manifests]),
    ]
    emorl = [m for m in manifests if m.is_ensemble_member]
    b.append(("p", f"EMORL total: {sum(m.data_points for m in emorl)} data points, "
                   f"{sum(m.train_seconds for m in emorl):.1f} s of training (summed over its "
                   "single-objective runs, which ran in parallel)."))
    histories = {f"{m.name} (seed {m.seed})": storage.read_parquet(m.metrics_path)
                 for m in manifests if m.metrics_path and storage.is_file(m.metrics_path)}
    if histories:
        training_curves(histories, run_dir.file("plots", "training_curves.png"))
        b.append(("img", "plots/training_curves.png", "training curves"))
    return b


def search_blocks(run_dir: RunDir, search: SearchResult) -> list[tuple]:
    b = [("h2", f"Stages 2+3: hierarchical search of the ensemble weights ({search.aggregation} aggregation)"),
         ("p", f"{search.parameterization} parameterisation, {search.levels} levels, {search.trials} "
               f"trials ({search.failed_trials} failed). Best validation score {search.best_score:.4f} at "
               + ", ".join(f"{o}={w:.4f}" for o, w in search.best_weights_used.items())
               + (" (as decoded: w / sum w; the ensemble is scale-invariant)" if search.weights_scale_invariant
                  else " (as decoded: parameter aggregation scales each adapter's delta W by its weight)")
               + ". All points: `search/points.parquet`.")]
    if storage.is_file(storage.join(run_dir.search(), "heatmap.png")):
        b.append(("img", "search/heatmap.png", "searched weights"))
    return b


def results_blocks(evaluation: EvalResult, objectives: list[str]) -> list[tuple]:
    b = []
    for t in evaluation.tables:
        b.append(("h2", _table_title(t)))
        b.append(("table", *results_table(t["methods"], objectives)))
    sp = evaluation.sampling
    b.append(("p", "Mean score per objective ± the half-width of a 95% confidence interval over prompts "
                   "(sampled generations are first averaged per prompt). Diversity-2 = distinct bigrams / "
                   "bigrams over all generations; the authors' variant = distinct bigrams / words per "
                   "generation, averaged. Loops = share of generations that repeat a word 3-gram. "
                   "Edit rate = word-level edit distance to the prompt / length "
                   "(0 = a copy of the prompt). Training cost counts the runs a method needed: a searched ensemble "
                   "all of its objectives' runs (the search needed each adapter), a single adapter or "
                   "a baseline its own. "
                   + (f"Sampling: temperature {sp['temperature']}, top-k {sp['top_k'] or 'off'}, top-p {sp['top_p']}, "
                      f"seed {sp['seed']}. " if sp else "") + "Samples: `eval/samples.parquet`."))
    return b


def pareto_blocks(run_dir: RunDir, pareto: dict | None, objectives: list[str]) -> list[tuple]:
    from emorl_ray.evaluation.plots import pareto_plot

    if not pareto:
        return []
    ps, pm = pareto["search"], pareto["methods"]
    b = [("h2", "Pareto view"),
         ("p", f"Of the {ps['points']} searched weight vectors, {len(ps['front'])} are Pareto-optimal on the "
               f"validation split (no other vector scores at least as well on every objective and better on "
               f"one); they dominate a hypervolume of {ps['hypervolume']:.4f} (reference point 0). "
               f"Among the methods ({pareto['methods_table']['split']}, "
               f"{pareto['methods_table']['decoding']}), the non-dominated ones are "
               + ", ".join(r["method"] for r in pm["rows"] if r["non_dominated"])
               + f"; their hypervolume is {pm['hypervolume']:.4f}."),
         ("table", ["weights (search front)"] + objectives,
          [[", ".join(f"{w:.3f}" for w in f["weights"].values())] + [f["scores"][o] for o in objectives]
           for f in sorted(ps["front"], key=lambda f: -sum(f["scores"].values()))])]
    if storage.is_file(run_dir.points_file()):
        pareto_plot(pareto, storage.read_parquet(run_dir.points_file()), run_dir.file("plots", "pareto.png"))
        b.append(("img", "plots/pareto.png", "Pareto view"))
    return b


def sample_blocks(samples: list[dict], samples_per_method: int) -> list[tuple]:
    b = [("h2", "Samples (test prompts, greedy)")]
    decoding = "greedy" if any(s.get("decoding") == "greedy" for s in samples) else None
    for i in range(samples_per_method):
        group = [s for s in samples if s["i"] == i and s["split"] == "test" and s.get("pass", 0) == 0
                 and (decoding is None or s["decoding"] == decoding)]
        if not group:
            break
        b.append(("sample", group[0]["prompt"], [(s["method"], s["response"]) for s in group]))
    return b


def report_blocks(run_dir: RunDir, cfg, data_summary: dict, manifests: list[RunManifest], search: SearchResult,
                  evaluation: EvalResult, samples: list[dict], samples_per_method: int = 3) -> list[tuple]:
    """The report as a list of blocks: ("h1"|"h2"|"h3"|"p", text), ("table", header, rows),
    ("img", path relative to the run directory, alt), ("sample", prompt, [(method, response)])."""
    return (training_blocks(run_dir, cfg, data_summary, manifests) + search_blocks(run_dir, search)
            + results_blocks(evaluation, cfg.objective_names)
            + pareto_blocks(run_dir, evaluation.pareto, cfg.objective_names)
            + sample_blocks(samples, samples_per_method))


def to_markdown(blocks: list[tuple]) -> str:
    out = []
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out += ["#" * int(kind[1]) + " " + rest[0], ""]
        elif kind == "p":
            out += [rest[0], ""]
        elif kind == "table":
            header, rows = rest
            out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows] + [""]
        elif kind == "img":
            out += [f"![{rest[1]}]({rest[0]})", ""]
        elif kind == "sample":
            prompt, responses = rest
            out += [f"**Client:** {prompt}", ""] + [f"- *{m}*: {r or '(empty)'}" for m, r in responses] + [""]
    return "\n".join(out) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%;margin:1em 0}
code{background:#f3f3f3;padding:0 3px}.sample{margin:1em 0}.sample li{margin:2px 0}"""


def to_html(blocks: list[tuple], run_dir: RunDir, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_STYLE}</style></head><body>"]
    for kind, *rest in blocks:
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline(rest[0])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline(rest[0])}</p>")
        elif kind == "table":
            header, rows = rest
            out.append("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows]
            out.append("</table>")
        elif kind == "img":
            data = base64.b64encode(storage.read_bytes(run_dir.file(rest[0]))).decode()
            out.append(f"<img alt='{html.escape(rest[1])}' src='data:image/png;base64,{data}'>")
        elif kind == "sample":
            prompt, responses = rest
            out.append(f"<div class='sample'><b>Client:</b> {html.escape(prompt)}<ul>" +
                       "".join(f"<li><i>{html.escape(m)}</i>: {html.escape(r or '(empty)')}</li>"
                               for m, r in responses) + "</ul></div>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(run_dir: RunDir, cfg, manifests: list[RunManifest], search: SearchResult, evaluation: EvalResult,
                 samples: list[dict]) -> dict[str, str]:
    """report.md and report.html of the run; the data's sizes come from its data_split.json."""
    data_summary = storage.read_json(run_dir.file("data_split.json"))
    blocks = report_blocks(run_dir, cfg, data_summary, manifests, search, evaluation, samples,
                           cfg.evaluation.num_samples_in_report)
    paths = {"markdown": run_dir.file("report.md"), "html": run_dir.file("report.html")}
    storage.write_text(paths["markdown"], to_markdown(blocks))
    storage.write_text(paths["html"], to_html(blocks, run_dir, f"EMORL run {cfg.name}"))
    return paths
