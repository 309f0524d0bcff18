"""The ensemble as a Ray Serve deployment: base model + K adapters loaded once per replica.

Search trials and the evaluation stage call it through a handle, so a trial costs one
generation over the validation prompts plus scoring, never a model load.
"""

from __future__ import annotations

import asyncio
import threading

from ray import serve

from emorl_ray import storage
from emorl_ray.config import config_from_dict

APP_NAME = "emorl-ensemble"


def load_ensemble(cfg, adapters: dict[str, str], device: str, num_cpus: float, prefill_cache_mb: float = 0):
    """Base model + adapters for a Serve replica, using the CPU threads the replica reserved."""
    from emorl_ray.ensemble.adapter_ensemble import AdapterEnsemble
    from emorl_ray.models import Policy
    from emorl_ray.placement import use_reserved_cpus

    use_reserved_cpus(num_cpus)
    return AdapterEnsemble(Policy(cfg.model, device), adapters, prefill_cache_mb)


@serve.deployment(max_ongoing_requests=16, graceful_shutdown_wait_loop_s=0.2)  # as the scorers (rewards/serve.py)
class EnsembleEvaluator:
    """`adapters`: name -> adapter directory: the objectives' adapters, plus any LoRA baseline
    adapters the evaluation compares (they take weight 0 unless named). Fully fine-tuned baselines
    are loaded on demand by `evaluate(model_path=...)`."""

    def __init__(self, experiment: dict, adapters: dict[str, str], device: str = "cpu"):
        from emorl_ray.data import load_splits
        from emorl_ray.rewards.serve import ServeRewards

        cfg = config_from_dict(experiment)
        self.cfg = cfg
        # Trials and evaluation rows decode the same prompts again and again: keep their prompt passes.
        self.ensemble = load_ensemble(cfg, adapters, device, cfg.search.evaluator_cpus, cfg.search.prefill_cache_mb)
        splits = load_splits(cfg.data, cfg.faithful)
        self.prompts = {"val": [r["prompt"] for r in splits.val], "test": [r["prompt"] for r in splits.test]}
        if cfg.evaluation.generalization is not None:
            gen = load_splits(cfg.evaluation.generalization)
            self.prompts["generalization"] = [r["prompt"] for r in gen.test]
        self.rewards = ServeRewards(cfg.objective_names)
        # One generation at a time per replica: they are compute-bound and share the weights.
        self._lock = threading.Lock()
        self._full = (None, None)  # (path, Policy) of the fully fine-tuned model loaded last

    def _all_adapters(self, weights: dict) -> dict:
        """Adapters left out of `weights` take no part (weight 0); unknown names stay, to be refused."""
        unknown = set(weights) - set(self.ensemble.names)
        return {n: weights.get(n, 0.0) for n in self.ensemble.names} | {n: weights[n] for n in unknown}

    def _generate(self, prompts, weights, max_new_tokens, aggregation, sampling):
        with self._lock:
            kw = {"greedy": True} if sampling is None else {
                "greedy": False, **{k: sampling[k] for k in ("temperature", "top_k", "top_p", "seed")}}
            return self.ensemble.generate(prompts, weights, max_new_tokens, batch_size=self.cfg.search.batch_size,
                                          aggregation=aggregation, **kw)

    def _generate_full(self, prompts, model_path, max_new_tokens, sampling):
        import copy

        from emorl_ray.decoding.engine import generate_texts
        from emorl_ray.models import load_model

        with self._lock:
            path, policy = self._full
            if path != model_path:
                self._full = (None, None)  # one full model at a time
                base = self.ensemble.policy
                policy = copy.copy(base)
                policy.model = load_model(storage.local_dir(model_path), self.cfg.model, base.kind, base.device).eval()
                self._full = (model_path, policy)
            return generate_texts(policy, policy.model, prompts, max_new_tokens, self.cfg.search.batch_size, sampling)

    async def evaluate(self, weights: dict | list | None, split: str = "val", max_new_tokens: int | None = None,
                       return_samples: bool = False, model_path: str | None = None,
                       aggregation: str | None = None, sampling: dict | None = None,
                       indices: list[int] | None = None) -> dict:
        """Generate for every prompt of `split` with `weights` (None = base model) combined by
        `aggregation` (default: search.aggregation), or with the fully fine-tuned model saved at
        `model_path`, and score it. Greedy unless `sampling` = {temperature, top_k, top_p, seed,
        samples_per_prompt}; sampled generations come prompt list after prompt list. `weights` may
        be a list with one vector per prompt (the per-prompt router's); `indices` keeps only those
        prompts of the split (the bandit's one prompt at a time)."""
        if split not in self.prompts:
            raise ValueError(f"split must be one of {sorted(self.prompts)}, got {split!r}")
        passes = 1 if sampling is None else sampling["samples_per_prompt"]
        base = self.prompts[split] if indices is None else [self.prompts[split][i] for i in indices]
        prompts = base * passes
        max_new_tokens = max_new_tokens or self.cfg.search.max_new_tokens
        aggregation = aggregation or self.cfg.search.aggregation
        per_row = isinstance(weights, list)
        if per_row:
            if len(weights) != len(base):
                raise ValueError(f"{len(weights)} weight vectors for {len(base)} {split} prompts")
            weights = [self._all_adapters(w) for w in weights] * passes
        elif weights is not None:
            weights = self._all_adapters(weights)
        origin = weights is not None and not per_row and not any(w > 0 for w in weights.values())
        if origin:
            # The corner w = 0 of the authors' cube: h = 0, every logit 0, so their decode emitted
            # token 0 (pad) at every step: an empty response, scored low but finite like any other
            # (docs/method.md §3). Scoring it -inf would bar every sub-box holding the origin.
            texts = [""] * len(prompts)
        elif model_path is not None:
            texts = await asyncio.to_thread(self._generate_full, prompts, model_path, max_new_tokens, sampling)
        else:
            texts = await asyncio.to_thread(self._generate, prompts, weights, max_new_tokens, aggregation, sampling)
        scores = await self.rewards.ascore_all(prompts, texts)
        means = {o: sum(v) / len(v) for o, v in scores.items()}
        if per_row:  # the mean over prompts of what each decoded with
            used_rows = [self.ensemble.weights_used(w, aggregation) for w in weights]
            used = {n: sum(u[n] for u in used_rows) / len(used_rows) for n in self.ensemble.names}
        else:
            used = None if weights is None or model_path is not None else \
                dict.fromkeys(self.ensemble.names, 0.0) if origin else self.ensemble.weights_used(weights, aggregation)
        out = {"per_objective": means, "mean": sum(means.values()) / len(means), "n": len(prompts),
               "weights_used": used}
        if return_samples:
            out.update(prompts=prompts, responses=texts, scores=scores)
        return out


def evaluator_app(cfg, adapters: dict[str, str]):
    """The evaluator as a Serve application to start, alone or with the scorers (rewards/serve.py)."""
    from ray.serve.api import RunTarget

    se = cfg.search
    device = "cuda" if se.evaluator_gpus > 0 else "cpu"
    app = EnsembleEvaluator.options(
        num_replicas=se.evaluator_replicas,
        ray_actor_options={"num_cpus": se.evaluator_cpus, "num_gpus": se.evaluator_gpus,
                           "resources": se.evaluator_resources},
    ).bind(cfg.to_dict(), adapters, device)
    return RunTarget(target=app, name=APP_NAME, route_prefix=None)


def deploy_evaluator(cfg, adapters: dict[str, str]):
    """Start the evaluator and wait until it is healthy; returns its handle."""
    (handle,) = serve.run_many([evaluator_app(cfg, adapters)])
    return handle
