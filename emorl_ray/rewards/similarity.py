"""Reflection proxy: semantic similarity between the client statement and the response.

Mean-pooled sentence embeddings (all-MiniLM-L6-v2 by default), cosine clipped to [0, 1]. It rewards
responses that talk about what the client talked about, which is what a reflection does; it also
rewards copying the statement verbatim, so always read it next to the edit rate (docs/method.md §8.30).
"""

from __future__ import annotations

import torch
from transformers import AutoModel, AutoTokenizer

from emorl_ray.models import resolve


class EmbeddingSimilarity:
    def __init__(self, model_ref: str, batch_size: int = 32, max_length: int = 256, device: str = "cpu"):
        path = resolve(model_ref)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.model = AutoModel.from_pretrained(path, trust_remote_code=False).to(device).eval()
        self.batch_size, self.device = batch_size, device
        self.max_length = max_length

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        # Each distinct text once: a k-SCST batch repeats every prompt k times.
        unique = list(dict.fromkeys(texts))
        out = []
        for i in range(0, len(unique), self.batch_size):
            enc = self.tokenizer(unique[i:i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            out.append(torch.nn.functional.normalize(pooled.float(), dim=-1).cpu())
        row = {t: i for i, t in enumerate(unique)}
        return torch.cat(out)[[row[t] for t in texts]]

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if not prompts:
            return []
        a = self.embed(list(prompts))
        b = self.embed([r if r.strip() else " " for r in responses])
        cos = (a * b).sum(-1)
        scores = cos.clamp(0.0, 1.0)
        # An empty response restates nothing.
        return [0.0 if not r.strip() else float(s) for r, s in zip(responses, scores)]
