"""What the tests, the smoke runs and the quick benchmarks need and users do not: tiny random models
(no hub access), cheap deterministic scorers, and the fault injections of the fault-tolerance tests.

It lives in the package, not in tests/, because Ray workers must import it: toy scorers are named
in configs (`{type: python, function: emorl_ray.testing:word_overlap}`) and the fault hooks run
inside training workers (`training.launch.fit(..., hooks=[...])`). So torch and transformers are
imported where a model is built, not here: a toy scorer's Serve replica would pay seconds for them.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# Tiny random models
# ---------------------------------------------------------------------------------------------


def _tiny_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>", "<s>"], vocab_size=512)
    tk.train_from_iterator(texts, trainer)
    from tokenizers import decoders

    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", bos_token="<s>")


def build_tiny_model(path: str | os.PathLike, kind: str = "causal", seed: int = 0) -> str:
    """Write a tiny randomly initialised model (+ word-level tokenizer) to `path` and return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    from emorl_ray.data import read_demo

    path = Path(path)
    tok = _tiny_tokenizer([r["prompt"] for r in read_demo()])
    torch.manual_seed(seed)
    if kind == "causal":
        conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                           bos_token_id=tok.bos_token_id, tie_word_embeddings=True,
                           initializer_range=0.2)
        model = LlamaForCausalLM(conf)
    else:
        conf = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                        decoder_start_token_id=tok.pad_token_id, pad_token_id=tok.pad_token_id,
                        eos_token_id=tok.eos_token_id, tie_word_embeddings=True, initializer_factor=10.0)
        model = T5ForConditionalGeneration(conf)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


# Architectures of real models, for random-weight stand-ins of the same size: throughput and
# memory do not depend on the weight values, and a GPU node without the hub or the embedded
# weights can still build them (bench/random_model.py).
MODEL_SHAPES = {
    "small": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
                  num_key_value_heads=2, vocab_size=8192, tie_word_embeddings=True),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    # sentence-transformers/all-MiniLM-L6-v2, the embedded scorers' encoder (a BERT)
    "minilm-l6": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                      vocab_size=30522),
}


def build_random_model(path: str | os.PathLike, shape: str, tokenizer: str | os.PathLike,
                       dtype: str = "float32", seed: int = 0) -> str:
    """Write a randomly initialised model of `shape` (MODEL_SHAPES) to `path`, with the tokenizer
    saved in the directory `tokenizer` (the real model's: prompts, chat template and special tokens
    as the real model sees them), and return `path`. LLaMA shapes become causal LMs, minilm-l6 a
    BERT encoder."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    if shape not in MODEL_SHAPES:
        raise ValueError(f"shape must be one of {sorted(MODEL_SHAPES)}, got {shape!r}")
    tok = AutoTokenizer.from_pretrained(tokenizer, trust_remote_code=False)
    dims = MODEL_SHAPES[shape]
    if len(tok) > dims["vocab_size"]:
        raise ValueError(f"the tokenizer in {tokenizer} has {len(tok)} tokens, more than {shape}'s "
                         f"{dims['vocab_size']}: give the tokenizer of the model this shape is taken from")
    torch.manual_seed(seed)
    if shape == "minilm-l6":
        model = BertModel(BertConfig(**dims, pad_token_id=tok.pad_token_id))
    else:
        eos = tok.eos_token_id
        model = LlamaForCausalLM(LlamaConfig(**dims, max_position_embeddings=8192, bos_token_id=tok.bos_token_id,
                                             eos_token_id=eos, pad_token_id=tok.pad_token_id or eos))
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Toy scorers: python scorers, (prompts, responses) -> scores in [0, 1]
# ---------------------------------------------------------------------------------------------


def word_overlap(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of the response's words that occur in the prompt (a crude reflection proxy)."""
    out = []
    for p, r in zip(prompts, responses):
        pw, rw = set(p.lower().split()), r.lower().split()
        out.append(sum(w in pw for w in rw) / len(rw) if rw else 0.0)
    return out


def slow_word_overlap(prompts: list[str], responses: list[str]) -> list[float]:
    """`word_overlap` taking 1.5 s a call: long enough to lose a scorer replica mid-call in tests."""
    time.sleep(1.5)
    return word_overlap(prompts, responses)


def brevity(prompts: list[str], responses: list[str], target: int = 4) -> list[float]:
    """1 for responses of `target` words, falling linearly to 0 at 4x the target."""
    return [max(0.0, 1.0 - abs(len(r.split()) - target) / (3 * target)) for r in responses]


def token_rate(token: str):
    """A scorer rewarding the share of words equal to `token` (learnable in a few RL steps)."""
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        return [sum(w == token for w in r.split()) / max(1, len(r.split())) for r in responses]
    return score


def vowel_start(prompts: list[str], responses: list[str]) -> list[float]:
    """Share of words starting with a vowel: about 1/4 for random text, so RL has signal at once."""
    return [sum(w[0] in "aeiouAEIOU" for w in r.split()) / len(r.split()) if r.split() else 0.0
            for r in responses]


# ---------------------------------------------------------------------------------------------
# Fault injection: hooks the training workers call before every step (training/loop.py)
# ---------------------------------------------------------------------------------------------


def kill_serve_replicas(apps: list[str]) -> None:
    """Kill every replica of the Serve applications `apps`; Serve's controller starts new ones."""
    import ray

    from emorl_ray.rewards.serve import serve_replicas

    for app in apps:
        for name in serve_replicas(app):
            ray.kill(ray.get_actor(name, namespace="serve"))


def _first_time(marker: str) -> bool:
    """True once per marker file: a restarted worker must not inject the same fault again."""
    if os.path.exists(marker):
        return False
    Path(marker).touch()
    return True


@dataclass
class FailOnce:
    """Raise at `step`, once, after the checkpoints of the earlier steps; with `corrupt_checkpoints_in`
    (a run's Ray Train storage) first truncate the newest checkpoint's largest weights file."""
    step: int
    marker: str
    corrupt_checkpoints_in: str | None = None

    def before_step(self, step: int, objectives: list[str]) -> None:
        if step != self.step or not _first_time(self.marker):
            return
        if self.corrupt_checkpoints_in:
            newest = max(Path(self.corrupt_checkpoints_in).glob("checkpoint_*"))
            target = max(newest.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        raise RuntimeError(f"injected failure at step {step}")


@dataclass
class WaitAt:
    """Hold the worker once it has done `step` steps, until the file `release` exists (at most
    `timeout_s`): the run stays alive, mid-training, for as long as a test needs to look at it."""
    step: int
    release: str
    timeout_s: float = 300.0

    def before_step(self, step: int, objectives: list[str]) -> None:
        if step != self.step:
            return
        deadline = time.monotonic() + self.timeout_s
        while not os.path.exists(self.release):
            if time.monotonic() > deadline:
                raise TimeoutError(f"WaitAt: {self.release} did not appear within {self.timeout_s} s")
            time.sleep(0.1)


@dataclass
class KillScorersOnce:
    """Kill the run's scorer replicas at `step`, once (Serve replaces them)."""
    step: int
    marker: str

    def before_step(self, step: int, objectives: list[str]) -> None:
        from emorl_ray.rewards.serve import app_name

        if step == self.step and _first_time(self.marker):
            kill_serve_replicas([app_name(o) for o in objectives])
