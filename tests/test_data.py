import json

import pytest

from emorl_ray.config import ConfigError, DataConfig, SplitConfig
from emorl_ray.data import clean, load_splits, read_demo, read_pair


def test_demo_set_is_large_and_varied():
    rows = read_demo()
    assert len(rows) >= 150
    assert len({r["topic"] for r in rows}) >= 10
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_split_is_seeded_disjoint_and_complete():
    cfg = DataConfig(split=SplitConfig(seed=3))
    a, b = load_splits(cfg), load_splits(cfg)
    assert [r["prompt"] for r in a.train] == [r["prompt"] for r in b.train]
    parts = [set(r["prompt"] for r in getattr(a, k)) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert sum(map(len, parts)) == len(read_demo())
    other = load_splits(DataConfig(split=SplitConfig(seed=4)))
    assert [r["prompt"] for r in other.val] != [r["prompt"] for r in a.val]
    assert a.summary()["sha256_16"] == b.summary()["sha256_16"]


def test_caps_apply_after_split():
    s = load_splits(DataConfig(max_val=5, max_test=7))
    assert s.sizes()["val"] == 5 and s.sizes()["test"] == 7


def test_cleaning_counts_every_dropped_row():
    rows = [{"prompt": "fine"}, {"prompt": "  "}, {"prompt": None}, {"prompt": 3}, {"prompt": "x" * 50},
            {"prompt": "fine"}, {"prompt": " spaced   out "}]
    kept, dropped = clean(rows, max_chars=20)
    assert [r["prompt"] for r in kept] == ["fine", "spaced out"]
    assert dropped == {"empty": 1, "non_text": 2, "too_long": 1, "duplicate": 1}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_file_source_with_column_mapping(tmp_path, fmt):
    rows = [{"client": f"statement number {i}", "counselor": f"reply {i}"} for i in range(30)]
    rows.append({"client": "", "counselor": "dropped"})
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("client,counselor\n" + "".join(f"{r['client']},{r['counselor']}\n" for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    cfg = DataConfig(source="file", path=str(path), prompt_column="client", response_column="counselor")
    s = load_splits(cfg)
    assert sum(s.sizes().values()) == 30
    assert s.dropped == {"empty": 1} or s.dropped == {"non_text": 1}
    assert all(r["response"].startswith("reply") for r in s.train)


def test_missing_column_is_a_config_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(ConfigError) as e:
        load_splits(DataConfig(source="file", path=str(path)))
    assert e.value.path == "data.prompt_column" and "text" in str(e.value)


PAIR_ROW = ['Client says "hi",\nthen more', "hq a", "hq b", "mq", "l1", "l2", "l3", "l4", "l5"]


def _write_csv(path, rows):
    import csv

    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_pair_both_shapes_give_the_same_prompts(tmp_path):
    header = ["prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5"]
    rows = [[f"{PAIR_ROW[0]} {i}"] + PAIR_ROW[1:] for i in range(5)]
    authors, dynaopt = tmp_path / "a.csv", tmp_path / "d.csv"
    _write_csv(authors, [header] + rows)
    _write_csv(dynaopt, [r + ["topic"] for r in rows])
    a, d = read_pair(str(authors)), read_pair(str(dynaopt))
    assert [r["prompt"] for r in a] == [r["prompt"] for r in d] and len(a) == 5  # header skipped
    assert "\n" in a[0]["prompt"] and a[0]["response"] == "hq a"


def test_pair_wrong_shape(tmp_path):
    bad = tmp_path / "bad.csv"
    _write_csv(bad, [["only", "three", "cols"]])
    with pytest.raises(ConfigError, match="9 or 10 PAIR columns"):
        read_pair(str(bad))


def test_psych8k_reader(tmp_path):
    p = tmp_path / "p8k.json"
    p.write_text(json.dumps([{"instruction": "x", "input": f"in {i}", "output": f"out {i}"} for i in range(20)]
                            + [{"input": None, "output": "x"}]))
    s = load_splits(DataConfig(source="psych8k", path=str(p)))
    assert sum(s.sizes().values()) == 20 and s.dropped == {"non_text": 1}
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_splits(DataConfig(source="psych8k", path=str(p)))


def test_too_little_data_for_a_split(tmp_path):
    p = tmp_path / "tiny.jsonl"
    p.write_text('{"prompt": "one"}\n{"prompt": "two"}\n')
    with pytest.raises(ConfigError, match="split is empty"):
        load_splits(DataConfig(source="file", path=str(p)))
