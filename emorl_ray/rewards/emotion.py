"""Empathy proxy: does the response name the feelings the client's statement carries?

Each text is read as a distribution over a fixed list of feelings: the sentence encoder's cosine
similarity to "I feel <feeling>." for each, through a softmax at a low temperature. The score is
the Bhattacharyya coefficient of the client's and the response's distributions: 1 when the response
carries the same feelings, near 0 when it carries others or none.

Why not a keyword count: a reward that ignores the prompt has one best answer for every prompt, and
RL finds it. With the empathy lexicon the adapter answered every client with "I'm so sorry to hear
that you're going through a tough time" (README: the default scorers). A generic opener carries
sadness or stress whatever the client feels, so here it only scores well for sad or stressed clients;
to score everywhere, a response has to follow the client's own feelings.

It is blind to stance: advice that names the right feeling scores as well as a reflection, and the
encoder's topic similarity leaks into the feeling distributions.
"""

from __future__ import annotations

import torch

from emorl_ray.rewards.similarity import EmbeddingSimilarity

FEELINGS = (
    "sad", "lonely", "anxious", "scared", "angry", "frustrated", "guilty", "ashamed", "overwhelmed",
    "exhausted", "hopeless", "hurt", "betrayed", "jealous", "embarrassed", "confused", "stuck",
    "relieved", "grieving", "worthless", "trapped", "unappreciated", "rejected", "insecure",
)
# Cosines to the prototypes differ by hundredths between feelings, so the softmax must be sharp:
# for the grieving client of tests/test_rewards.py the template scored 0.83 against the specific
# reflection's 0.93 at temperature 0.05, and 0.73 against 0.94 at 0.02.
TEMPERATURE = 0.02


class EmotionMatch:
    def __init__(self, model_ref: str, batch_size: int = 32, feelings: tuple[str, ...] = FEELINGS,
                 temperature: float = TEMPERATURE, device: str = "cpu"):
        self.encoder = EmbeddingSimilarity(model_ref, batch_size=batch_size, device=device)
        self.feelings, self.temperature = feelings, temperature
        self.prototypes = self.encoder.embed([f"I feel {f}." for f in feelings])

    def distribution(self, texts: list[str]) -> torch.Tensor:
        """(len(texts), len(feelings)) rows summing to 1."""
        return torch.softmax(self.encoder.embed(texts) @ self.prototypes.T / self.temperature, dim=-1)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not prompts:
            return []
        p = self.distribution(list(prompts))
        q = self.distribution([r if r.strip() else " " for r in responses])
        overlap = (p.sqrt() * q.sqrt()).sum(-1).clamp(0.0, 1.0)
        # An empty response names no feeling.
        return [0.0 if not r.strip() else float(s) for r, s in zip(responses, overlap)]
