"""Cheap, deterministic rewards for tests and smoke runs on tiny random models.

Use them as `python` scorers: `{type: python, function: emorl_ray.rewards.toy:word_overlap}`.
"""

from __future__ import annotations


def word_overlap(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's words that occur in the prompt (a crude reflection proxy)."""
    out = []
    for p, r in zip(prompts, responses):
        pw, rw = set(p.lower().split()), r.lower().split()
        out.append(sum(w in pw for w in rw) / len(rw) if rw else 0.0)
    return out


def slow_word_overlap(prompts: list[str], responses: list[str]) -> list[float]:
    """`word_overlap` taking 1.5 s a call: long enough to lose a scorer replica mid-call in tests."""
    import time

    time.sleep(1.5)
    return word_overlap(prompts, responses)


def brevity(prompts: list[str], responses: list[str], target: int = 4) -> list[float]:
    """1 for responses of `target` words, falling linearly to 0 at 4x the target."""
    return [max(0.0, 1.0 - abs(len(r.split()) - target) / (3 * target)) for r in responses]


def token_rate(token: str):
    """A scorer rewarding the share of words equal to `token` (learnable in a few RL steps)."""
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return [sum(w == token for w in r.split()) / max(1, len(r.split())) for r in responses]
    return score


def vowel_start(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of words starting with a vowel: about 1/4 for random text, so RL has signal at once."""
    return [sum(w[0] in "aeiouAEIOU" for w in r.split()) / len(r.split()) if r.split() else 0.0
            for r in responses]
