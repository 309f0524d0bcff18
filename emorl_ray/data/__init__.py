"""Prompts for training, search and evaluation: loading, cleaning and the train/val/test split.

EMORL's rewards are reference-free, so a prompt is enough; a reference response is kept when the
source has one (for reports only). Every dropped row is counted and logged, never silently lost.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import datasets

from emorl_ray import storage
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


PAIR_LEVELS = {"hq1": 2, "hq2": 2, "mq1": 1, "lq1": 0, "lq2": 0, "lq3": 0, "lq4": 0, "lq5": 0}


def read_pair_table(path: str) -> tuple[list[dict], bool]:
    """The PAIR CSV (docs/method.md §1) in either published shape, as one dict of named columns per row,
    and whether the file starts with the authors' header row.

    DynaOpt's copy has 10 columns and no header; the authors' copy has 9 columns and a header row
    (which their loader wrongly treats as data, docs/method.md §8.9). Cells may hold quoted newlines, so
    this uses a real CSV parser.
    """
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.reader(f))
    if not records:
        raise ConfigError("data.path", f"{path} is empty")
    header = [c.strip().lower() for c in records[0][:2]] == ["prompt", "hq1"]
    rows = []
    for i, rec in enumerate(records[1:] if header else records):
        if len(rec) not in (9, 10):
            raise ConfigError("data.path", f"{path} row {i}: expected 9 or 10 PAIR columns "
                              f"(prompt,hq1,hq2,mq1,lq1..lq5[,topic]), got {len(rec)}")
        rows.append(dict(zip(PAIR_COLUMNS, rec)))
    return rows, header


def read_pair(path: str, faithful: bool = False, order_file: str | None = None, seed: int = 0) -> list[dict]:
    """One record per prompt; the reference response is a complex reflection.

    Default: hq1 as the reference, the header (if any) skipped. `faithful`: the authors' records
    (docs/method.md §1, §8.9): their file order (rebuilt from `order_file` for DynaOpt's copy), a
    reference drawn from {hq1, hq2} with a seeded RNG, and the header row as a bogus first record.
    """
    table, _ = read_pair_table(path)
    if not faithful:
        return [{"prompt": r["prompt"], "response": r["hq1"], "topic": r.get("topic")} for r in table]
    if "topic" in table[0]:  # DynaOpt's shape: reorder into the authors' file order
        if order_file is None:
            raise ConfigError("data.order_file", "the faithful PAIR split of DynaOpt's 10-column copy needs the "
                              "authors' row order: set data.order_file to emorl_order.csv")
        with open(order_file, newline="", encoding="utf-8") as f:
            order = sorted((int(r["emorl_row"]), int(r["row"])) for r in csv.DictReader(f))
        if sorted(row for _, row in order) != list(range(len(table))):
            raise ConfigError("data.order_file", f"{order_file} is not a permutation of the {len(table)} rows "
                              f"of {path}")
        table = [table[row] for _, row in order]
    rng = random.Random(seed)
    header = {"prompt": "prompt", "hq1": "hq1", "hq2": "hq2"}
    return [{"prompt": r["prompt"], "response": r[rng.choice(["hq1", "hq2"])], "topic": r.get("topic")}
            for r in [header] + table]


def pair_graded(path: str) -> list[dict]:
    """PAIR's graded responses for a reflection scorer: (prompt, response, level) with level 2 for
    complex reflections, 1 for the simple one, 0 for non-reflections; blank cells skipped. `row` is
    the prompt's index, for splitting by prompt."""
    table, _ = read_pair_table(path)
    return [{"prompt": r["prompt"], "response": r[c], "level": lvl, "row": i}
            for i, r in enumerate(table) for c, lvl in PAIR_LEVELS.items() if r[c].strip()]


def _annomi_turns(path: str) -> list[tuple[dict, dict]]:
    """(client turn, the therapist turn right after it) pairs of AnnoMI-simple.csv."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        need = {"transcript_id", "utterance_id", "interlocutor", "utterance_text", "main_therapist_behaviour",
                "mi_quality"}
        if not need <= set(reader.fieldnames or []):
            raise ConfigError("data.path", f"{path} is not AnnoMI-simple.csv: columns {sorted(need)} are needed")
        rows = list(reader)
    by_key = {(r["transcript_id"], int(r["utterance_id"])): r for r in rows}
    out = []
    for r in rows:
        prev = by_key.get((r["transcript_id"], int(r["utterance_id"]) - 1))
        if r["interlocutor"] == "therapist" and prev is not None and prev["interlocutor"] == "client":
            out.append((prev, r))
    return out


def read_annomi(path: str, min_prompt_words: int = 8, min_response_words: int = 5) -> list[dict]:
    """AnnoMI (client utterance -> therapist reflection) pairs from high-quality MI dialogues, with
    the length filter that makes the prompts self-contained like PAIR's (the dataset's README).
    `group` = transcript_id, so the split keeps each dialogue in one part."""
    return [{"prompt": c["utterance_text"], "response": t["utterance_text"], "group": t["transcript_id"]}
            for c, t in _annomi_turns(path)
            if t["main_therapist_behaviour"] == "reflection" and t["mi_quality"] == "high"
            and len(c["utterance_text"].split()) >= min_prompt_words
            and len(t["utterance_text"].split()) >= min_response_words]


def annomi_graded(path: str) -> list[dict]:
    """Therapist turns right after a client turn: reflections (level 2) and everything else (0)."""
    return [{"prompt": c["utterance_text"], "response": t["utterance_text"],
             "level": 2 if t["main_therapist_behaviour"] == "reflection" else 0, "group": t["transcript_id"]}
            for c, t in _annomi_turns(path)]


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
            kept.append({**r, "prompt": p, "response": resp if isinstance(resp, str) else None})
    return kept, {k: v for k, v in dropped.items() if v}


def split(rows: list[dict], cfg: DataConfig, file_order: bool = False) -> Splits:
    """Seeded split. Rows with a `group` (a dialogue) keep the whole group in one part.
    `file_order`: the authors' split (docs/method.md §1): no shuffle, cut at int(n*train) and int(n*(train+val))."""
    s = cfg.split
    n = len(rows)
    if file_order:
        a, b = int(n * s.train), int(n * (s.train + s.val))
        parts = [list(range(a)), list(range(a, b)), list(range(b, n))]
    elif any("group" in r for r in rows):
        groups: dict = {}
        for i, r in enumerate(rows):
            groups.setdefault(r["group"], []).append(i)
        keys = sorted(groups)
        if s.shuffle:
            random.Random(s.seed).shuffle(keys)
        parts = [[], [], []]
        for key in keys:  # whole groups, filling train, then val, then test
            part = 0 if len(parts[0]) < n * s.train else 1 if len(parts[1]) < n * s.val else 2
            parts[part].extend(groups[key])
    else:
        order = list(range(n))
        if s.shuffle:
            random.Random(s.seed).shuffle(order)
        n_train, n_val = int(n * s.train), int(n * s.val)
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


