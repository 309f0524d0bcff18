"""The ensemble's weights: checked, one vector per prompt, and the one convention they decode under.

Hidden-state and logit aggregation decode with w / sum(w). The logits are linear in h, so
unnormalised weights would scale them: w = (1, 1, 1) would sample at an effective temperature of
1/3 (greedy decoding is unaffected). Parameter aggregation merges delta W = sum_i w_i B_i A_i,
which depends on the scale of w, so its weights are used as given. `weights_used` says what a
decode applied.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence


class WeightError(ValueError):
    pass


def check_weights(weights: Mapping[str, float] | Sequence[float], names: list[str]) -> list[float]:
    """Weights by adapter name (or in adapter order) -> a list; WeightError says what is wrong."""
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise WeightError(f"weights name unknown adapters {sorted(unknown)}; adapters are {names}")
        missing = set(names) - set(weights)
        if missing:
            raise WeightError(f"weights are missing for adapters {sorted(missing)}")
        w = [weights[n] for n in names]
    else:
        w = list(weights)
        if len(w) != len(names):
            raise WeightError(f"got {len(w)} weights for {len(names)} adapters {names}")
    try:
        w = [float(x) for x in w]
    except (TypeError, ValueError):
        raise WeightError(f"weights must be numbers, got {w!r}") from None
    if not all(math.isfinite(x) for x in w):
        raise WeightError(f"weights must be finite, got {w}")
    if any(x < 0 for x in w):
        raise WeightError(f"weights must be >= 0, got {w}")
    if sum(w) == 0:
        raise WeightError("weights are all zero: the combined hidden state would be 0 and every "
                          "token the same; give at least one adapter a positive weight")
    return w


def weights_used(w: Sequence[float], names: list[str], aggregation: str) -> dict[str, float]:
    if aggregation == "parameter":
        return dict(zip(names, (float(x) for x in w)))
    total = float(sum(w))
    return {n: float(x) / total for n, x in zip(names, w)}


def row_weights(weights, n: int, names: list[str]) -> list[list[float]]:
    """One checked weight vector per prompt, from one vector or a list of n of them."""
    per_row = (isinstance(weights, (list, tuple)) and len(weights) > 0
               and isinstance(weights[0], (Mapping, list, tuple)))
    if not per_row:
        return [check_weights(weights, names)] * n
    if len(weights) != n:
        raise WeightError(f"got {len(weights)} weight vectors for {n} prompts; give one per prompt")
    return [check_weights(x, names) for x in weights]
