import json

import pytest

from emorl_ray.search.hierarchical import HierarchicalGridSearcher, kuhn_subsimplices


def drive(searcher, f, fail=lambda w: False, stop_after=None):
    """Play Tune: take every suggestion until None/FINISHED, then report them all (one level)."""
    trials, i = [], 0
    while True:
        batch = []
        while True:
            cfg = searcher.suggest(str(i))
            if cfg is None or cfg == "FINISHED":
                break
            batch.append((str(i), cfg))
            i += 1
        if not batch:
            return trials
        for tid, cfg in batch:
            if stop_after is not None and len(trials) >= stop_after:
                return trials
            w = cfg["weights"]
            trials.append([w[k] for k in sorted(w, key=list(w).index)])
            if fail(w):
                searcher.on_trial_complete(tid, None, error=True)
            else:
                searcher.on_trial_complete(tid, {"score": f(w)})


def normalized_distance_score(target):
    def f(w):
        v = list(w.values())
        s = sum(v)
        if s == 0:
            return float("nan")
        return -sum((x / s - t) ** 2 for x, t in zip(v, target))
    return f


@pytest.mark.parametrize("n", [1, 2, 3])
def test_kuhn_subdivision_has_2_to_the_n_simplices(n):
    subs = kuhn_subsimplices(n)
    assert len(subs) == 2 ** n
    for s in subs:
        assert len(s) == n + 1 and all(sum(v) == 2 for v in s)


def test_cube_without_cache_is_the_authors_sequence_d2():
    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2, parameterization="cube", cache=False)
    trials = drive(s, lambda w: -((w["a"] - 0.8) ** 2 + (w["b"] - 0.3) ** 2))
    level1 = [[a, b] for a in (0, 0.5, 1) for b in (0, 0.5, 1)]  # first axis slowest
    assert trials[:9] == level1
    # octant (1, 0): a in [0.5, 1], b in [0, 0.5] has the best corner sum
    assert trials[9:] == [[a, b] for a in (0.5, 0.75, 1) for b in (0, 0.25, 0.5)]
    assert len(trials) == 18


def test_cube_counts_d3_with_and_without_cache():
    f = normalized_distance_score([0.6, 0.3, 0.1])
    no_cache = drive(HierarchicalGridSearcher(list("abc"), "score", levels=5, parameterization="cube",
                                              cache=False), f)
    cached = drive(HierarchicalGridSearcher(list("abc"), "score", levels=5, parameterization="cube",
                                            cache=True), f)
    assert len(no_cache) == 135
    assert len(cached) == len({tuple(t) for t in no_cache}) == len({tuple(t) for t in cached})
    assert len(cached) < 135


