"""Run directories on a local disk and on S3 (a real S3-compatible server, moto's server mode):
the same reads and writes, atomic for a reader, and the refusals of locations that cannot work."""

import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_raw_config

from emorl_ray import storage
from emorl_ray.config import ConfigError, load_config, parse_config
from emorl_ray.rundir import RunDir


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "runs")
    return request.getfixturevalue("s3_bucket") + "/runs"


def test_files_round_trip(location):
    rows = [{"a": 1, "b": "x"}, {"a": 2, "c": 0.5}]  # the second row adds a column
    storage.write_json(storage.join(location, "r", "result.json"), {"best": [1, 2]})
    storage.write_parquet(storage.join(location, "r", "points.parquet"), rows)
    storage.write_text(storage.join(location, "r", "report.md"), "# ok\n")
    assert storage.read_json(storage.join(location, "r", "result.json")) == {"best": [1, 2]}
    assert storage.read_parquet(storage.join(location, "r", "points.parquet")) == [
        {"a": 1, "b": "x", "c": None}, {"a": 2, "b": None, "c": 0.5}]
    assert sorted(n for n, _ in storage.listdir(storage.join(location, "r"))) == [
        "points.parquet", "report.md", "result.json"]
    assert storage.is_file(storage.join(location, "r", "report.md"))
    assert not storage.exists(storage.join(location, "r", "missing.json"))
    assert storage.listdir(storage.join(location, "nowhere")) == []
    storage.remove_dir(storage.join(location, "r"))
    assert not storage.exists(storage.join(location, "r", "result.json"))


def test_directories_replace_and_local_copies_follow_changes(location, tmp_path):
    src = tmp_path / "adapter"
    (src / "sub").mkdir(parents=True)
    (src / "adapter_config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"1" * 100)
    (src / "stale.bin").write_bytes(b"old")
    dst = storage.join(location, "training", "a-s0", "adapter")
    storage.upload_dir(src, dst)
    (src / "stale.bin").unlink()
    (src / "sub" / "w.bin").write_bytes(b"2" * 100)
    storage.upload_dir(src, dst)  # replaces: the file no longer in the source is gone
    local = Path(storage.local_dir(dst, cache_dir=tmp_path / "cache"))
    assert sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()) == [
        "adapter_config.json", "sub/w.bin"]
    assert (local / "sub" / "w.bin").read_bytes() == b"2" * 100
    assert storage.local_dir(dst, cache_dir=tmp_path / "cache") == str(local)  # cached
    (src / "sub" / "w.bin").write_bytes(b"3" * 101)
    storage.upload_dir(src, dst)
    again = Path(storage.local_dir(dst, cache_dir=tmp_path / "cache"))
    assert (again / "sub" / "w.bin").read_bytes() == b"3" * 101


