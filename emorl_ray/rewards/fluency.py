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
"""

from __future__ import annotations

import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from emorl_ray.config import ModelConfig
from emorl_ray.models import DTYPES, format_prompt, resolve, uses_chat_template


class PerplexityFluency:
    def __init__(self, model_ref: str, policy: ModelConfig, mode: str = "response_conditional",
                 cap: float = 50.0, batch_size: int = 16, max_length: int = 256):
        if model_ref == "policy":
            path, dtype = resolve(policy.id, policy.gguf_file, policy.cache_dir), DTYPES[policy.dtype]
        else:
            path, dtype = resolve(model_ref), torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False).eval()
        if self.model.config.is_encoder_decoder:
            raise ValueError(f"perplexity scorer needs a causal LM, {model_ref!r} is encoder-decoder")
        self.mode, self.cap, self.batch_size, self.max_length = mode, cap, batch_size, max_length
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
            seqs, labels = [], []
            for ctx, tgt in rows:
                ids = (ctx + tgt)[-self.max_length:]
                n_tgt = min(len(tgt), len(ids))
                seqs.append(ids)
                labels.append([-100] * (len(ids) - n_tgt) + ids[len(ids) - n_tgt:])
            width = max(len(s) for s in seqs)
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
            input_ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            lab = torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])
            logits = self.model(input_ids=input_ids, attention_mask=attn).logits[:, :-1].float()
            lab = lab[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), lab.clamp(min=0), reduction="none")
            mask = (lab != -100).float()
            n = mask.sum(1)
            mean_nll = (nll * mask).sum(1) / n.clamp(min=1)
            out.extend(math.exp(min(float(m), 50.0)) if k > 0 else math.inf for m, k in zip(mean_nll, n))
        return out

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        ppl = self.perplexities(list(prompts), list(responses))
        return [0.0 if not r.strip() or not math.isfinite(p) else min(1.0, max(0.0, (self.cap - p) / self.cap))
                for r, p in zip(responses, ppl)]
