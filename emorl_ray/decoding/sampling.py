"""Temperature, top-k and top-p as one function of the logits.

`warp_logits` is the sampling distribution (as logits; dropped tokens at -inf). The decode engine
draws every sampled token from it (`choose_token`), for the ensemble and the k-SCST rollouts
alike, and the k-SCST loss takes log-probabilities under it: the policy gradient is then on-policy
for any temperature, top-k or top-p (the authors sampled with top-k 50 and scored the full softmax).
"""

from __future__ import annotations

import math

import torch


def warp_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits / temperature, then keep the top_k largest (0 = all), then the smallest set of the
    most likely tokens whose probability reaches top_p (1.0 = all). Works on any leading shape and
    keeps the gradient (masking only)."""
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p: the most likely one is
        # always kept.
        drop = probs.cumsum(-1) - probs > top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), -math.inf)
    return logits


def choose_token(logits: torch.Tensor, greedy: bool, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Argmax, or one draw from `warp_logits`. `generator` must live on the logits' device."""
    if greedy:
        return logits.argmax(-1)
    probs = warp_logits(logits.float(), temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def device_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A seeded generator on `device` (torch.multinomial needs one on the tensor's device)."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(int(seed))


def token_logprobs_under(logits: torch.Tensor, tokens: torch.Tensor, greedy: bool, temperature: float = 1.0,
                         top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """log p(token) under the distribution `choose_token` drew it from (greedy: the plain softmax)."""
    warped = logits.float() if greedy else warp_logits(logits.float(), temperature, top_k, top_p)
    return warped.log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
