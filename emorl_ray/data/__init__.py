"""Prompts for training, search and evaluation: loading, cleaning and the train/val/test split.

EMORL's rewards are reference-free, so a prompt is enough; a reference response is kept when the
source has one (for reports only). Every dropped row is counted and logged, never silently lost.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import datasets

from emorl_ray.config import ConfigError, DataConfig

log = logging.getLogger(__name__)

PAIR_COLUMNS = ["prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5", "topic"]


@dataclass
class Splits:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    dropped: dict = field(default_factory=dict)  # reason -> count

    def sizes(self) -> dict:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def summary(self) -> dict:
        """Sizes, drop counts and a content hash per split, written next to every run."""
        def digest(rows):
            return hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest()[:16]
        return {"sizes": self.sizes(), "dropped": dict(self.dropped),
                "sha256_16": {k: digest(getattr(self, k)) for k in ("train", "val", "test")}}


# ---------------------------------------------------------------------------------------------
# Readers: each returns a list of {"prompt": str, "response": str | None} rows, uncleaned.
# ---------------------------------------------------------------------------------------------


def read_demo() -> list[dict]:
    text = resources.files("emorl_ray.data").joinpath("client_statements.txt").read_text(encoding="utf-8")
    rows = []
    for line in text.splitlines():
        if line.strip() and not line.startswith("#"):
            topic, _, prompt = line.partition("|")
            rows.append({"prompt": prompt, "response": None, "topic": topic})
    return rows


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower().lstrip(".")
    if suffix in ("csv", "tsv"):
        return "csv"
    if suffix in ("json", "jsonl", "parquet"):
        return suffix
    raise ConfigError("data.format", f"cannot tell the format of {path.name!r} from its suffix; "
                      "set data.format to csv, json, jsonl or parquet")


def read_file(cfg: DataConfig) -> list[dict]:
    """Any CSV/JSON/JSONL/parquet file, through `datasets`, with a column mapping."""
    path = Path(cfg.path)
    fmt = _format_of(path, cfg.format)
    builder = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}[fmt]
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets raises many types for unreadable files
        raise ConfigError("data.path", f"could not read {path} as {fmt}: {e}") from e
    for key, col in (("data.prompt_column", cfg.prompt_column), ("data.response_column", cfg.response_column)):
        if col is not None and col not in ds.column_names:
            raise ConfigError(key, f"column {col!r} not in {path.name}; columns are {ds.column_names}")
    prompts = ds[cfg.prompt_column]
    responses = ds[cfg.response_column] if cfg.response_column else [None] * len(prompts)
    return [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]


def read_pair(path: str) -> list[dict]:
    """The PAIR CSV (spec §1.2) in either published shape.

    DynaOpt's copy has 10 columns and no header; the authors' copy has 9 columns and a header row
    that their loader wrongly treats as data (spec §10.9). The header is recognised and skipped.
    Cells may hold quoted newlines, so this uses a real CSV parser.
    """
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    if not records:
        raise ConfigError("data.path", f"{path} is empty")
    if [c.strip().lower() for c in records[0][:2]] == ["prompt", "hq1"]:
        records = records[1:]
    rows = []
    for i, rec in enumerate(records):
        if len(rec) not in (9, 10):
            raise ConfigError("data.path", f"{path} row {i}: expected 9 or 10 PAIR columns "
                              f"(prompt,hq1,hq2,mq1,lq1..lq5[,topic]), got {len(rec)}")
        named = dict(zip(PAIR_COLUMNS, rec))
        rows.append({"prompt": named["prompt"], "response": named["hq1"], "topic": named.get("topic")})
    return rows


def read_psych8k(path: str) -> list[dict]:
    """Psych8k: a JSON array of objects; only `input` (prompt) and `output` (response) are used."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError("data.path", f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise ConfigError("data.path", f"{path}: expected a JSON array of {{input, output}} objects")
    return [{"prompt": d.get("input"), "response": d.get("output")} if isinstance(d, dict)
            else {"prompt": None, "response": None} for d in data]


# ---------------------------------------------------------------------------------------------
# Cleaning and splitting.
# ---------------------------------------------------------------------------------------------


def clean(rows: list[dict], max_chars: int) -> tuple[list[dict], dict]:
    kept, dropped = [], {"non_text": 0, "empty": 0, "too_long": 0, "duplicate": 0}
    seen = set()
    for r in rows:
        p = r.get("prompt")
        if not isinstance(p, str):
            dropped["non_text"] += 1
            continue
        p = " ".join(p.split())
        if not p:
            dropped["empty"] += 1
        elif len(p) > max_chars:
            dropped["too_long"] += 1
        elif p in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(p)
            resp = r.get("response")
            kept.append({"prompt": p, "response": resp if isinstance(resp, str) else None})
    return kept, {k: v for k, v in dropped.items() if v}


def split(rows: list[dict], cfg: DataConfig) -> Splits:
    s = cfg.split
    order = list(range(len(rows)))
    if s.shuffle:
        import random

        random.Random(s.seed).shuffle(order)
    n = len(rows)
    n_train = int(n * s.train)
    n_val = int(n * s.val)
    parts = [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]]
    train, val, test = ([rows[i] for i in idx] for idx in parts)
    if cfg.max_val is not None:
        val = val[:cfg.max_val]
    if cfg.max_test is not None:
        test = test[:cfg.max_test]
    for name, part in (("train", train), ("val", val), ("test", test)):
        if not part:
            raise ConfigError("data.split", f"the {name} split is empty ({n} usable rows); "
                              "use more data or larger split fractions")
    return Splits(train, val, test)


def load_splits(cfg: DataConfig) -> Splits:
    if cfg.source == "demo":
        raw = read_demo()
    elif cfg.source == "pair":
        raw = read_pair(cfg.path)
    elif cfg.source == "psych8k":
        raw = read_psych8k(cfg.path)
    else:
        raw = read_file(cfg)
    rows, dropped = clean(raw, cfg.max_prompt_chars)
    if cfg.limit is not None:
        if len(rows) > cfg.limit:
            dropped["over_limit"] = len(rows) - cfg.limit
        rows = rows[:cfg.limit]
    splits = split(rows, cfg)
    splits.dropped = dropped
    log.info("data source=%s: %d rows read, dropped %s, split sizes %s",
             cfg.source, len(raw), dropped or "nothing", splits.sizes())
    return splits