def test_a_failed_local_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = str(tmp_path / "result.json")
    storage.write_json(target, {"v": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        storage.write_json(target, {"v": 2})
    monkeypatch.undo()
    assert storage.read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]  # no temporary left behind


def test_run_dir_layout_and_uris(tmp_path):
    rd = RunDir.at("s3://bucket/runs/default/")
    assert rd.location == "s3://bucket/runs/default" and rd.name == "default"
    assert rd.output_dir == "s3://bucket/runs"
    assert rd.manifest == "s3://bucket/runs/default/training/manifest.json"
    assert rd.search("parameter") == "s3://bucket/runs/default/search/parameter"
    assert RunDir.at(f"file://{tmp_path}/runs/x").location == str(tmp_path / "runs" / "x")
    cfg = parse_config(tiny_raw_config("sshleifer/tiny-gpt2", "gs://b/runs"))
    assert cfg.run_dir.location == "gs://b/runs/tiny"


@pytest.mark.parametrize("output_dir, message", [
    ("ftp://host/runs", "unsupported URI scheme 'ftp'"),
    ("s3:///runs", "names no bucket"),
])
def test_bad_output_dir_is_refused_before_any_work(output_dir, message):
    with pytest.raises(ConfigError, match=message) as e:
        parse_config(tiny_raw_config("sshleifer/tiny-gpt2", output_dir))
    assert e.value.path == "output_dir"


def test_config_and_adapters_load_from_s3(s3_bucket, tiny_causal, tmp_path, monkeypatch):
    """What jobs/evaluate.py, jobs/serve_ensemble.py and --resume do with an s3:// run: read the
    saved experiment and load the adapters from the bucket."""
    import yaml
    from peft import get_peft_model

    from emorl_ray.config import LoraConfig
    from emorl_ray.ensemble.adapter_ensemble import AdapterEnsemble
    from emorl_ray.models import Policy, lora_config

    monkeypatch.setenv("EMORL_CACHE", str(tmp_path / "cache"))
    run = RunDir.at(s3_bucket + "/runs/tiny")
    raw = tiny_raw_config(tiny_causal, s3_bucket + "/runs")
    storage.write_text(run.config, yaml.safe_dump(raw))
    cfg = load_config(run.config, {"training.max_steps": 2})
    assert cfg.run_dir == run and cfg.training.max_steps == 2
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(s3_bucket + "/runs/none/config.yaml")

    policy = Policy(cfg.model)
    torch.manual_seed(0)
    peft = get_peft_model(policy.model, lora_config(LoraConfig(r=2, alpha=4, dropout=0.0), policy.kind))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    peft.save_pretrained(tmp_path / "a")
    storage.upload_dir(tmp_path / "a", run.file("training", "a-s0", "adapter"))
    from_s3 = AdapterEnsemble(Policy(cfg.model), {"a": run.file("training", "a-s0", "adapter")})
    from_disk = AdapterEnsemble(Policy(cfg.model), {"a": str(tmp_path / "a")})
    prompts = ["I feel stuck at work", "Nobody listens to me"]
    assert from_s3.generate(prompts, [1.0], 8) == from_disk.generate(prompts, [1.0], 8)
    assert from_s3.generate(prompts, [1.0], 8) != from_s3.generate(prompts, None, 8)  # the adapter acts
    assert any((tmp_path / "cache" / "remote").iterdir())  # read from this node's copy
    with pytest.raises(ValueError, match="holds no adapter_config.json"):
        AdapterEnsemble(Policy(cfg.model), {"a": run.file("training", "missing", "adapter")})


def _pair_csv(path: Path, n: int = 24) -> str:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "hq1", "hq2", "mq1", "lq1", "lq2", "lq3", "lq4", "lq5"])
        for i in range(n):
            topic = ["work", "my sister", "sleep", "money", "school", "my dog"][i % 6]
            w.writerow([f"I keep worrying about {topic}, case {i}.", f"It sounds like {topic} weighs on you a lot.",
                        f"You feel worried about {topic}.", f"{topic} is on your mind.", "Why not relax?",
                        "Have you tried yoga?", "That is not a big deal.", "Just stop it.", "Okay."])
    return str(path)


@pytest.mark.e2e
def test_the_job_trains_a_missing_scorer_once_into_the_run_directory(s3_bucket, tiny_causal, tmp_path, monkeypatch):
    """`train_if_missing`: the PAIR-style scorer is trained by the job (a Ray task) into
    <run>/scorers/<objective> on S3, found there on the next run, and loaded by the scorer."""
    import ray
    from conftest import start_local_ray

    from emorl_ray.pipeline import trained_scorers
    from emorl_ray.rewards import build_scorer

    monkeypatch.setenv("EMORL_CACHE", str(tmp_path / "cache"))
    raw = tiny_raw_config(tiny_causal, s3_bucket + "/runs")
    raw["data"] = {"source": "pair", "path": _pair_csv(tmp_path / "pair.csv"), "max_val": 4, "max_test": 4}
    raw["objectives"]["reflection"] = {"scorer": {"type": "cross_encoder", "train_if_missing": True,
                                                  "train_epochs": 1, "num_cpus": 0.5}}
    cfg = parse_config(raw)
    with pytest.raises(ConfigError, match="holds no trained scorer"):
        trained_scorers(parse_config(raw), train=False)
    start_local_ray(runtime_env={"env_vars": {k: os.environ[k] for k in os.environ if k.startswith("AWS_")}})
    try:
        assert trained_scorers(cfg) == {"reflection": cfg.run_dir.file("scorers", "reflection")}
        where = cfg.run_dir.file("scorers", "reflection")
        metrics = storage.read_json(storage.join(where, "scorer_metrics.json"))
        assert metrics["epochs"] == 1 and metrics["train_prompts"] > 0
        stamp = storage.listdir(where)
        again = parse_config(raw)
        assert trained_scorers(again) == {"reflection": where} and storage.listdir(where) == stamp  # not retrained
    finally:
        ray.shutdown()
    scorer = build_scorer(again.objectives["reflection"].scorer, again.model)
    scores = scorer(["I keep worrying about work."] * 2, ["It sounds like work weighs on you.", "Okay."])
    assert all(0 <= s <= 1 for s in scores)
    bad = dict(raw, data={"source": "demo"})
    with pytest.raises(ConfigError, match="needs `data.source: pair`") as e:
        parse_config(bad)
    assert e.value.path == "objectives.reflection.scorer.train_if_missing"
