"""Learned scorers: any `AutoModelForSequenceClassification` on (prompt, response) or the response
alone. `cross_encoder` is the (prompt, response) case, e.g. the PAIR-style reflection scorer that
`jobs/train_scorer.py` trains; `hf_classifier` also covers response-only models such as the
authors' empathy classifier.

Weights are loaded strictly: a checkpoint whose keys do not match the architecture fails loudly
(the authors loaded their reflection scorer with strict=False, docs/method.md §8.13).
"""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emorl_ray.models import resolve
from emorl_ray.rewards import ScorerError


class HFClassifier:
    def __init__(self, model_ref: str, input: str = "pair", output: str = "sigmoid", label: int = 1,
                 batch_size: int = 16, max_length: int = 256, device: str = "cpu"):
        path = resolve(model_ref)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=False, output_loading_info=True)
        missing = info.get("missing_keys") or []
        unexpected = info.get("unexpected_keys") or []
        mismatched = info.get("mismatched_keys") or []
        if missing or unexpected or mismatched:
            raise ScorerError(f"classifier {model_ref!r} does not match its architecture: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}, "
                              f"mismatched {list(mismatched)[:5]}; it needs a trained classification head")
        n = model.config.num_labels
        if output in ("sigmoid", "regression") and n != 1:
            raise ScorerError(f"classifier {model_ref!r} has {n} outputs; output={output!r} needs exactly 1 "
                              "(use output: softmax with a label for multi-class heads)")
        if output == "softmax" and not 0 <= label < n:
            raise ScorerError(f"classifier {model_ref!r} has {n} classes; label {label} does not exist")
        self.model = model.to(device).eval()
        self.input, self.output, self.label = input, output, label
        self.batch_size, self.max_length, self.device = batch_size, max_length, device

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        out = []
        for i in range(0, len(responses), self.batch_size):
            resp = list(responses[i:i + self.batch_size])
            args = (list(prompts[i:i + self.batch_size]), resp) if self.input == "pair" else (resp,)
            enc = self.tokenizer(*args, padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            logits = self.model(**enc).logits.float()
            if self.output == "sigmoid":
                s = logits[:, 0].sigmoid()
            elif self.output == "softmax":
                s = logits.softmax(-1)[:, self.label]
            else:  # a regression head: clamped to [0, 1], as the authors did for empathy (docs/method.md §8.14)
                s = logits[:, 0].clamp(0.0, 1.0)
            out.extend(s.tolist())
        return out
