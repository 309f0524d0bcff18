"""Test-split evaluation of the base model, each single-objective adapter, the EMORL ensemble, the
comparison aggregations and the baselines, every method decoded the same way (one table per
decoding) through the same ensemble deployment (docs/method.md §6, §8.22)."""

from __future__ import annotations

import logging
import math

from ray import serve

from emorl_ray import storage
from emorl_ray.config import EVAL_METHODS, ExperimentConfig
from emorl_ray.ensemble.deployment import APP_NAME
from emorl_ray.rewards.repetition import loops
from emorl_ray.rundir import RunDir

log = logging.getLogger(__name__)


def distinct_2(texts: list[str]) -> float:
    """Distinct whitespace bigrams / all bigrams, over the whole set of generations."""
    bigrams = [tuple(w[i:i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def distinct_2_authors(texts: list[str]) -> float:
    """The authors' variant (docs/method.md §6): per generation, distinct bigrams / words; averaged."""
    vals = []
    for t in texts:
        w = t.split()
        vals.append(len({tuple(w[i:i + 2]) for i in range(len(w) - 1)}) / len(w) if w else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def loop_rate(texts: list[str]) -> float:
    return sum(loops(t) for t in texts) / len(texts) if texts else 0.0


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
                        compared: dict[str, dict] | None = None, include=EVAL_METHODS) -> dict[str, dict]:
    """Method name -> how it generates (`weights` over adapters and their `aggregation`, or a full
    `model_path`) and which training runs it cost. `compared`: aggregation -> its searched weights.
    `include`: the groups of evaluation.methods."""
    methods = {}
    if "base" in include:
        methods["base model"] = {"weights": None, "runs": []}
    if "single" in include:
        for o in objectives:
            methods[f"single: {o}"] = {"weights": {o: 1.0}, "runs": [o]}
    if "equal" in include:
        methods["ensemble, equal weights"] = {"weights": {o: 1.0 for o in objectives}, "runs": list(objectives)}
    # A searched method costs every objective's run, also one whose weight came out 0: the search
    # needed that adapter trained to find the 0 (the paper counts EMORL's cost the same way).
    if "emorl" in include:
        methods["EMORL (searched weights)"] = {"weights": best_weights, "runs": list(objectives)}
    for aggregation, w in (compared or {}).items() if "compared" in include else ():
        methods[f"{aggregation} aggregation (searched weights)"] = {
            "weights": w, "aggregation": aggregation, "runs": list(objectives)}
    for m in baselines if "baselines" in include else ():
        label = f"baseline: {m['name']}" + ("" if m["lora"] else " (full fine-tune)")
        methods[label] = ({"weights": {m["name"]: 1.0}, "runs": [m["name"]]} if m["lora"] else
                          {"weights": None, "model_path": m["model_path"], "runs": [m["name"]]})
    return methods


def sampling_request(cfg: ExperimentConfig, decoding: str) -> dict | None:
    """What the evaluator's `sampling` argument is for one decoding (None = greedy)."""
    if decoding == "greedy":
        return None
    ev = cfg.evaluation
    return {"temperature": ev.sampling.temperature, "top_k": ev.sampling.top_k, "top_p": ev.sampling.top_p,
            "seed": ev.seed, "samples_per_prompt": ev.samples_per_prompt}


def per_prompt_means(values: list[float], n_prompts: int) -> list[float]:
    """Generations come as whole passes over the prompts; average each prompt's passes."""
    passes = len(values) // n_prompts
    return [sum(values[j * n_prompts + i] for j in range(passes)) / passes for i in range(n_prompts)]


def result_row(name: str, method: dict, res: dict, objectives: list[str], cost: dict, n_prompts: int) -> dict:
    """One method's line of a results table, from the evaluator's answer for it."""
    # The weights the decode applied (w / sum w, except for parameter aggregation), adapters at 0 left out.
    used = res.get("weights_used")
    used = None if used is None else {n: w for n, w in used.items() if w > 0}
    row = {"method": name, "weights": used, "aggregation": method.get("aggregation")}
    for o in objectives:
        row[o], row[f"{o}_ci95"] = mean_ci(per_prompt_means(res["scores"][o], n_prompts))
    row["average"] = sum(row[o] for o in objectives) / len(objectives)
    row["distinct_2"] = distinct_2(res["responses"])
    row["distinct_2_authors"] = distinct_2_authors(res["responses"])
    row["loop_rate"] = loop_rate(res["responses"])
    row["edit_rate"] = sum(edit_rate(p, r) for p, r in zip(res["prompts"], res["responses"])) / res["n"]
    runs = [cost[r] for r in method["runs"]]
    row["train_data_points"] = sum(r["data_points"] for r in runs)
    row["train_seconds"] = round(sum(r["train_seconds"] for r in runs), 1)
    row["n_prompts"] = n_prompts
    row["n_generations"] = res["n"]
    return row


def split_prompts(cfg: ExperimentConfig, splits: list[str]) -> dict[str, list[str]]:
    """Each split's prompts in the order the evaluator decodes them (ensemble/deployment.py)."""
    from emorl_ray.data import load_splits

    prompts = {"test": [r["prompt"] for r in load_splits(cfg.data, cfg.faithful).test]}
    if "generalization" in splits:
        prompts["generalization"] = [r["prompt"] for r in load_splits(cfg.evaluation.generalization).test]
    return prompts


def bandit_online(handle, cfg: ExperimentConfig, router, contexts, split: str, decoding: str) -> dict:
    """The contextual bandit (warm-started on the search's per-prompt scores) over `split`, one
    prompt at a time: choose the weights from the prompt's embedding (`contexts`), decode, score,
    learn from the score. Returns the evaluator's answer for the whole split, in its order
    (passes, then prompts)."""
    from emorl_ray.routing.bandit import bandit_from_router

    bandit = bandit_from_router(router, cfg.search.bandit_alpha)
    parts = []
    for i, x in enumerate(contexts):
        arm = bandit.choose(x)
        res = handle.evaluate.remote([bandit.weights(arm)], split, cfg.evaluation.max_new_tokens, True, None,
                                     cfg.search.aggregation, sampling_request(cfg, decoding), indices=[i]).result()
        bandit.update(arm, x, res["mean"])
        parts.append(res)
    passes = parts[0]["n"]
    order = [(p, i) for p in range(passes) for i in range(len(parts))]
    return {"n": len(order), "prompts": [parts[i]["prompts"][p] for p, i in order],
            "responses": [parts[i]["responses"][p] for p, i in order],
            "scores": {o: [parts[i]["scores"][o][p] for p, i in order] for o in cfg.objective_names},
            "weights_used": {k: sum(r["weights_used"][k] for r in parts) / len(parts)
                             for k in parts[0]["weights_used"]},
            "plays": bandit.plays}


def evaluate(cfg: ExperimentConfig, run_dir: RunDir, best_weights: dict, manifests: list[dict],
             baselines: list[dict] = (), compared: dict[str, dict] | None = None) -> tuple[dict, list]:
    """Every method under every decoding of evaluation.decodings, on the test split (and on
    `evaluation.generalization`'s test split, if set). Writes eval/metrics.json (with the Pareto
    view of the searched points and of the methods) and eval/samples.parquet."""
    from emorl_ray.pareto import pareto_summary

    handle = serve.get_app_handle(APP_NAME)
    objectives = cfg.objective_names
    ev = cfg.evaluation
    methods = methods_to_evaluate(objectives, best_weights, baselines, compared, ev.methods)
    for m in methods.values():
        if m["weights"] is not None:
            m.setdefault("aggregation", cfg.search.aggregation)
    splits = ["test"] + (["generalization"] if ev.generalization is not None else [])
    tables = [(split, decoding) for split in splits for decoding in ev.decodings]
    first_seed = cfg.training.seeds[0]
    cost = {m["name"]: m for m in manifests if m["seed"] == first_seed}
    # The per-prompt methods (emorl_ray/routing/), where the run has a router: one encoder pass
    # over each split's prompts serves both; both cost the router's fit.
    per_prompt = [m for m in ("router", "bandit") if m in ev.methods]
    if per_prompt and storage.is_file(storage.join(run_dir.router, "router.json")):
        from emorl_ray.rewards.similarity import EmbeddingSimilarity
        from emorl_ray.routing import load_router

        router = load_router(run_dir.router)
        embed = EmbeddingSimilarity(router.encoder).embed
        contexts = {s: embed(p) for s, p in split_prompts(cfg, splits).items()}
        cost["router"] = {"data_points": 0, "train_seconds": storage.read_json(
            storage.join(run_dir.router, "metrics.json"))["fit_seconds"]}
    else:
        per_prompt = []
    if "router" in per_prompt:
        methods["EMORL + router (weights per prompt)"] = {
            "weights_by_split": {s: router.route(contexts[s]) for s in splits},
            "aggregation": cfg.search.aggregation, "runs": [*objectives, "router"]}
    # All requests at once: the deployment serialises generation, scoring overlaps.
    pending = {(split, decoding, name): handle.evaluate.remote(
        m["weights_by_split"][split] if "weights_by_split" in m else m["weights"], split, ev.max_new_tokens,
        True, m.get("model_path"), m.get("aggregation"), sampling_request(cfg, decoding))
        for split, decoding in tables for name, m in methods.items()}
    results = {key: resp.result() for key, resp in pending.items()}
    if "bandit" in per_prompt:  # one prompt after another, after the other methods
        name = "EMORL + bandit (online over the split)"
        methods[name] = {"aggregation": cfg.search.aggregation, "runs": [*objectives, "router"]}
        for split, decoding in tables:
            results[split, decoding, name] = bandit_online(handle, cfg, router, contexts[split], split, decoding)
    rows: dict[tuple, list] = {t: [] for t in tables}
    samples = []
    for (split, decoding, name), res in results.items():
        passes = 1 if decoding == "greedy" else ev.samples_per_prompt
        n_prompts = res["n"] // passes
        rows[split, decoding].append(result_row(name, methods[name], res, objectives, cost, n_prompts))
        for i, (p, r) in enumerate(zip(res["prompts"], res["responses"])):
            samples.append({"split": split, "decoding": decoding, "method": name, "i": i % n_prompts,
                            "pass": i // n_prompts, "prompt": p, "response": r,
                            **{o: res["scores"][o][i] for o in objectives}})
        log.info("eval %-14s %-7s %-32s average %.4f", split, decoding, name, rows[split, decoding][-1]["average"])
    result = {
        "aggregation": cfg.search.aggregation,
        "sampling": sampling_request(cfg, "sampled"),
        "evaluation": cfg.to_dict()["evaluation"],
        "tables": [{"split": split, "decoding": decoding,
                    "source": cfg.data.source if split == "test" else ev.generalization.source,
                    "methods": rows[split, decoding]} for split, decoding in tables],
    }
    points_file = storage.join(run_dir.search(), "points.parquet")
    if storage.is_file(points_file):
        points = storage.read_parquet(points_file)
        result["pareto"] = pareto_summary(points, objectives, result["tables"][0]["methods"])
        result["pareto"]["methods_table"] = {k: result["tables"][0][k] for k in ("split", "decoding")}
    storage.write_json(run_dir.eval_metrics, result)
    storage.write_parquet(run_dir.file("eval", "samples.parquet"), samples)
    return result, samples
