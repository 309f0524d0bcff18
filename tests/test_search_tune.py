"""The hierarchical searcher inside real Ray Tune experiments (synthetic objective)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import ray
from conftest import start_local_ray
from ray import tune

from emorl_ray.search.hierarchical import HierarchicalGridSearcher
from emorl_ray.search.run import searcher_state
from emorl_ray.search.synthetic import FUNCTIONS, synthetic_trial

pytestmark = pytest.mark.e2e
OBJ = ["a", "b", "c"]


@pytest.fixture(scope="module")
def local_ray():
    start_local_ray()
    yield
    ray.shutdown()


def _tuner(searcher, storage, name, extra=None, max_failures=0):
    return tune.Tuner(
        tune.with_resources(synthetic_trial, {"cpu": 0.01}),
        param_space={"function": "concave", **(extra or {})},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=3),
        run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)))


def test_simplex_search_in_tune(local_ray, tmp_path):
    searcher = HierarchicalGridSearcher(OBJ, "score", levels=5)
    grid = _tuner(searcher, tmp_path, "simplex").fit()
    assert len(grid) == 18 and not grid.errors
    best = grid.get_best_result("score", "max")
    w = [best.config["weights"][o] for o in OBJ]
    assert max(abs(a - b) for a, b in zip(w, [0.55, 0.3, 0.15])) <= 1 / 32 + 1e-9
    levels = [r.config["level"] for r in grid]
    assert sorted(levels) == [1] * 6 + [2] * 3 + [3] * 3 + [4] * 3 + [5] * 3


def test_failing_trial_is_retried_then_scored_worst(local_ray, tmp_path):
    searcher = HierarchicalGridSearcher(OBJ, "score", levels=2)
    tuner = _tuner(searcher, tmp_path, "failing", {"fail_on": [[0.0, 0.0, 1.0]]}, max_failures=1)
    grid = tuner.fit()
    assert len(grid) == 9 and len(grid.errors) == 1  # the search went on past the failure
    state = searcher_state(tmp_path / "failing")
    assert state["finished"] and state["scores"]["0,0,1"] is None


def _kill_mid_search(tmp_path, snapshot_after=None):
    """Run a levels=4 search (6 + 3 + 3 + 3 trials, 2 at a time) in a driver of its own and SIGKILL
    it once 7 trials are done (into level 2). With `snapshot_after`, copy Tune's searcher files
    once that many trials are done; returns (the experiment directory, the copies)."""
    script = textwrap.dedent(f"""
        import ray
        from ray import tune
        from emorl_ray.search.hierarchical import HierarchicalGridSearcher
        from emorl_ray.search.synthetic import synthetic_trial
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        s = HierarchicalGridSearcher({OBJ!r}, "score", levels=4)
        tune.Tuner(tune.with_resources(synthetic_trial, {{"cpu": 0.01}}),
                   param_space={{"function": "concave", "sleep_s": 1.0}},
                   tune_config=tune.TuneConfig(search_alg=s, num_samples=-1, max_concurrent_trials=2),
                   run_config=tune.RunConfig(name="killed", storage_path={str(tmp_path)!r}, verbose=0)).fit()
    """)
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, start_new_session=True)
    exp = tmp_path / "killed"

    def searcher_files():  # the searcher's own state, and that of Tune's wrappers around it
        return list(exp.glob("searcher-state-*.pkl")) + list(exp.glob("search_gen_state-*.json"))

    deadline = time.time() + 420  # generous: CI machines may be loaded
    finished, snapshot = [], {}
    while time.time() < deadline:
        finished = [p for p in exp.glob("synthetic_trial_*/result.json") if p.stat().st_size > 0]
        if snapshot_after is not None and not snapshot and len(finished) >= snapshot_after \
                and len(searcher_files()) == 2:
            snapshot = {p.name: p.read_bytes() for p in searcher_files()}
        if len(finished) >= 7 and list(exp.glob("searcher-state-*.pkl")):
            break
        if proc.poll() is not None:  # the first run died on its own: no point waiting
            break
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass
    proc.wait()
    assert len(finished) >= 7, "the first run did not get far enough"
    assert snapshot_after is None or snapshot, "no searcher files to copy"
    time.sleep(3)
    return exp, snapshot


def test_restore_after_killed_driver_reruns_nothing(local_ray, tmp_path):
    """Kill the driver mid-search (SIGKILL), then Tuner.restore: no finished trial runs again."""
    exp, _ = _kill_mid_search(tmp_path)
    before = {p.parent.name for p in exp.glob("synthetic_trial_*/result.json") if p.stat().st_size > 0}
    assert tune.Tuner.can_restore(str(exp))
    grid = tune.Tuner.restore(str(exp), tune.with_resources(synthetic_trial, {"cpu": 0.01}),
                              resume_unfinished=True, resume_errored=False).fit()
    weights = [tuple(r.config["weights"][o] for o in OBJ) for r in grid]
    assert len(weights) == len(set(weights)) == 15  # 6 + 3 + 3 + 3: every point exactly once
    for d in before:  # finished trials kept their single result, they were not re-run
        lines = (exp / d / "result.json").read_text().strip().splitlines()
        assert len(lines) == 1
    best = max(grid, key=lambda r: r.metrics.get("score", float("-inf")))
    assert best.metrics["score"] == pytest.approx(
        max(FUNCTIONS["concave"](list(w)) for w in weights))


def test_restore_with_searcher_files_older_than_tunes_trials(tmp_path):
    """Tune writes its record of trials and the searcher's files one after the other, and uploads
    them to cloud storage in any order, so a killed driver can leave searcher files from an earlier
    save beside a later record. Seen in CI on S3: the resumed search waited forever for trials Tune
    had finished. Here the searcher files of 2 finished trials lie beside the record of 7: the
    restored search (its own driver, so a stall fails instead of hanging) runs every point once."""
    exp, old = _kill_mid_search(tmp_path, snapshot_after=2)
    for name, data in old.items():
        (exp / name).write_bytes(data)
    script = textwrap.dedent(f"""
        import json
        import ray
        from ray import tune
        from emorl_ray.search.run import rebuild_searcher
        from emorl_ray.search.synthetic import synthetic_trial
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
        rebuild_searcher({str(exp)!r}, {OBJ!r})
        grid = tune.Tuner.restore({str(exp)!r}, tune.with_resources(synthetic_trial, {{"cpu": 0.01}}),
                                  resume_unfinished=True, resume_errored=False).fit()
        print("WEIGHTS", json.dumps([[r.config["weights"][o] for o in {OBJ!r}] for r in grid]))
    """)
    env, limit = dict(os.environ, RAY_USAGE_STATS_ENABLED="0"), 300  # it takes about 30 s
    try:
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                             timeout=limit, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the restored search did not finish in {limit} s:\n{(e.stderr or b'')[-3000:]}")
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("WEIGHTS "))
    weights = [tuple(w) for w in json.loads(line[len("WEIGHTS "):])]
    assert len(weights) == len(set(weights)) == 15
