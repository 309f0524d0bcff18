"""Scorers as Ray Serve deployments, shared by every trainer and search trial.

One application per objective (`emorl-scorer-<objective>`), handles only (`route_prefix=None`).
Calls from concurrent trainers are merged into one forward pass by `@serve.batch`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

from ray import serve

from emorl_ray.config import ExperimentConfig, ModelConfig, ScorerConfig
from emorl_ray.rewards import ScorerError, build_scorer, check_scores

log = logging.getLogger(__name__)


def app_name(objective: str) -> str:
    return f"emorl-scorer-{objective}"


def _n_pairs(requests: list) -> int:
    return sum(len(prompts) for prompts, _ in requests)


# A job removes its scorers only once it is done with them: no call is left to drain, and Serve's
# default 2 s between drain checks would only delay the job's end (emorl_ray/pipeline.py).
@serve.deployment(max_ongoing_requests=128, health_check_period_s=10, graceful_shutdown_wait_loop_s=0.2)
class ScorerDeployment:
    def __init__(self, objective: str, scorer: dict, policy_model: dict):
        from emorl_ray.placement import use_reserved_cpus

        self.objective = objective
        scorer_cfg = ScorerConfig(**scorer)
        use_reserved_cpus(scorer_cfg.num_cpus)
        self.scorer = build_scorer(scorer_cfg, ModelConfig(**policy_model))

    @serve.batch(max_batch_size=128, batch_wait_timeout_s=0.02, batch_size_fn=_n_pairs)
    async def _score_batch(self, requests: list[tuple[list[str], list[str]]]) -> list[list[float]]:
        prompts = [p for ps, _ in requests for p in ps]
        responses = [r for _, rs in requests for r in rs]
        # The scorer is blocking torch code: run it off the replica's event loop.
        scores = await asyncio.to_thread(self.scorer, prompts, responses)
        scores = check_scores(self.objective, scores, len(prompts))
        out, i = [], 0
        for ps, _ in requests:
            out.append(scores[i:i + len(ps)])
            i += len(ps)
        return out

    async def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            return []
        return await self._score_batch((list(prompts), list(responses)))


def deploy_scorers(cfg: ExperimentConfig, objectives: list[str] | None = None, alongside: Sequence = ()) -> dict:
    """Start one Serve application per objective, and the applications `alongside` (`RunTarget`s,
    e.g. the evaluator, which calls the scorers only once asked to score), all at once; wait until
    all are healthy. Returns the scorers' handles by objective."""
    import dataclasses

    from ray.serve.api import RunTarget

    objectives = objectives or cfg.objective_names
    targets = []
    for name in objectives:
        sc = cfg.objectives[name].scorer
        app = ScorerDeployment.options(
            name=f"scorer_{name}", num_replicas=sc.num_replicas,
            ray_actor_options={"num_cpus": sc.num_cpus, "num_gpus": sc.num_gpus, "resources": sc.resources},
        ).bind(name, dataclasses.asdict(sc), dataclasses.asdict(cfg.model))
        targets.append(RunTarget(target=app, name=app_name(name), route_prefix=None))
    apps = targets + list(alongside)
    handles = serve.run_many(apps)
    log.info("deployed as Serve apps: %s", [t.name for t in apps])
    return dict(zip(objectives, handles[:len(targets)], strict=True))  # the `alongside` apps' handles come after


class ServeRewards:
    """Scores through the deployed scorer apps; same interface as `LocalRewards`. Picklable."""

    def __init__(self, objectives: list[str], timeout_s: float = 600.0, retries: int = 3):
        self._objectives = list(objectives)
        self.timeout_s = timeout_s
        self.retries = retries
        self.retried = 0  # calls resent after a failure (a replica lost mid-call); logged per step
        self._handles = {}

    @property
    def objectives(self) -> list[str]:
        return self._objectives

    def _handle(self, objective: str):
        if objective not in self._handles:
            self._handles[objective] = serve.get_app_handle(app_name(objective))
        return self._handles[objective]

    def _call(self, objective: str, prompts, responses):
        return self._handle(objective).score.remote(list(prompts), list(responses))

    def score(self, objective: str, prompts, responses) -> list[float]:
        return self.score_all(prompts, responses, [objective])[objective]

    async def ascore_all(self, prompts, responses, objectives=None) -> dict[str, list[float]]:
        """`score_all` for callers inside an event loop (other Serve deployments)."""
        objectives = objectives or self._objectives
        pending = {o: self._call(o, prompts, responses) for o in objectives}
        return {o: check_scores(o, await r, len(prompts)) for o, r in pending.items()}

    def score_all(self, prompts, responses, objectives=None) -> dict[str, list[float]]:
        objectives = objectives or self._objectives
        # Fire all objectives at once; the scorer replicas work in parallel.
        pending = {o: self._call(o, prompts, responses) for o in objectives}
        out = {}
        for o, resp in pending.items():
            for attempt in range(self.retries + 1):
                try:
                    out[o] = check_scores(o, resp.result(timeout_s=self.timeout_s), len(prompts))
                    break
                except Exception as e:  # a replica died mid-call: Serve restarts it, we resend
                    if attempt == self.retries or isinstance(e, ScorerError):
                        raise
                    self.retried += 1
                    log.warning("scorer %r call failed (%s); retrying", o, e)
                    time.sleep(2 ** attempt)  # give Serve's controller time to replace the replica
                    resp = self._call(o, prompts, responses)
        return out


def serve_replicas(app: str) -> list[str]:
    """Names of the live replica actors of a Serve application (from the GCS; no dashboard needed)."""
    import ray

    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{app}#")]
