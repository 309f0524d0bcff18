"""Request fields both HTTP shapes share, the ensemble's own `/generate` (http.py) and the
OpenAI-shaped `/v1` routes (openai_api.py): validated once here, each error naming its field.
Each caller turns a `FieldError` into its own error shape and status."""

from __future__ import annotations

import math

from emorl_ray.ensemble.weights import WeightError, check_weights


class FieldError(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field, self.message = field, message


def number(body: dict, key: str, default, kind, lo, hi):
    """body[key] (or `default`) as `kind` (bool, int or float) within [lo, hi]."""
    v = body.get(key, default)
    if kind is bool:
        if not isinstance(v, bool):
            raise FieldError(key, f"{key}: must be true or false")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise FieldError(key, f"{key}: must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not math.isfinite(v) or not lo <= v <= hi:
        raise FieldError(key, f"{key}: must be in [{lo}, {hi}], got {v!r}")
    return kind(v)


def weight_vector(w, names: list[str]) -> list[float]:
    """A request's `weights`, an object over `names` or a list in their order, by the ensemble's
    own rule (finite, >= 0, not all zero)."""
    if isinstance(w, dict):
        if set(w) != set(names):
            raise FieldError("weights", f"weights: give exactly the objectives {names}, got {sorted(w)}")
        w = [w[n] for n in names]
    if not isinstance(w, list) or len(w) != len(names):
        raise FieldError("weights", f"weights: a list of {len(names)} numbers or an object over {names}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w):
        raise FieldError("weights", "weights: every weight must be a number")
    try:
        return check_weights(w, names)
    except WeightError as e:
        raise FieldError("weights", str(e)) from None
