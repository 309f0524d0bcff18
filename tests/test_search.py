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


def test_restore_lines_the_searcher_up_with_tunes_saved_trials(tmp_path):
    """Tune saves the searcher state and its experiment state one after the other; a driver killed
    in between leaves them apart. Seen in CI: the searcher still waited for t3, which Tune had
    finished, while Tune was re-running t4 of the next level: the resumed search stalled."""
    from emorl_ray.search.run import reconcile_searcher

    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    t = {tid: s.suggest(tid)["weights"] for tid in ("t1", "t2", "t3")}
    for tid in ("t1", "t2"):
        s.on_trial_complete(tid, {"score": 0.0})
    saved = s.get_state()
    behind = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    behind.set_state(json.loads(json.dumps(saved)))
    assert drive(behind, lambda w: 0.0) == [] and not behind.finished  # nothing Tune does wakes it up

    ahead = HierarchicalGridSearcher(["a", "b"], "score", levels=2)  # where Tune had got to
    ahead.set_state(json.loads(json.dumps(saved)))
    ahead.on_trial_complete("t3", {"score": 0.0})
    t4 = ahead.suggest("t4")["weights"]
    (tmp_path / "searcher-state-x.pkl").write_text(json.dumps(saved))
    spec = lambda tid, w, status: json.dumps({"trial_id": tid, "status": status, "config": {"weights": w}})  # noqa: E731
    trial_data = [[spec(tid, w, "TERMINATED"), json.dumps({"last_result": {"score": 0.0}})] for tid, w in t.items()]
    trial_data.append([spec("t4", t4, "RUNNING"), json.dumps({"last_result": None})])
    (tmp_path / "experiment_state-x.json").write_text(json.dumps({"trial_data": trial_data}))
    reconcile_searcher(str(tmp_path), ["a", "b"])
    restored = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    restored.restore(str(tmp_path / "searcher-state-x.pkl"))
    assert restored.level == 1 and list(restored.pending) == ["t4"]
    restored.on_trial_complete("t4", {"score": 0.0})  # Tune re-runs t4 under its old id
    rest = drive(restored, lambda w: 0.0)
    assert restored.finished and list(t4.values()) not in rest  # t4's point runs once


def test_restore_hands_back_in_flight_points_tune_never_recorded():
    s = HierarchicalGridSearcher(["a", "b"], "score", levels=2)
    s.suggest("t1")
    lost = s.suggest("t2")["weights"]
    s.reconcile([{"trial_id": "t1", "status": "RUNNING", "weights": [1.0, 0.0], "score": None}])
    assert list(s.pending) == ["t1"] and s.queue[0] == list(lost.values())
    s.on_trial_complete("t1", {"score": 0.0})
    rest = drive(s, lambda w: 0.0)
    assert s.finished and list(lost.values()) in rest
