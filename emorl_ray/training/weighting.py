"""How a run weights its objectives' rewards, r = sum_i w_i f(s_i), step by step (docs/method.md §2, §5).

- `FixedWeights`: EMORL's single-objective runs (w = 1 for one objective) and the Uniform
  Weighted baseline (w = 1/K for each of K objectives).
- `DynaOpt`: the dynamic weighting baseline of Min et al. (2024): an Exp3 bandit picks which
  objective to favour, a second Exp3 bandit's normalised weights are the reward weights, and the
  picking bandit is rewarded by how much the validation scores improved over their recent history.

Both keep their state in a JSON-able dict that the trainer checkpoints, so a resumed run carries on
with the same weights and bandit draws.
"""

from __future__ import annotations

import math
import random


class FixedWeights:
    def __init__(self, weights: dict[str, float]):
        self._weights = dict(weights)

    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def observe_validation(self, scores: dict[str, list[float]]) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Exp3:
    """Exp3 (Auer et al. 2002) as DynaOpt implements it: p_j = (1-g) w_j / sum w + g / n;
    after reward x on arm j, w_j <- w_j exp(g x / (p_j n)). Rewards are not clipped to [0, 1]:
    a negative one shrinks the arm's weight."""

    def __init__(self, n: int, gamma: float):
        self.n, self.gamma = n, gamma
        self.w = [1.0] * n

    def probs(self) -> list[float]:
        total = sum(self.w)
        return [(1 - self.gamma) * wj / total + self.gamma / self.n for wj in self.w]

    def draw(self, rng: random.Random) -> int:
        return rng.choices(range(self.n), weights=self.probs())[0]

    def update(self, arm: int, reward: float) -> None:
        p = self.probs()[arm]
        self.w[arm] *= math.exp(self.gamma * reward / (p * self.n))
        # Exp3 depends only on weight ratios; rescaling keeps long runs from overflowing.
        top = max(self.w)
        self.w = [wj / top for wj in self.w]


class DynaOpt:
    """Two Exp3 bandits (docs/method.md §5). The arm bandit has K+1 arms: "raise objective i's weight" for
    each objective, plus "leave the weights as they are".

    Original semantics (default): a pulled arm updates the weight bandit once; the arm bandit's reward
    is the mean over the trained objectives of (validation mean - mean of the last `history`
    individual validation scores). `faithful=True` reproduces EMORL's variant: the pulled arm updates
    the weight bandit at every training step until the next validation, the history is the last 8
    scores of the previous validation only, and the reward weights are 1.0 each until the first update.
    """

    def __init__(self, objectives: list[str], gamma: float = 0.07, history: int = 200, seed: int = 0,
                 faithful: bool = False):
        self.objectives = list(objectives)
        self.K = len(objectives)
        self.gamma, self.history_len, self.seed, self.faithful = gamma, history, seed, faithful
        self.arm_bandit = Exp3(self.K + 1, gamma)
        self.weight_bandit = Exp3(self.K, gamma)
        self.history: dict[str, list[float]] = {o: [] for o in objectives}
        self.pulls = 0
        self.chosen = self._draw()
        self.pending = True     # the pulled arm has not updated the weight bandit yet
        self.updated = False    # the weight bandit was updated at least once

    def _draw(self) -> int:
        # A pure function of (seed, pull number): a resumed run draws what the uninterrupted one drew.
        arm = self.arm_bandit.draw(random.Random(self.seed * 1_000_003 + self.pulls))
        self.pulls += 1
        return arm

    def weights(self) -> dict[str, float]:
        """The reward weights of the next training step."""
        if self.chosen < self.K and (self.pending or self.faithful):
            self.weight_bandit.update(self.chosen, 1.0)
            self.pending, self.updated = False, True
        if self.faithful and not self.updated:
            return {o: 1.0 for o in self.objectives}
        total = sum(self.weight_bandit.w)
        return {o: wj / total for o, wj in zip(self.objectives, self.weight_bandit.w)}

    def observe_validation(self, scores: dict[str, list[float]]) -> None:
        gains = []
        for o in self.objectives:
            past = self.history[o]
            current = scores[o]
            gains.append(sum(current) / len(current) - sum(past) / len(past) if past else 0.0)
            self.history[o] = current[-8:] if self.faithful else (past + current)[-self.history_len:]
        self.arm_bandit.update(self.chosen, sum(gains) / len(gains))
        self.chosen = self._draw()
        self.pending = True

    def state_dict(self) -> dict:
        return {"arm_w": self.arm_bandit.w, "weight_w": self.weight_bandit.w, "history": self.history,
                "pulls": self.pulls, "chosen": self.chosen, "pending": self.pending, "updated": self.updated}

    def load_state_dict(self, state: dict) -> None:
        self.arm_bandit.w = list(state["arm_w"])
        self.weight_bandit.w = list(state["weight_w"])
        self.history = {o: list(v) for o, v in state["history"].items()}
        self.pulls, self.chosen = state["pulls"], state["chosen"]
        self.pending, self.updated = state["pending"], state["updated"]


def build_weighting(method: str, reward_weights: dict[str, float], gamma: float, history: int, seed: int,
                    faithful: bool):
    if method == "dynaopt":
        return DynaOpt(list(reward_weights), gamma, history, seed, faithful)
    return FixedWeights(reward_weights)
