"""EMORL's stage 2: one base model and K LoRA adapters decoding as one (docs/method.md §3).

The aggregation decides what is combined; search and evaluation treat all three alike:
- "hidden_state" (EMORL): h = sum_i w_i h_i with w normalised to sum 1, then the shared LM head;
- "logit": each adapter's next-token distribution on the SAME shared prefix, mixed as
  p = sum_i (w_i / sum w) p_i (a proper ensemble; the authors mixed independently sampled paths);
- "parameter": one merged adapter with delta W = sum_i w_i B_i A_i exactly (peft's "cat"
  combination, not averaged A and B factors), then plain decoding.

The first two run every adapter in the same batched forward (`StackedLoRA`, or peft's
mixed-adapter batches for what the stack does not cover) through `decoding.engine.decode`, which
owns the loop, the KV cache, the finished mask and the sampler.

An adapter's pass over a prompt does not depend on the weights, and a search decodes the same
validation prompts trial after trial: with `prefill_cache_mb` each adapter's pass over each prompt
batch is computed once and kept (`decoding.prefill`).
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Sequence

import torch

from emorl_ray import storage
from emorl_ray.config import AGGREGATIONS, ConfigError
from emorl_ray.decoding.engine import Sampling, decode, prefill
from emorl_ray.decoding.prefill import PrefillCache, Prefilled, can_prefill_apart
from emorl_ray.decoding.sampling import device_generator
from emorl_ray.ensemble.stacked_lora import StackedLoRA
from emorl_ray.ensemble.weights import check_weights, row_weights, weights_used
from emorl_ray.models import Policy

BASE = "__base__"  # no adapter: the base model
MERGED = "__merged__"


class AdapterEnsemble:
    def __init__(self, policy: Policy, adapters: Mapping[str, str], prefill_cache_mb: float = 0):
        """`prefill_cache_mb`: memory for kept prompt passes (0: none; for a server whose prompts
        rarely repeat). Decoder-only models without sliding-window layers only."""
        from peft import PeftModel

        if not adapters:
            raise ValueError("the ensemble needs at least one adapter directory")
        for name, path in adapters.items():
            if not storage.is_file(storage.join(path, "adapter_config.json")):
                raise ValueError(f"adapter {name!r}: {path} holds no adapter_config.json; give a directory "
                                 "written by PeftModel.save_pretrained (a run's training/<run>/adapter)")
        # A run on object storage: this node reads a local copy (fetched once, cached by content).
        adapters = {name: storage.local_dir(path) for name, path in adapters.items()}
        self.names = list(adapters)
        model = PeftModel.from_pretrained(policy.model, adapters[self.names[0]], adapter_name=self.names[0])
        for name in self.names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
        self.model = model.eval()
        self.policy = policy
        if getattr(policy, "decode_step", "eager") != "eager" and not StackedLoRA.supported(model, self.names):
            raise ConfigError("model.decode_step", f"{policy.decode_step!r} needs LoRA adapters on Linear layers "
                              "only (no DoRA, no embedding adapters); these need peft's mixed batches: use 'eager'")
        self._stacks: dict[tuple[str, ...], StackedLoRA | None] = {}
        self.prefills = PrefillCache(int(prefill_cache_mb * 2**20)) \
            if prefill_cache_mb > 0 and can_prefill_apart(model) else None

    def check_weights(self, weights: Mapping[str, float] | Sequence[float]) -> list[float]:
        return check_weights(weights, self.names)

    def weights_used(self, weights: Mapping[str, float] | Sequence[float],
                     aggregation: str = "hidden_state") -> dict[str, float]:
        """The weights a decode applies (`ensemble.weights`)."""
        return weights_used(self.check_weights(weights), self.names, aggregation)

    def row_weights(self, weights, n: int) -> list[list[float]]:
        return row_weights(weights, n, self.names)

    @torch.no_grad()
    def generate(self, prompts: list[str], weights, max_new_tokens: int, batch_size: int = 16,
                 greedy: bool = True, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int | None = None, aggregation: str = "hidden_state", details: bool = False) -> list:
        """`weights`: one vector (by adapter name, or in adapter order) for every prompt, a list of
        one vector per prompt (rows with different weights decode in the same batched forward), or
        None for the base model (all adapters off), through the same loop. `details`: per prompt
        {"text", "tokens" (generated, EOS included), "finished" (EOS reached)} instead of the text."""
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        sampling = None if greedy else Sampling(temperature, top_k, top_p, device_generator(seed, self.policy.device))
        run = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, sampling=sampling, details=details)
        if weights is None:
            return self._decode(prompts, [BASE], None, "hidden_state", **run)
        rows = self.row_weights(weights, len(prompts))
        if aggregation == "parameter":
            return self._decode_merged(prompts, rows, **run)
        # An adapter with weight 0 in every row adds exactly nothing (to h or p): skip it.
        keep = [k for k, _ in enumerate(self.names) if any(w[k] > 0 for w in rows)]
        w = torch.tensor([[r[k] for k in keep] for r in rows], dtype=torch.float32)
        w = w / w.sum(1, keepdim=True)  # the weight convention (ensemble.weights)
        return self._decode(prompts, [self.names[k] for k in keep], w, aggregation, **run)

    def _decode_merged(self, prompts, rows, **run) -> list:
        """Parameter aggregation: one merged adapter per distinct weight vector (delta W depends
        on all of w), its prompts decoded together."""
        out: list = [None] * len(prompts)
        groups: dict[tuple, list[int]] = {}
        for i, w in enumerate(rows):
            groups.setdefault(tuple(w), []).append(i)
        for w, idx in groups.items():
            active = [(n, x) for n, x in zip(self.names, w) if x > 0]
            self.model.add_weighted_adapter([n for n, _ in active], [x for _, x in active], MERGED,
                                            combination_type="cat")
            try:
                texts = self._decode([prompts[i] for i in idx], [MERGED], None, "hidden_state", **run)
            finally:
                self.model.delete_adapter(MERGED)
            for i, t in zip(idx, texts):
                out[i] = t
        return out

    def _prefill(self, name: str, chunk: list[str], enc: dict) -> Prefilled:
        """Adapter `name`'s pass over the prompt batch `chunk`, kept for the next decode of it.
        Always one adapter per pass, so a decode's numbers do not depend on what was kept before."""
        key = (name, tuple(chunk))
        pre = self.prefills.get(key)
        if pre is None:
            routing, kw = self._routing([name], len(chunk))
            with routing:
                pre = prefill(self.model, enc, kw)
            self.prefills.put(key, pre)
        return pre

    def _routing(self, names: list[str], rows: int):
        """How the blocks of `names` (`rows` prompts each) share one forward: a context to enter
        around the decode, and extra forward arguments. Stacked LoRA products are kept per set of
        adapters (the weights never change after loading), except the merged adapter's, which
        changes on every call."""
        if names == [BASE]:
            return self.model.disable_adapter(), {}
        key = tuple(names)
        stack = self._stacks.get(key)
        if key not in self._stacks:
            stack = StackedLoRA(self.model, names) if StackedLoRA.supported(self.model, names) else None
            if MERGED not in names:
                self._stacks[key] = stack
        if stack is not None:
            return stack, {}
        # peft's mixed batches name each row's adapter
        return contextlib.nullcontext(), {"adapter_names": [n for n in names for _ in range(rows)]}

    def _decode(self, prompts, names, w, aggregation, *, max_new_tokens, batch_size, sampling, details) -> list:
        """`w`: (len(prompts), len(names)) normalised weights, or None for one block (base or merged)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            enc = self.policy.encode(chunk)
            pre = None
            if self.prefills is not None and MERGED not in names:
                pre = Prefilled.cat([self._prefill(name, chunk, enc) for name in names])
            routing, kw = self._routing(names, len(chunk))
            with routing:
                res = decode(self.policy, self.model, chunk, max_new_tokens, sampling=sampling,
                             weights=None if w is None else w[i:i + batch_size], aggregation=aggregation,
                             forward_kwargs=kw, enc=enc, prefilled=pre)
            texts = self.policy.decode(res.ids)
            if not details:
                out.extend(texts)
                continue
            out.extend({"text": t, "tokens": int(n), "finished": bool(e)}
                       for t, n, e in zip(texts, res.mask.sum(1).tolist(), res.ended.tolist()))
        return out
