"""Reward scorers: each maps (client prompts, responses) to one score in [0, 1] per pair.

A scorer is any callable `(prompts: list[str], responses: list[str]) -> list[float]`. The trainers
and the ensemble search call them through Ray Serve deployments (`rewards.serve`); tests call them
in process. Each type lives in its own module; `build_scorer` picks one from the config.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from emorl_ray.config import ModelConfig, ScorerConfig

Scorer = Callable[[Sequence[str], Sequence[str]], list]


class ScorerError(RuntimeError):
    """A scorer returned something unusable; the message names the scorer."""


def check_scores(name: str, scores, n: int) -> list[float]:
    scores = [float(s) for s in scores]
    if len(scores) != n:
        raise ScorerError(f"scorer {name!r} returned {len(scores)} scores for {n} responses")
    bad = [i for i, s in enumerate(scores) if not math.isfinite(s)]
    if bad:
        raise ScorerError(f"scorer {name!r} returned non-finite scores at positions {bad[:5]}")
    return scores


def load_python_scorer(path: str) -> Scorer:
    module_name, _, attr = path.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ScorerError(f"cannot import python scorer {path!r}: {e}") from None
    return fn() if isinstance(fn, type) else fn


def build_scorer(cfg: ScorerConfig, policy_model: ModelConfig) -> Scorer:
    from emorl_ray.rewards.repetition import penalized

    scorer = _build_scorer(cfg, policy_model)
    return penalized(scorer) if cfg.penalize_repetition else scorer


def _build_scorer(cfg: ScorerConfig, policy_model: ModelConfig) -> Scorer:
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    if cfg.type == "embedding_similarity":
        from emorl_ray.rewards.similarity import EmbeddingSimilarity

        return EmbeddingSimilarity(cfg.model, batch_size=cfg.batch_size, device=device)
    if cfg.type == "emotion_match":
        from emorl_ray.rewards.emotion import EmotionMatch

        return EmotionMatch(cfg.model, batch_size=cfg.batch_size, device=device)
    if cfg.type == "empathy_lexicon":
        from emorl_ray.rewards.empathy import EmpathyLexicon

        return EmpathyLexicon()
    if cfg.type == "perplexity":
        from emorl_ray.rewards.fluency import PerplexityFluency

        return PerplexityFluency(cfg.model, policy_model, mode=cfg.mode, cap=cfg.cap, batch_size=cfg.batch_size,
                                 device=device, context_cache_mb=cfg.context_cache_mb)
    if cfg.type in ("hf_classifier", "cross_encoder"):
        from emorl_ray.rewards.classifier import HFClassifier

        return HFClassifier(cfg.model, input=cfg.input, output=cfg.output, label=cfg.label, batch_size=cfg.batch_size,
                            device=device)
    return load_python_scorer(cfg.function)


class LocalRewards:
    """In-process scorers with the same interface as the Serve-backed `ServeRewards`."""

    def __init__(self, scorers: dict[str, Scorer]):
        self.scorers = scorers

    @property
    def objectives(self) -> list[str]:
        return list(self.scorers)

    def score(self, objective: str, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return check_scores(objective, self.scorers[objective](list(prompts), list(responses)), len(prompts))

    def score_all(self, prompts, responses, objectives=None) -> dict[str, list[float]]:
        return {o: self.score(o, prompts, responses) for o in (objectives or self.objectives)}
