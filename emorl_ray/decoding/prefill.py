"""Prompt passes kept and reused.

A search decodes the same validation prompts with the same adapters trial after trial, and only
the weights change; the fluency scorer reads the same prompt before every response to it. A
decoder-only model's pass over a prompt (its keys and values at every layer, and the LM head's
input at the last position) depends on the prompt alone, so it can be computed once, kept, and
every later forward starts after it. On the embedded default the prompt pass was about 60 % of a
search trial's decode and most of the fluency scorer's work.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable

import torch


def positions(attn: torch.Tensor) -> torch.Tensor:
    """Position ids from the attention mask, so left padding changes nothing."""
    return (attn.cumsum(1) - 1).clamp(min=0)


@dataclass
class Prefilled:
    """A pass over left-padded prompts: per layer (rows, kv heads, prompt length, head dim) keys
    and values, and the LM head's input (rows, d) at the last prompt position."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    last_hidden: torch.Tensor

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values, self.last_hidden))

    @staticmethod
    def cat(blocks: list[Prefilled]) -> Prefilled:
        """Blocks passed apart over the same prompts, as one block-major batch."""
        if len(blocks) == 1:
            return blocks[0]
        return Prefilled([torch.cat(ks) for ks in zip(*(b.keys for b in blocks))],
                         [torch.cat(vs) for vs in zip(*(b.values for b in blocks))],
                         torch.cat([b.last_hidden for b in blocks]))

    def repeat_interleave(self, k: int) -> Prefilled:
        """Each row k times in a row: one pass per prompt for k samples of it."""
        def rep(ts: list[torch.Tensor]) -> list[torch.Tensor]:
            return [t.repeat_interleave(k, dim=0) for t in ts]

        return Prefilled(rep(self.keys), rep(self.values), self.last_hidden.repeat_interleave(k, dim=0))

    def select(self, index: torch.Tensor) -> Prefilled:
        """The rows `index` names, in its order (a row may appear more than once)."""
        return Prefilled([k.index_select(0, index) for k in self.keys], [v.index_select(0, index) for v in self.values],
                         self.last_hidden.index_select(0, index))

    def row(self, i: int, length: int) -> Prefilled:
        """Row i alone, its `length` real positions without the left padding (copied, so the
        batch's tensors can be freed)."""
        return Prefilled([k[i:i + 1, :, -length:].clone() for k in self.keys],
                         [v[i:i + 1, :, -length:].clone() for v in self.values], self.last_hidden[i:i + 1].clone())

    @staticmethod
    def left_padded(rows: list[Prefilled]) -> tuple[Prefilled, torch.Tensor]:
        """Single-prompt passes of different lengths as one batch, padded on the left with zeros,
        and its attention mask."""
        width = max(r.keys[0].shape[-2] for r in rows)
        lengths = [r.keys[0].shape[-2] for r in rows]

        def pad(ts: list[torch.Tensor]) -> torch.Tensor:
            out = ts[0].new_zeros((len(ts), *ts[0].shape[1:-2], width, ts[0].shape[-1]))
            for b, t in enumerate(ts):
                out[b, ..., width - t.shape[-2]:, :] = t[0]
            return out

        keys = [pad([r.keys[layer] for r in rows]) for layer in range(len(rows[0].keys))]
        values = [pad([r.values[layer] for r in rows]) for layer in range(len(rows[0].values))]
        mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=keys[0].device)
        return Prefilled(keys, values, torch.cat([r.last_hidden for r in rows])), mask

    def cache(self, config):
        """A fresh DynamicCache holding these keys and values; a forward appends to new tensors, so
        this object stays as it was."""
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=list(zip(self.keys, self.values)), config=config)


def can_prefill_apart(model) -> bool:
    """Whether a kept pass rebuilds the model's cache exactly: a decoder-only model whose every
    cache layer keeps the whole prefix (no sliding window)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if getattr(model.config, "is_encoder_decoder", False):
        return False
    layers = DynamicCache(config=model.config).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


class PrefillCache:
    """Passes by key (what was passed through what), the least recently used dropped past
    `max_bytes`. Valid only while the weights behind a key do not change: the owner keys or
    clears accordingly."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self.entries: OrderedDict[Hashable, Prefilled] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> Prefilled | None:
        hit = self.entries.get(key)
        if hit is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return hit

    def put(self, key: Hashable, value: Prefilled) -> None:
        if value.nbytes > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self.entries.pop(key).nbytes
        self.entries[key] = value
        self.bytes += value.nbytes
        while self.bytes > self.max_bytes:
            self.bytes -= self.entries.popitem(last=False)[1].nbytes