@pytest.mark.parametrize("target", [[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [1 / 3, 1 / 3, 1 / 3]])
def test_simplex_lands_within_the_final_resolution(target):
    s = HierarchicalGridSearcher(list("abc"), "score", levels=5)
    trials = drive(s, normalized_distance_score(target))
    assert len(trials) <= 50
    best, _ = s.best()
    assert max(abs(b - t) for b, t in zip(best, target)) <= 1 / 32 + 1e-9


@pytest.mark.parametrize("d", [2, 3, 4])
def test_any_number_of_objectives(d):
    target = [i + 1 for i in range(d)]
    target = [t / sum(target) for t in target]
    s = HierarchicalGridSearcher([f"o{i}" for i in range(d)], "score", levels=4)
    drive(s, normalized_distance_score(target))
    best, _ = s.best()
    assert sum(best) == pytest.approx(1.0)
    assert max(abs(b - t) for b, t in zip(best, target)) <= 1 / 8 + 1e-9
    assert s.suggest("late") == "FINISHED"


def test_mode_min():
    s = HierarchicalGridSearcher(["a", "b"], "score", mode="min", levels=4)
    drive(s, lambda w: abs(w["a"] / (w["a"] + w["b"]) - 0.75))
    assert s.best()[0][0] == pytest.approx(0.75)


def test_failed_trials_are_worst_and_do_not_stop_the_search():
    s = HierarchicalGridSearcher(list("abc"), "score", levels=3)
    trials = drive(s, normalized_distance_score([0.6, 0.3, 0.1]), fail=lambda w: w["c"] == 1.0)
    assert s.finished and len(trials) == 12
    assert s.scores["0,0,1"] is None
    assert s.best()[0] != [0.0, 0.0, 1.0]


def test_level_is_synchronous():
    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    first = [s.suggest(str(i)) for i in range(3)]
    assert all(isinstance(c, dict) for c in first)
    assert s.suggest("3") is None  # level 1 open: nothing new until all three report
    s.on_trial_complete("0", {"score": 1.0})
    s.on_trial_complete("1", {"score": 0.0})
    assert s.suggest("4") is None
    s.on_trial_complete("2", {"score": 0.5})
    nxt = s.suggest("5")
    assert nxt["level"] == 2


def test_state_round_trips_through_json_and_resumes(tmp_path):
    f = normalized_distance_score([0.6, 0.3, 0.1])
    full = HierarchicalGridSearcher(list("abc"), "score", levels=4)
    all_trials = drive(full, f)

    part = HierarchicalGridSearcher(list("abc"), "score", levels=4)
    done = drive(part, f, stop_after=8)  # interrupted inside level 2
    path = tmp_path / "searcher.json"
    part.save(str(path))
    json.loads(path.read_text())  # plain JSON, no pickle

    resumed = HierarchicalGridSearcher(list("abc"), "score", levels=4)
    resumed.restore(str(path))
    # Trials that were handed out but never reported are pending; Tune re-runs them by id.
    for tid, point in list(resumed.pending.items()):
        resumed.on_trial_complete(tid, {"score": f(dict(zip("abc", point)))})
    rest = drive(resumed, f)
    reran = [t for t in rest if t in done]
    assert not reran
    assert resumed.best() == full.best()
    assert len(done) + 1 + len(rest) == len(all_trials)  # + the one trial that was running


@pytest.mark.parametrize("kwargs, msg", [
    (dict(objectives=["a"]), "at least 2"),
    (dict(objectives=["a", "a"]), "unique"),
    (dict(levels=0), "levels"),
    (dict(levels=2.5), "levels"),
    (dict(parameterization="sphere"), "parameterization"),
    (dict(mode="best"), "mode"),
])
def test_bad_arguments(kwargs, msg):
    args = dict(objectives=["a", "b"], metric="score")
    args.update(kwargs)
    with pytest.raises(ValueError, match=msg):
        HierarchicalGridSearcher(**args)


def _record(trials: dict, status: dict, score=0.0) -> list[dict]:
    """Tune's saved record of trials as `replay` takes it, from {trial id: suggestion}."""
    return [{"trial_id": tid, "status": status.get(tid, "TERMINATED"), "level": cfg["level"],
             "weights": list(cfg["weights"].values()), "score": score} for tid, cfg in trials.items()]


def test_restore_rebuilds_the_searcher_from_tunes_saved_trials(tmp_path):
    """Tune saves the searcher state and its record of trials one after the other; a driver killed
    in between leaves them apart. Seen in CI: the searcher still waited for t3, which Tune had
    finished, while Tune was re-running t4 of the next level: the resumed search stalled."""
    from emorl_ray.search.run import rebuild_searcher

    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    t = {tid: s.suggest(tid) for tid in ("t1", "t2", "t3")}
    for tid in ("t1", "t2"):
        s.on_trial_complete(tid, {"score": 0.0})
    saved = s.get_state()
    behind = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    behind.set_state(json.loads(json.dumps(saved)))
    assert drive(behind, lambda w: 0.0) == [] and not behind.finished  # nothing Tune does wakes it up

    s.on_trial_complete("t3", {"score": 0.0})  # where Tune had got to
    t["t4"] = s.suggest("t4")
    (tmp_path / "searcher-state-x.pkl").write_text(json.dumps(saved))
    spec = lambda tid, cfg, status: json.dumps({"trial_id": tid, "status": status, "config": cfg})  # noqa: E731
    trial_data = [[spec(tid, cfg, "RUNNING" if tid == "t4" else "TERMINATED"),
                   json.dumps({"last_result": None if tid == "t4" else {"score": 0.0}})] for tid, cfg in t.items()]
    (tmp_path / "experiment_state-x.json").write_text(json.dumps({"trial_data": trial_data[::-1]}))
    rebuild_searcher(str(tmp_path), ["a", "b"])
    restored = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    restored.restore(str(tmp_path / "searcher-state-x.pkl"))
    assert restored.level == 1 and list(restored.pending) == ["t4"]
    restored.on_trial_complete("t4", {"score": 0.0})  # Tune re-runs t4 under its old id
    rest = drive(restored, lambda w: 0.0)
    assert restored.finished and list(t["t4"]["weights"].values()) not in rest  # t4's point runs once


def test_replay_queues_again_the_points_tune_never_recorded():
    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    t = {tid: s.suggest(tid) for tid in ("t1", "t2")}
    replayed = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    assert replayed.replay(_record({"t1": t["t1"]}, {"t1": "RUNNING"})) == []
    assert list(replayed.pending) == ["t1"] and replayed.queue[0] == list(t["t2"]["weights"].values())
    replayed.on_trial_complete("t1", {"score": 0.0})
    rest = drive(replayed, lambda w: 0.0)
    assert replayed.finished and list(t["t2"]["weights"].values()) in rest


@pytest.mark.parametrize("parameterization", ["simplex", "cube"])
def test_replay_of_a_whole_record_in_any_order_is_the_search_itself(parameterization):
    """Replaying every trial of a finished search, shuffled, gives back the searcher's state: the
    same levels, scores, path and result, whatever order Tune saved its trials in."""
    import random

    f = normalized_distance_score([0.6, 0.3, 0.1])
    s = HierarchicalGridSearcher(["a", "b", "c"], "score", levels=3, parameterization=parameterization)
    trials, i = {}, 0
    while (cfg := s.suggest(str(i))) not in (None, "FINISHED"):
        trials[str(i)] = cfg
        s.on_trial_complete(str(i), {"score": f(cfg["weights"])})  # one at a time: any order works
        i += 1
    record = [{"trial_id": tid, "status": "TERMINATED", "level": cfg["level"],
               "weights": list(cfg["weights"].values()), "score": f(cfg["weights"])} for tid, cfg in trials.items()]
    random.Random(0).shuffle(record)
    replayed = HierarchicalGridSearcher(["a", "b", "c"], "score", levels=3, parameterization=parameterization)
    assert replayed.replay(record) == [] and replayed.finished
    for key in ("level", "scores", "path", "region", "pending", "queue"):
        assert replayed.get_state()[key] == s.get_state()[key], key
    assert replayed.best() == s.best()


def test_replay_leaves_out_trials_that_fit_no_point():
    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    t1 = s.suggest("t1")
    record = _record({"t1": t1}, {"t1": "RUNNING"})
    record.append({"trial_id": "stray", "status": "TERMINATED", "level": 1, "weights": [0.3, 0.7], "score": 1.0})
    record.append({"trial_id": "twice", "status": "TERMINATED", "level": 1, "weights": record[0]["weights"],
                   "score": 1.0})
    replayed = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    assert replayed.replay(record) == ["stray", "twice"] and list(replayed.pending) == ["t1"]
    with pytest.raises(RuntimeError, match="fresh searcher"):
        replayed.replay(record)


def test_the_searcher_holds_back_past_tunes_concurrency_limit():
    """It counts its own running trials (set_max_concurrency), so no wrapper keeps a second,
    separately saved list of them."""
    s = HierarchicalGridSearcher(["a", "b", "c"], "score", levels=2)
    assert s.set_max_concurrency(2) is True
    assert s.suggest("t1") and s.suggest("t2") and s.suggest("t3") is None
    s.on_trial_complete("t1", {"score": 0.0})
    assert s.suggest("t3") is not None


def test_the_newest_tune_file_is_the_last_by_name_as_tune_reads_it(tmp_path):
    """Tune's restore reads the last session by name; a rewrite (ours, before a restore) or a
    node with a clock behind must not make us read or rebuild another file."""
    import os

    from emorl_ray.search.run import latest_file

    newer, older = "searcher-state-2026-01-02_00-00-00.pkl", "searcher-state-2026-01-01_00-00-00.pkl"
    for name, mtime in ((newer, 100), (older, 200), ("search_gen_state-2026-01-03_00-00-00.json", 300)):
        (tmp_path / name).write_text("{}")
        os.utime(tmp_path / name, (mtime, mtime))
    assert latest_file(str(tmp_path), "searcher-state-", ".pkl") == str(tmp_path / newer)
    assert latest_file(str(tmp_path), "experiment_state-", ".json") is None


@pytest.mark.parametrize("missing", ["experiment_state-", "search_gen_state-", "searcher-state-"])
def test_a_search_killed_before_tune_saved_all_its_state_starts_again(tiny_config, missing):
    """Tune's first save can be cut short (a driver killed as the search starts, mid-upload to cloud
    storage): tuner.pkl is there, some of the rest is not. Restoring that would re-run trials
    without their config, run every point again, or fail; the search starts afresh instead."""
    from pathlib import Path

    from emorl_ray.search.run import TUNE_STATE_FILES, make_tuner

    exp = Path(tiny_config.run_dir.ray_storage) / "search-overlap-brevity"
    exp.mkdir(parents=True)
    garbage = b"not a pickle: Tuner.restore would fail on it"
    (exp / "tuner.pkl").write_bytes(garbage)
    for prefix, suffix in TUNE_STATE_FILES:
        if prefix != missing:
            (exp / f"{prefix}2026-01-01_00-00-00{suffix}").write_text("{}")
    make_tuner(tiny_config, tiny_config.run_dir, ["overlap", "brevity"], "hidden_state", exp.name)
    assert not list(exp.glob("*state-*")) and (exp / "tuner.pkl").read_bytes() != garbage  # a new experiment's
