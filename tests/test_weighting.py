"""Reward weighting of the runs: fixed weights (EMORL, Uniform) and DynaOpt's two Exp3 bandits."""

import math
import random

import pytest

from emorl_ray.training.weighting import DynaOpt, Exp3, FixedWeights, build_weighting

OBJ = ["reflection", "empathy", "fluency"]


def test_exp3_distribution_and_update_by_hand():
    b = Exp3(4, gamma=0.07)
    assert b.probs() == pytest.approx([0.25] * 4)
    b.update(2, 1.0)  # p = 0.25: w_2 = exp(0.07 * 1 / (0.25 * 4)) = exp(0.07), then rescaled to max 1
    assert b.w == pytest.approx([math.exp(-0.07), math.exp(-0.07), 1.0, math.exp(-0.07)])
    total = 3 * math.exp(-0.07) + 1
    assert b.probs()[2] == pytest.approx(0.93 / total + 0.07 / 4)
    b.update(2, -5.0)  # negative rewards are not clipped: the arm loses weight
    assert b.probs()[2] < 0.25


def test_exp3_weights_stay_finite_over_long_runs():
    b = Exp3(3, gamma=0.07)
    for _ in range(100_000):
        b.update(0, 1.0)
    assert all(math.isfinite(w) for w in b.w) and b.probs()[0] == pytest.approx(1 - 0.07 + 0.07 / 3)


def _first_objective_arm_seed() -> int:
    """A seed whose first arm pull picks an objective (not the 'leave as is' arm)."""
    return next(s for s in range(100) if DynaOpt(OBJ, seed=s).chosen < len(OBJ))


def test_dynaopt_original_updates_the_weight_bandit_once_per_pull():
    d = DynaOpt(OBJ, seed=_first_objective_arm_seed())
    arm = d.chosen
    w1 = d.weights()
    assert sum(w1.values()) == pytest.approx(1.0)
    assert max(w1, key=w1.get) == OBJ[arm]  # the pulled objective's weight went up
    assert d.weights() == w1 == d.weights()  # and only once until the next validation


def test_dynaopt_faithful_updates_every_step_and_starts_at_ones():
    seed = _first_objective_arm_seed()
    f = DynaOpt(OBJ, seed=seed, faithful=True)
    arm = OBJ[f.chosen]
    w1, w2 = f.weights(), f.weights()
    assert w2[arm] > w1[arm]  # EMORL's variant: the same arm is rewarded at every step
    g = DynaOpt(OBJ, seed=next(s for s in range(100) if DynaOpt(OBJ, seed=s).chosen == len(OBJ)), faithful=True)
    assert g.weights() == {o: 1.0 for o in OBJ}  # 'leave as is' drawn first: unnormalised ones


def test_dynaopt_bandit_reward_is_the_gain_over_the_history():
    d = DynaOpt(OBJ, seed=0, history=4)
    d.observe_validation({o: [0.5, 0.5] for o in OBJ})  # no history yet: reward 0, weights unchanged
    assert d.arm_bandit.w == [1.0] * 4
    chosen = d.chosen
    d.observe_validation({o: [0.7, 0.7, 0.7] for o in OBJ})  # gain +0.2 for every objective
    assert d.arm_bandit.w[chosen] == 1.0 and sorted(d.arm_bandit.w)[0] < 1.0  # rewarded arm leads
    assert d.history["empathy"] == [0.5, 0.7, 0.7, 0.7]  # the last 4 individual scores
    f = DynaOpt(OBJ, seed=0, faithful=True)
    f.observe_validation({o: [0.1] * 10 for o in OBJ})
    f.observe_validation({o: [0.2] * 3 for o in OBJ})
    assert f.history["empathy"] == [0.2] * 3  # EMORL: the previous validation's last 8 only


def test_dynaopt_state_round_trip_continues_identically():
    a = DynaOpt(OBJ, seed=3)
    rng = random.Random(0)

    def play(d, n):
        out = []
        for i in range(n):
            out.append(d.weights())
            if i % 2:
                d.observe_validation({o: [rng.random() for _ in range(3)] for o in OBJ})
        return out

    play(a, 5)
    b = DynaOpt(OBJ, seed=3)
    b.load_state_dict(a.state_dict())
    rng_state = rng.getstate()
    tail_a = play(a, 6)
    rng.setstate(rng_state)
    assert play(b, 6) == tail_a


def test_fixed_weights_and_builder():
    u = build_weighting("uniform", {o: 1 / 3 for o in OBJ}, 0.07, 200, 0, False)
    assert isinstance(u, FixedWeights) and u.weights() == {o: 1 / 3 for o in OBJ}
    u.observe_validation({o: [1.0] for o in OBJ})
    assert u.weights() == {o: 1 / 3 for o in OBJ}
    assert isinstance(build_weighting("dynaopt", {o: 1 / 3 for o in OBJ}, 0.07, 200, 0, False), DynaOpt)
