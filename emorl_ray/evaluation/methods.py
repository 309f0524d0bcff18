"""Test-split evaluation of the base model, each single-objective adapter, the EMORL ensemble, the
comparison aggregations and the baselines, every method decoded the same way (one table per
decoding) through the same ensemble deployment (docs/method.md §6, §8.22)."""

from __future__ import annotations

import logging

import torch
from ray import serve

from emorl_ray import storage
from emorl_ray.config import EVAL_METHODS, ExperimentConfig
from emorl_ray.ensemble.deployment import APP_NAME
from emorl_ray.evaluation.stats import distinct_2, distinct_2_authors, edit_rate, loop_rate, mean_ci, per_prompt_means
from emorl_ray.rundir import EvalResult, RunDir, RunManifest

log = logging.getLogger(__name__)


def methods_to_evaluate(objectives: list[str], best_weights: dict, baselines: list[RunManifest] = (),
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
        label = f"baseline: {m.name}" + ("" if m.lora else " (full fine-tune)")
        methods[label] = ({"weights": {m.name: 1.0}, "runs": [m.name]} if m.lora else
                          {"weights": None, "model_path": m.model_path, "runs": [m.name]})
    return methods


def decode_key(method: dict, adapters: list[str]) -> tuple | None:
    """What decides a method's generations, so that methods which decode the same thing share one
    request (e.g. searched weights that came out one-hot are a single adapter's row). The
    evaluator's decode depends on the weights only through the adapters with a weight > 0 and,
    except for parameter aggregation, w / sum w, computed here as the ensemble computes it
    (float32, in adapter order). None: never shared (weights per prompt)."""
    if "weights_by_split" in method:
        return None
    if method["weights"] is None:
        return ("model", method.get("model_path"))
    kept = [(n, float(method["weights"][n])) for n in adapters if method["weights"].get(n, 0) > 0]
    if not kept:
        return ("origin",)
    if method["aggregation"] != "parameter":
        w = torch.tensor([x for _, x in kept], dtype=torch.float32)
        kept = list(zip((n for n, _ in kept), (w / w.sum()).tolist()))
    return (method["aggregation"], tuple(kept))


def sampling_request(cfg: ExperimentConfig, decoding: str) -> dict | None:
    """What the evaluator's `sampling` argument is for one decoding (None = greedy)."""
    if decoding == "greedy":
        return None
    ev = cfg.evaluation
    return {"temperature": ev.sampling.temperature, "top_k": ev.sampling.top_k, "top_p": ev.sampling.top_p,
            "seed": ev.seed, "samples_per_prompt": ev.samples_per_prompt}


def result_row(name: str, method: dict, res: dict, objectives: list[str], cost: dict[str, tuple[int, float]],
               n_prompts: int) -> dict:
    """One method's line of a results table, from the evaluator's answer for it. `cost`: training
    run name -> (data points, seconds)."""
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
    row["train_data_points"] = sum(points for points, _ in runs)
    row["train_seconds"] = round(sum(seconds for _, seconds in runs), 1)
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


def per_prompt_methods(cfg: ExperimentConfig, run_dir: RunDir, splits: list[str]):
    """The router and each split's prompt embeddings, where the run has a router and the router or
    bandit row is asked for (one encoder pass serves both); else None."""
    if not {"router", "bandit"} & set(cfg.evaluation.methods) or not storage.is_file(
            storage.join(run_dir.router, "router.json")):
        return None
    from emorl_ray.rewards.similarity import EmbeddingSimilarity
    from emorl_ray.routing import load_router

    router = load_router(run_dir.router)
    embed = EmbeddingSimilarity(router.encoder).embed
    contexts = {s: embed(p) for s, p in split_prompts(cfg, splits).items()}
    fit_seconds = storage.read_json(storage.join(run_dir.router, "metrics.json"))["fit_seconds"]
    return router, contexts, fit_seconds


def evaluate_methods(cfg: ExperimentConfig, run_dir: RunDir, best_weights: dict, manifests: list[RunManifest],
             baselines: list[RunManifest] = (), compared: dict[str, dict] | None = None) -> tuple[EvalResult, list]:
    """Every method under every decoding of evaluation.decodings, on the test split (and on
    `evaluation.generalization`'s test split, if set). Writes eval/metrics.json (with the Pareto
    view of the searched points and of the methods) and eval/samples.parquet."""
    handle = serve.get_app_handle(APP_NAME)
    objectives, ev, aggregation = cfg.objective_names, cfg.evaluation, cfg.search.aggregation
    methods = methods_to_evaluate(objectives, best_weights, baselines, compared, ev.methods)
    for m in methods.values():
        if m["weights"] is not None:
            m.setdefault("aggregation", aggregation)
    splits = ["test"] + (["generalization"] if ev.generalization is not None else [])
    tables = [(split, decoding) for split in splits for decoding in ev.decodings]
    cost = {m.name: (m.data_points, m.train_seconds) for m in manifests if m.seed == cfg.training.seeds[0]}
    per_prompt = per_prompt_methods(cfg, run_dir, splits)
    if per_prompt is not None:  # both per-prompt rows cost the router's fit
        router, contexts, cost["router"] = per_prompt[0], per_prompt[1], (0, per_prompt[2])
        if "router" in ev.methods:
            methods["EMORL + router (weights per prompt)"] = {
                "weights_by_split": {s: router.route(contexts[s]) for s in splits},
                "aggregation": aggregation, "runs": [*objectives, "router"]}
    # All requests at once: the deployment serialises generation, scoring overlaps. Methods that
    # decode the same thing share the first one's request.
    pending, first = {}, {}
    adapters = objectives + [b.name for b in baselines if b.lora]  # the evaluator's order (pipeline.evaluator_adapters)
    for split, decoding in tables:
        for name, m in methods.items():
            key = decode_key(m, adapters)
            same = first.setdefault((split, decoding, key), name) if key is not None else name
            if same != name:
                log.info("eval %s %s: %r decodes what %r does; one request serves both", split, decoding, name, same)
                pending[split, decoding, name] = (split, decoding, same)
                continue
            pending[split, decoding, name] = handle.evaluate.remote(
                m["weights_by_split"][split] if "weights_by_split" in m else m["weights"], split, ev.max_new_tokens,
                True, m.get("model_path"), m.get("aggregation"), sampling_request(cfg, decoding))
    results = {}
    for key, resp in pending.items():
        results[key] = results[resp] if isinstance(resp, tuple) else resp.result()
    if per_prompt is not None and "bandit" in ev.methods:  # one prompt after another, after the others
        name = "EMORL + bandit (online over the split)"
        methods[name] = {"aggregation": aggregation, "runs": [*objectives, "router"]}
        for split, decoding in tables:
            results[split, decoding, name] = bandit_online(handle, cfg, router, contexts[split], split, decoding)
    rows, samples = result_tables(results, methods, cfg, cost)
    result = EvalResult(
        aggregation=aggregation, sampling=sampling_request(cfg, "sampled"), evaluation=cfg.to_dict()["evaluation"],
        tables=[{"split": split, "decoding": decoding,
                 "source": cfg.data.source if split == "test" else ev.generalization.source,
                 "methods": rows[split, decoding]} for split, decoding in tables])
    if storage.is_file(run_dir.points_file()):
        from emorl_ray.evaluation.pareto import pareto_summary

        result.pareto = pareto_summary(storage.read_parquet(run_dir.points_file()), objectives,
                                       result.tables[0]["methods"])
        result.pareto["methods_table"] = {k: result.tables[0][k] for k in ("split", "decoding")}
    run_dir.write_eval_result(result)
    storage.write_parquet(run_dir.file("eval", "samples.parquet"), samples)
    return result, samples


def result_tables(results: dict, methods: dict, cfg: ExperimentConfig, cost: dict) -> tuple[dict, list]:
    """The evaluator's answers as table rows per (split, decoding), and every generation as a sample row."""
    objectives = cfg.objective_names
    rows: dict[tuple, list] = {}
    samples = []
    for (split, decoding, name), res in results.items():
        passes = 1 if decoding == "greedy" else cfg.evaluation.samples_per_prompt
        n_prompts = res["n"] // passes
        rows.setdefault((split, decoding), []).append(result_row(name, methods[name], res, objectives, cost,
                                                                 n_prompts))
        for i, (p, r) in enumerate(zip(res["prompts"], res["responses"])):
            samples.append({"split": split, "decoding": decoding, "method": name, "i": i % n_prompts,
                            "pass": i // n_prompts, "prompt": p, "response": r,
                            **{o: res["scores"][o][i] for o in objectives}})
        log.info("eval %-14s %-7s %-32s average %.4f", split, decoding, name, rows[split, decoding][-1]["average"])
    return rows, samples
