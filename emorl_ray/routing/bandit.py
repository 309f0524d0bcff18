"""Per-prompt weights learned online: a contextual bandit over the searched weight vectors.

The arms are the weight vectors the search scored; the context is the prompt's sentence embedding
(plus a constant); the reward is the scorers' mean on the generated response. Disjoint LinUCB
(Li et al., WWW 2010): per arm a ridge regression of reward on context, and the arm with the highest
upper confidence bound theta_a . x + alpha * sqrt(x . A_a^-1 . x) is played. `alpha` is the
exploration parameter: 0 is greedy on the current estimates; larger values try uncertain arms more.
The bandit can start from the search's per-prompt scores (every arm observed on every validation
prompt), so it serves well from its first request and keeps learning from live traffic. Its state
is a JSON file written atomically after each update and restored on start.
"""

from __future__ import annotations

import torch

from emorl_ray import storage


class LinUCB:
    def __init__(self, arms: list[list[float]], objectives: list[str], dim: int, alpha: float = 0.5,
                 ridge: float = 1.0):
        if len(arms) < 2:
            raise ValueError("a bandit needs at least two arms (weight vectors)")
        if alpha < 0 or ridge <= 0:
            raise ValueError("alpha must be >= 0 and ridge > 0")
        self.arms, self.objectives, self.alpha, self.ridge = [list(a) for a in arms], list(objectives), alpha, ridge
        d = dim + 1  # the context and a constant (each arm's mean reward)
        # A_a^-1 kept directly (Sherman-Morrison updates) and b_a = sum r x.
        self.a_inv = torch.eye(d, dtype=torch.float64).repeat(len(arms), 1, 1) / ridge
        self.b = torch.zeros(len(arms), d, dtype=torch.float64)
        self.plays = [0] * len(arms)

    @staticmethod
    def _x(context) -> torch.Tensor:
        x = torch.as_tensor(context, dtype=torch.float64).flatten()
        return torch.cat([x, x.new_ones(1)])

    def ucb(self, context) -> torch.Tensor:
        x = self._x(context)
        theta = torch.einsum("aij,aj->ai", self.a_inv, self.b)
        width = torch.einsum("i,aij,j->a", x, self.a_inv, x).clamp(min=0).sqrt()
        return theta @ x + self.alpha * width

    def choose(self, context) -> int:
        return int(self.ucb(context).argmax())

    def weights(self, arm: int) -> dict[str, float]:
        return dict(zip(self.objectives, self.arms[arm]))

    def update(self, arm: int, context, reward: float) -> None:
        x = self._x(context)
        a_inv = self.a_inv[arm]
        ax = a_inv @ x
        self.a_inv[arm] = a_inv - torch.outer(ax, ax) / (1 + x @ ax)
        self.b[arm] += reward * x
        self.plays[arm] += 1

    def warm_start(self, contexts, scores: list[list[float]]) -> None:
        """Observe every arm on every context: `scores[a][j]` is arm a's reward on context j (the
        search's per-prompt scores of the validation prompts)."""
        for j, x in enumerate(contexts):
            for a in range(len(self.arms)):
                self.update(a, x, scores[a][j])

    def state_dict(self) -> dict:
        return {"arms": self.arms, "objectives": self.objectives, "alpha": self.alpha, "ridge": self.ridge,
                "a_inv": self.a_inv.tolist(), "b": self.b.tolist(), "plays": self.plays}

    @classmethod
    def from_state(cls, state: dict) -> "LinUCB":
        bandit = cls(state["arms"], state["objectives"], len(state["b"][0]) - 1, state["alpha"], state["ridge"])
        bandit.a_inv = torch.tensor(state["a_inv"], dtype=torch.float64)
        bandit.b = torch.tensor(state["b"], dtype=torch.float64)
        bandit.plays = list(state["plays"])
        return bandit

    def save(self, location: str) -> None:
        storage.write_json(location, self.state_dict())

    @classmethod
    def load(cls, location: str) -> "LinUCB":
        return cls.from_state(storage.read_json(location))


def bandit_from_router(router, alpha: float = 0.5) -> LinUCB:
    """Arms = the router's searched vectors, warm-started on its validation prompts and scores."""
    bandit = LinUCB(router.weights, router.objectives, len(router.embeddings[0]), alpha)
    bandit.warm_start(router.embeddings, router.scores)
    return bandit
