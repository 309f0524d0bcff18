"""Fluency: perplexity under a frozen causal LM, mapped to [0, 1] by (C - PPL) / C (docs/method.md §7).

Modes (docs/method.md §8.11):
- "pair": PPL of prompt + response, as the authors did; much of the signal is the prompt's.
- "response_conditional" (default): PPL of the response tokens given the prompt. With
  `model: policy` the prompt is given as the policy reads it (its chat template and system turn),
  so the score asks how natural the response is as the counselor's reply, not as more of the
  client's own text (which, given the bare prompt, a reply in the client's voice would be).
- "response_only": PPL of the response alone.
It measures how expected the text is to the LM, not whether it is good: bland, generic
responses score high. An empty response scores 0.

The context is the same for every response to a prompt (the k rollouts of a k-SCST step, every
validation, every search trial), so its pass through the frozen LM is kept (`decoding.prefill`)
and only the response is run; on the embedded default the context is about three quarters of the
tokens scored.
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from emorl_ray.config import ModelConfig
from emorl_ray.decoding.engine import prefill
from emorl_ray.decoding.prefill import PrefillCache, Prefilled, can_prefill_apart, positions
from emorl_ray.models import DTYPES, format_prompt, resolve, uses_chat_template


class PerplexityFluency:
    def __init__(self, model_ref: str, policy: ModelConfig, mode: str = "response_conditional",
                 cap: float = 50.0, batch_size: int = 16, max_length: int = 256, device: str = "cpu",
                 context_cache_mb: float = 0):
        if model_ref == "policy":
            path, dtype = resolve(policy.id, policy.gguf_file, policy.cache_dir), DTYPES[policy.dtype]
        else:
            path, dtype = resolve(model_ref), torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).to(device).eval()
        if self.model.config.is_encoder_decoder:
            raise ValueError(f"perplexity scorer needs a causal LM, {model_ref!r} is encoder-decoder")
        self.mode, self.cap, self.batch_size, self.max_length = mode, cap, batch_size, max_length
        self.device = device
        self.contexts = PrefillCache(int(context_cache_mb * 2**20)) \
            if context_cache_mb > 0 and can_prefill_apart(self.model) else None
        self.policy_format = (policy if model_ref == "policy" and mode == "response_conditional"
                              and uses_chat_template(self.tokenizer, policy) else None)

    def _segments(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        """Token ids of the context (not scored) and of the scored part."""
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        if self.mode == "pair":
            return bos, enc(prompt + " " + response)
        if self.mode == "response_only":
            return bos, enc(response)
        if self.policy_format is not None:  # the template carries its own begin-of-text tokens
            return enc(format_prompt(self.tokenizer, self.policy_format, prompt)), enc(response)
        return bos + enc(prompt), enc(" " + response)

    @torch.no_grad()
    def perplexities(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            rows = [self._segments(p, r) for p, r in zip(prompts[i:i + self.batch_size],
                                                         responses[i:i + self.batch_size])]
            kept = self.contexts is not None and all(len(c) >= 2 and len(c) + len(t) <= self.max_length
                                                     for c, t in rows)
            nll, n = self._nll_after_kept_contexts(rows) if kept else self._nll(rows)
            mean_nll = nll / n.clamp(min=1)
            out.extend(math.exp(min(float(m), 50.0)) if k > 0 else math.inf for m, k in zip(mean_nll, n))
        return out

    def _nll(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL of each row's scored tokens and their count, context and target in one pass
        (the last `max_length` tokens)."""
        seqs, labels = [], []
        for ctx, tgt in rows:
            ids = (ctx + tgt)[-self.max_length:]
            n_tgt = min(len(tgt), len(ids))
            seqs.append(ids)
            labels.append([-100] * (len(ids) - n_tgt) + ids[len(ids) - n_tgt:])
        input_ids, attn = self._right_padded(seqs)
        lab, _ = self._right_padded(labels, -100)
        logits = self.model(input_ids=input_ids, attention_mask=attn).logits[:, :-1]
        return self._summed_nll(logits, lab[:, 1:])

    def _nll_after_kept_contexts(self, rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `_nll`, with each context's pass but its last token kept: the forward reads that
        token and the target, so every scored token's logits still come from the model's own head."""
        pre, ctx_mask = Prefilled.left_padded(self._kept([tuple(c[:-1]) for c, _ in rows]))
        seqs = [[c[-1]] + t for c, t in rows]
        input_ids, new_mask = self._right_padded(seqs)
        lab, _ = self._right_padded([s[1:] for s in seqs], -100)  # what each position predicts
        attn = torch.cat([ctx_mask.to(self.device), new_mask], 1)
        pos = positions(attn)[:, -input_ids.shape[1]:]
        logits = self.model(input_ids=input_ids, attention_mask=attn, position_ids=pos,
                            past_key_values=pre.cache(self.model.config)).logits
        return self._summed_nll(logits[:, :-1], lab)

    def _kept(self, contexts: list[tuple[int, ...]]) -> list[Prefilled]:
        """Each context's pass from the cache, the missing ones computed in one left-padded batch."""
        missing = [c for c in dict.fromkeys(contexts) if self.contexts.get(c) is None]
        if missing:
            width = max(len(c) for c in missing)
            enc = {"input_ids": self._tensor([[self._pad] * (width - len(c)) + list(c) for c in missing]),
                   "attention_mask": self._tensor([[0] * (width - len(c)) + [1] * len(c) for c in missing])}
            batch = prefill(self.model, enc)
            for b, c in enumerate(missing):
                self.contexts.put(c, batch.row(b, len(c)))
        found = {c: self.contexts.entries.get(c) for c in set(contexts)}
        if any(v is None for v in found.values()):  # larger than the whole cache: pass them now
            return [self._pass_one(c) if found[c] is None else found[c] for c in contexts]
        return [found[c] for c in contexts]

    def _pass_one(self, context: tuple[int, ...]) -> Prefilled:
        return prefill(self.model, {"input_ids": self._tensor([list(context)]),
                                    "attention_mask": self._tensor([[1] * len(context)])})

    @staticmethod
    def _summed_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nll = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels.clamp(min=0), reduction="none")
        mask = (labels != -100).float()
        return (nll * mask).sum(1).cpu(), mask.sum(1).cpu()

    @property
    def _pad(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def _right_padded(self, rows: list[list[int]], pad: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows padded on the right to one width (with `pad`, default the pad token), and their mask."""
        width = max(len(r) for r in rows)
        fill = self._pad if pad is None else pad
        return (self._tensor([r + [fill] * (width - len(r)) for r in rows]),
                self._tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]))

    def _tensor(self, rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device=self.device)

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        ppl = self.perplexities(list(prompts), list(responses))
        return [0.0 if not r.strip() or not math.isfinite(p) else min(1.0, max(0.0, (self.cap - p) / self.cap))
                for r, p in zip(responses, ppl)]
