"""The objectives section: each objective's scorer (emorl_ray/rewards/)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from emorl_ray import storage
from emorl_ray.config.checks import check, check_model_ref, check_positive, check_resources, model_exists


@dataclass
class ScorerConfig:
    type: Literal["embedding_similarity", "emotion_match", "empathy_lexicon", "perplexity", "hf_classifier",
                  "cross_encoder", "python"] = "python"
    # embedding_similarity, emotion_match: a sentence encoder (HF id, local dir or pip:<distribution>).
    # perplexity: a causal LM; "policy" reuses the policy's base model.
    # hf_classifier / cross_encoder: a sequence-classification model directory or hub id.
    model: Optional[str] = None
    # hf_classifier: what it reads (cross_encoder: always the pair) and how its logits become a score.
    input: Literal["pair", "response"] = "pair"
    output: Literal["sigmoid", "softmax", "regression"] = "sigmoid"
    label: int = 1  # softmax: the class whose probability is the score
    # perplexity: what is scored and the cap C of the mapping (C - PPL) / C.
    mode: Literal["pair", "response_conditional", "response_only"] = "response_conditional"
    cap: float = 50.0
    # perplexity, response_conditional: memory for the prompts' kept passes through the LM
    # (rewards/fluency.py); 0 = run the prompt again for every response.
    context_cache_mb: float = 256
    # python: "package.module:function" taking (prompts, responses) -> list[float] in [0, 1].
    function: Optional[str] = None
    # Multiply the score by the share of the response's word bigrams that are distinct (1 for text
    # that never repeats itself), and score a loop (a repeated word 3-gram: "you feel sad, you feel
    # sad") 0. Keyword counts and perplexity both reward loops; RL finds them within a few steps.
    penalize_repetition: bool = False
    # cross_encoder: when `model` holds no model yet, train the PAIR-style scorer on `data.path`
    # (source: pair) as the job's first step, as jobs/train_scorer.py does by hand, and write it to
    # `model` (a path or URI every node can read) or, unset, to <run directory>/scorers/<objective>.
    train_if_missing: bool = False
    train_epochs: int = 3
    batch_size: int = 16
    num_replicas: int = 1
    num_cpus: float = 0.1
    num_gpus: float = 0.0
    resources: dict = field(default_factory=dict)  # custom Ray resources per replica (placement)

    def validate(self, path: str, data_source: str) -> None:
        if self.type in ("embedding_similarity", "emotion_match"):
            check(self.model is not None, f"{path}.model", f"{self.type} needs a sentence encoder model")
            check_model_ref(self.model, f"{path}.model")
        if self.type == "perplexity":
            check(self.model is not None, f"{path}.model",
                  "perplexity needs a causal LM ('policy' reuses the policy model)")
            if self.model != "policy":
                check_model_ref(self.model, f"{path}.model")
            check(self.cap > 0, f"{path}.cap", "must be > 0")
        if self.train_if_missing:
            check(self.type == "cross_encoder", f"{path}.train_if_missing",
                  "only a cross_encoder scorer is trained by the job")
            check(data_source == "pair", f"{path}.train_if_missing",
                  "the scorer trains on PAIR's graded responses: it needs `data.source: pair` and `data.path`")
            check(self.train_epochs >= 1, f"{path}.train_epochs", "must be >= 1")
        if self.type in ("hf_classifier", "cross_encoder"):
            self._validate_classifier(path)
        if self.type == "python":
            check(self.function is not None and ":" in self.function, f"{path}.function",
                  "python scorers need `function: package.module:callable`")
        check_positive(self, path, ("batch_size", "num_replicas"))
        check_positive(self, path, ("num_cpus", "num_gpus", "context_cache_mb"), minimum=0)
        check_resources(self.resources, f"{path}.resources")

    def _validate_classifier(self, path: str) -> None:
        check(self.model is not None or self.train_if_missing, f"{path}.model",
              f"{self.type} needs a sequence-classification model (or `train_if_missing: true` with PAIR data)")
        if self.train_if_missing and self.model is not None:
            check(storage.is_uri(self.model) or self.model.startswith(("/", ".", "~")), f"{path}.model",
                  "with train_if_missing, `model` is where the trained scorer goes: a path or a URI")
        if self.model is not None and not (self.train_if_missing and not model_exists(self.model)):
            check_model_ref(self.model, f"{path}.model")
        check(self.type == "hf_classifier" or self.input == "pair", f"{path}.input",
              "a cross_encoder reads (prompt, response) pairs; use hf_classifier for response-only models")
        check(self.label >= 0, f"{path}.label", "must be >= 0")


@dataclass
class ObjectiveConfig:
    scorer: Optional[ScorerConfig] = None