def load_splits(cfg: DataConfig, faithful: bool = False) -> Splits:
    """`faithful` changes only PAIR: the authors' records and file-order split (docs/method.md §1)."""
    authors_pair = faithful and cfg.source == "pair"
    if cfg.path is not None and storage.is_uri(cfg.path):  # data on object storage: read a local copy
        cfg = dataclasses.replace(cfg, path=storage.local_file(cfg.path),
                                  order_file=cfg.order_file and storage.local_file(cfg.order_file))
    if cfg.source == "demo":
        raw = read_demo()
    elif cfg.source == "pair":
        raw = read_pair(cfg.path, authors_pair, cfg.order_file, cfg.split.seed)
    elif cfg.source == "psych8k":
        raw = read_psych8k(cfg.path)
    elif cfg.source == "annomi":
        raw = read_annomi(cfg.path)
    else:
        raw = read_file(cfg)
    rows, dropped = clean(raw, cfg.max_prompt_chars)
    if cfg.limit is not None:
        if len(rows) > cfg.limit:
            dropped["over_limit"] = len(rows) - cfg.limit
        rows = rows[:cfg.limit]
    splits = split(rows, cfg, file_order=authors_pair)
    splits.dropped = dropped
    log.info("data source=%s: %d rows read, dropped %s, split sizes %s",
             cfg.source, len(raw), dropped or "nothing", splits.sizes())
    return splits
