"""What a results table reports beside the scores: diversity, loops, the edit rate to the prompt,
and 95% confidence intervals over prompts (docs/method.md §6)."""

from __future__ import annotations

import math

from emorl_ray.rewards.repetition import loops


def distinct_2(texts: list[str]) -> float:
    """Distinct whitespace bigrams / all bigrams, over the whole set of generations."""
    bigrams = [tuple(w[i:i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(bigrams)) / len(bigrams) if bigrams else 0.0


def distinct_2_authors(texts: list[str]) -> float:
    """The authors' variant (docs/method.md §6): per generation, distinct bigrams / words; averaged."""
    vals = []
    for t in texts:
        w = t.split()
        vals.append(len({tuple(w[i:i + 2]) for i in range(len(w) - 1)}) / len(w) if w else 0.0)
    return sum(vals) / len(vals) if vals else 0.0


def loop_rate(texts: list[str]) -> float:
    return sum(loops(t) for t in texts) / len(texts) if texts else 0.0


def edit_rate(prompt: str, response: str) -> float:
    """Word-level Levenshtein distance / the longer length: 0 = verbatim copy of the prompt."""
    a, b = prompt.lower().split(), response.lower().split()
    if not a and not b:
        return 0.0
    prev = list(range(len(b) + 1))
    for i, wa in enumerate(a, 1):
        cur = [i]
        for j, wb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (wa != wb)))
        prev = cur
    return prev[-1] / max(len(a), len(b))


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a normal-approximation 95% confidence interval over prompts."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, float("nan")
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))
    return m, 1.96 * sd / math.sqrt(n)


def per_prompt_means(values: list[float], n_prompts: int) -> list[float]:
    """Generations come as whole passes over the prompts; average each prompt's passes."""
    passes = len(values) // n_prompts
    return [sum(values[j * n_prompts + i] for j in range(passes)) / passes for i in range(n_prompts)]
