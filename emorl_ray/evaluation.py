"""Test-split evaluation of the base model, each single-objective adapter and the EMORL ensemble,
all decoded the same way (greedy) through the same ensemble deployment (spec §9, §10.22)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

from ray import serve

from emorl_ray.config import ExperimentConfig
from emorl_ray.ensemble.deployment import APP_NAME
from emorl_ray.io import atomic_write_json, write_parquet

log = logging.getLogger(__name__)


def distinct_2(texts: list[str]) -> float:
    """Distinct whitespace bigrams / all bigrams, over the whole set of generations."""
    bigrams = [tuple(w[i:i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def distinct_2_authors(texts: list[str]) -> float:
    """The authors' variant (spec §3): per generation, distinct bigrams / words; averaged."""
    vals = []
    for t in texts:
        w = t.split()
        vals.append(len({tuple(w[i:i + 2]) for i in range(len(w) - 1)}) / len(w) if w else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def edit_rate(prompt: str, response: str) -> float:
    """Word-level Levenshtein distance / the longer length: 0 = verbatim copy of the prompt."""
    a, b = prompt.lower().split(), response.lower().split()
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i]
        for j, wb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal-approximation 95% confidence interval over prompts."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def methods_to_evaluate(objectives: list[str], best_weights: dict, baselines: list[dict] = (),
                        compared: dict[str, dict] | None = None) -> dict[str, dict]:
    """Method name -> how it generates (`weights` over adapters and their `aggregation`, or a full
    `model_path`) and which training runs it cost. `compared`: aggregation -> its searched weights."""
    methods = {"base model": {"weights": None, "runs": []}}
    for o in objectives:
        methods[f"single: {o}"] = {"weights": {o: 1.0}, "runs": [o]}
    methods["ensemble, equal weights"] = {"weights": {o: 1.0 for o in objectives}, "runs": list(objectives)}
    methods["EMORL (searched weights)"] = {"weights": best_weights,
                                           "runs": [o for o in objectives if best_weights[o] > 0]}
    for aggregation, w in (compared or {}).items():
        methods[f"{aggregation} aggregation (searched weights)"] = {
            "weights": w, "aggregation": aggregation, "runs": [o for o in objectives if w[o] > 0]}
    for m in baselines:
        label = f"baseline: {m['name']}" + ("" if m["lora"] else " (full fine-tune)")
        methods[label] = ({"weights": {m["name"]: 1.0}, "runs": [m["name"]]} if m["lora"] else
                          {"weights": None, "model_path": m["model_path"], "runs": [m["name"]]})
    return methods


def evaluate(cfg: ExperimentConfig, run_dir: Path, best_weights: dict, manifests: list[dict],
             baselines: list[dict] = (), compared: dict[str, dict] | None = None) -> tuple[dict, list]:
    """Every method on the test split (and on `evaluation.generalization`'s test split, if set)."""
    handle = serve.get_app_handle(APP_NAME)
    objectives = cfg.objective_names
    methods = methods_to_evaluate(objectives, best_weights, baselines, compared)
    splits = ["test"] + (["generalization"] if cfg.evaluation.generalization is not None else [])
    # All methods at once: the deployment serialises generation, scoring overlaps.
    pending = {(split, name): handle.evaluate.remote(m["weights"], split, cfg.evaluation.max_new_tokens, True,
                                                     m.get("model_path"), m.get("aggregation"))
               for split in splits for name, m in methods.items()}
    first_seed = cfg.training.seeds[0]
    cost = {m["name"]: m for m in manifests if m["seed"] == first_seed}
    tables: dict[str, list] = {split: [] for split in splits}
    samples = []
    for (split, name), resp in pending.items():
        res = resp.result()
        row = {"method": name, "weights": methods[name]["weights"],
               "aggregation": methods[name].get("aggregation", cfg.search.aggregation)}
        for o in objectives:
            row[o], row[f"{o}_ci95"] = mean_ci(res["scores"][o])
        row["average"] = sum(row[o] for o in objectives) / len(objectives)
        row["distinct_2"] = distinct_2(res["responses"])
        row["distinct_2_authors"] = distinct_2_authors(res["responses"])
        row["edit_rate"] = sum(edit_rate(p, r) for p, r in zip(res["prompts"], res["responses"])) / res["n"]
        runs = [cost[r] for r in methods[name]["runs"]]
        row["train_data_points"] = sum(r["data_points"] for r in runs)
        row["train_seconds"] = round(sum(r["train_seconds"] for r in runs), 1)
        row["n_prompts"] = res["n"]
        tables[split].append(row)
        for i, (p, r) in enumerate(zip(res["prompts"], res["responses"])):
            samples.append({"split": split, "method": name, "i": i, "prompt": p, "response": r,
                            **{o: res["scores"][o][i] for o in objectives}})
        log.info("eval %-14s %-28s average %.4f", split, name, row["average"])
    result = {"decoding": "greedy", "aggregation": cfg.search.aggregation, "split": "test", "methods": tables["test"]}
    if "generalization" in tables:
        g = cfg.evaluation.generalization
        result["generalization"] = {"source": g.source, "path": g.path, "methods": tables["generalization"]}
    atomic_write_json(run_dir / "eval" / "metrics.json", result)
    write_parquet(run_dir / "eval" / "samples.parquet", samples)
    return result, samples
