"""Per-prompt ensemble weights: the next step the EMORL authors name in their outlook (combine
the trained models per input instead of one weight vector for every prompt).

The hierarchical search already scored every weight vector it visited on every validation prompt
(`search/points.parquet`, columns `prompt_scores/<objective>`). The router is k-nearest neighbours
over those prompts: a new prompt is embedded (a sentence encoder, MiniLM by default), its k nearest
validation prompts are found by cosine similarity, and the searched vector with the best mean score
on them is used. k is fitted by leave-one-out over the validation prompts, and the same
leave-one-out gives an honest comparison with the single searched vector (itself re-chosen without
the held-out prompt). Small, quick, and it cannot be worse on the validation prompts than its own
choice of k says.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from functools import cached_property

import torch

from emorl_ray import storage

KS = (1, 2, 3, 5, 8, 13, 21)


@dataclass
class KNNRouter:
    objectives: list[str]
    weights: list[list[float]]      # the P searched vectors it chooses from
    scores: list[list[float]]       # P x J: each vector's mean objective score on validation prompt j
    embeddings: list[list[float]]   # J x d, unit norm
    k: int
    encoder: str

    @cached_property
    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        # Built once per loaded router, not on every routed request.
        return torch.tensor(self.scores), torch.tensor(self.embeddings)

    def choose(self, emb: torch.Tensor) -> list[int]:
        """Index of the chosen vector for each row of `emb` (unit-norm embeddings)."""
        scores, embeddings = self._tensors
        return _choose(scores, embeddings, emb, self.k)

    def route(self, emb: torch.Tensor) -> list[dict[str, float]]:
        return [dict(zip(self.objectives, self.weights[i])) for i in self.choose(emb)]


def _choose(scores: torch.Tensor, train_emb: torch.Tensor, emb: torch.Tensor, k: int,
            exclude: torch.Tensor | None = None) -> list[int]:
    sim = emb @ train_emb.T                        # (N, J)
    if exclude is not None:                        # leave-one-out: a prompt is not its own neighbour
        sim = sim.masked_fill(exclude, float("-inf"))
    k = min(k, train_emb.shape[0] - (1 if exclude is not None else 0))
    nearest = sim.topk(k, dim=1).indices           # (N, k)
    # Mean score of every vector over each row's neighbours; ties go to the lower index (stable).
    neighbourhood = scores[:, nearest].mean(-1)    # (P, N)
    return neighbourhood.argmax(0).tolist()


def _loo(scores: torch.Tensor, emb: torch.Tensor, k: int) -> float:
    """Mean score on each validation prompt of the vector chosen from the other prompts."""
    picks = _choose(scores, emb, emb, k, exclude=torch.eye(emb.shape[0], dtype=torch.bool))
    return float(torch.tensor([scores[p, j] for j, p in enumerate(picks)]).mean())


def _single_loo(scores: torch.Tensor) -> float:
    """The same for one vector for all prompts: the best on the other prompts, scored on the held-out one."""
    J = scores.shape[1]
    total = scores.sum(1, keepdim=True)
    picks = ((total - scores) / max(J - 1, 1)).argmax(0)
    return float(scores[picks, torch.arange(J)].mean())


def fit_router(points: list[dict], objectives: list[str], prompts: list[str], embed, encoder: str
               ) -> tuple[KNNRouter, dict]:
    """Fit on the search's points (rows with `w/<o>` and `prompt_scores/<o>` over `prompts`).
    `embed`: list of texts -> (n, d) unit-norm tensor. Returns the router and its validation metrics."""
    t0 = time.time()
    usable = [p for p in points if p.get("score") is not None and sum(p[f"w/{o}"] for o in objectives) > 0
              and all(p.get(f"prompt_scores/{o}") for o in objectives)]
    if len(usable) < 2:
        raise ValueError("the router needs at least two scored weight vectors with per-prompt scores "
                         "(search/points.parquet `prompt_scores/<objective>`); run the search first")
    J = len(prompts)
    if any(len(p[f"prompt_scores/{o}"]) != J for p in usable for o in objectives):
        raise ValueError(f"per-prompt scores do not match the {J} validation prompts")
    scores = torch.tensor([[sum(p[f"prompt_scores/{o}"][j] for o in objectives) / len(objectives)
                            for j in range(J)] for p in usable], dtype=torch.float64)
    emb = embed(prompts).double()
    ks = [k for k in KS if k < J] or [1]
    loo = {k: _loo(scores, emb, k) for k in ks}
    best_k = max(ks, key=lambda k: (loo[k], -k))  # ties: the smaller neighbourhood
    router = KNNRouter(objectives, [[p[f"w/{o}"] for o in objectives] for p in usable], scores.tolist(),
                       emb.float().tolist(), best_k, encoder)
    metrics = {"k": best_k, "loo_by_k": {str(k): v for k, v in loo.items()},
               "router_loo_score": loo[best_k], "single_vector_loo_score": _single_loo(scores),
               "oracle_score": float(scores.max(0).values.mean()), "vectors": len(usable), "prompts": J,
               "fit_seconds": round(time.time() - t0, 3)}
    return router, metrics


def save_router(router: KNNRouter, metrics: dict, location: str) -> None:
    storage.write_json(storage.join(location, "metrics.json"), metrics)
    storage.write_json(storage.join(location, "router.json"), asdict(router))


def load_router(location: str) -> KNNRouter:
    return KNNRouter(**storage.read_json(storage.join(location, "router.json")))


def fit_run_router(cfg, run_dir) -> dict:
    """Fit the router on a finished search of `run_dir` (a RunDir) and save it to <run>/router/."""
    from emorl_ray.data import load_splits
    from emorl_ray.rewards.similarity import EmbeddingSimilarity

    points_file = run_dir.points_file()
    if not storage.is_file(points_file):
        raise FileNotFoundError(f"{points_file} does not exist: the run's search has not finished")
    # The evaluator scored the validation prompts in this order (ensemble/deployment.py).
    prompts = [r["prompt"] for r in load_splits(cfg.data, cfg.faithful).val]
    embed = EmbeddingSimilarity(cfg.search.router_encoder).embed
    router, metrics = fit_router(storage.read_parquet(points_file), cfg.objective_names, prompts, embed,
                                 cfg.search.router_encoder)
    save_router(router, metrics, run_dir.router)
    return metrics
