"""Repetition: the degenerate text RL finds first on keyword and likelihood rewards.

`loops` is the evaluation's loop test; `penalized` is the scorer option
`penalize_repetition` built on the same test, so a response the tables count as a loop earns the
lowest reward.
"""

from __future__ import annotations

from typing import Callable, Sequence


def distinct_bigram_share(text: str) -> float:
    """Distinct word bigrams / word bigrams of one response (1.0 below two words)."""
    words = text.lower().split()
    bigrams = list(zip(words, words[1:]))
    return len(set(bigrams)) / len(bigrams) if bigrams else 1.0


def loops(text: str, n: int = 3) -> bool:
    """Whether a response repeats itself: some word n-gram occurs twice ("You're not alone.
    You're not alone.")."""
    w = text.lower().split()
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return len(grams) != len(set(grams))


def penalized(scorer: Callable[[Sequence[str], Sequence[str]], list]):
    """`scorer` times each response's distinct-bigram share, and 0 for a loop."""
    def score(prompts, responses):
        return [0.0 if loops(r) else s * distinct_bigram_share(r)
                for s, r in zip(scorer(prompts, responses), responses)]
    return score
