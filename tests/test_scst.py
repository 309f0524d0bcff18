import math

import pytest
import torch
from peft import get_peft_model

from emorl_ray.config import LoraConfig, ModelConfig, SamplingConfig, TrainingConfig
from emorl_ray.decoding.engine import response_mask
from emorl_ray.models import Policy, lora_config
from emorl_ray.rewards import LocalRewards
from emorl_ray.testing import vowel_start
from emorl_ray.training.scst import (
    advantages,
    authors_postprocess,
    authors_targets,
    converged,
    kl_penalty,
    policy_loss,
    sample,
    scst_step,
    transform,
)


def test_response_mask_keeps_the_first_eos():
    ids = torch.tensor([[5, 6, 1, 0, 0], [5, 1, 7, 1, 0], [5, 6, 7, 8, 9]])
    assert response_mask(ids, eos_id=1).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


def test_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, k = 3
    # mean-of-k (authors): r - mean(all k)
    assert advantages(r, 3, "mean").tolist() == [-2.0, -1.0, 3.0, -1.0, -1.0, 2.0]
    # leave-one-out: r - mean(other k-1)
    assert advantages(r, 3, "rloo").tolist() == [-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]


def test_reward_transform_clips_before_log():
    s = torch.tensor([0.0, 0.5, 1.0])
    out = transform(s, "log")
    assert torch.allclose(out, torch.tensor([1e-4, 0.5, 0.9999]).log())
    assert torch.equal(transform(s, "identity"), s)


def test_loss_reductions():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    # sequence sum: -(1 * (-3) + (-1) * (-1)) / 2 sequences; token mean: the same sum / 3 tokens
    assert policy_loss(logp, mask, adv, "sequence_sum").item() == pytest.approx(1.0)
    assert policy_loss(logp, mask, adv, "token_mean").item() == pytest.approx(2 / 3)


def test_kl_penalty_is_zero_at_the_reference_and_positive_elsewhere():
    logp = torch.tensor([[-1.0, -2.0]])
    mask = torch.ones_like(logp)
    assert kl_penalty(logp, logp, mask).item() == 0.0
    assert kl_penalty(logp, logp - 0.5, mask).item() > 0


def test_convergence_rule_stops_at_the_right_validation():
    scores = [0.1, 0.3, 0.5, 0.60, 0.61, 0.60, 0.61, 0.60]
    stops = [i for i in range(1, len(scores) + 1) if converged(scores[:i], window=4, threshold=0.015)]
    assert stops[0] == 7  # the first window of 4 with std/mean < 1.5%: 0.60, 0.61, 0.60, 0.61
    assert not converged(scores[:3], window=4, threshold=0.015)


def test_rollout_masks_after_eos(tiny_causal):
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    torch.manual_seed(0)
    roll = sample(policy, policy.model, ["I feel stuck at work", "My dog died"], k=3, max_new_tokens=8,
                  sampling=SamplingConfig())
    assert roll.response_ids.shape[0] == 6 and len(roll.prompts) == 6
    assert roll.prompts[:3] == ["I feel stuck at work"] * 3
    ended = (roll.response_mask == 0).any(1)
    for row, m in zip(roll.response_ids[ended], roll.response_mask[ended]):
        assert (row[m == 0] == policy.pad_token_id).all()


def _mean_reward(policy, model, rewards, prompts, n=4):
    torch.manual_seed(123)
    roll = sample(policy, model, prompts * n, k=2, max_new_tokens=6, sampling=SamplingConfig())
    return sum(rewards.score("tok", roll.prompts, roll.texts)) / len(roll.texts)


def test_scst_raises_a_toy_reward(tiny_causal):
    """k-SCST + LoRA learns to prefer words that start with a vowel within a few dozen steps."""
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    torch.manual_seed(0)
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=4, alpha=32, dropout=0.0), "causal"))
    rewards = LocalRewards({"tok": vowel_start})
    cfg = TrainingConfig(batch_size=4, k=4, lr=5e-2, max_new_tokens=6, reward_transform="identity")
    prompts = ["I feel stuck at work", "My dog died last week", "I worry a lot", "My boss yells at me"]
    before = _mean_reward(policy, policy.model, rewards, prompts)
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=cfg.lr)
    for step in range(60):
        torch.manual_seed(step)
        stats = scst_step(policy, policy.model, opt, prompts, rewards, {"tok": 1.0}, cfg)
    after = _mean_reward(policy, policy.model, rewards, prompts)
    assert after > before + 0.2, (before, after)
    assert set(stats) >= {"loss", "reward", "grad_norm", "score/tok"}


def test_kl_term_uses_the_adapter_free_base(tiny_causal):
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=2, alpha=4, dropout=0.0), "causal"))
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    rewards = LocalRewards({"tok": vowel_start})
    cfg = TrainingConfig(batch_size=2, k=2, max_new_tokens=4, kl_coef=0.1)
    first = scst_step(policy, policy.model, opt, ["I feel stuck", "My dog"], rewards, {"tok": 1.0}, cfg)
    assert abs(first["kl"]) < 1e-6  # LoRA B starts at zero: policy == reference
    for _ in range(3):
        last = scst_step(policy, policy.model, opt, ["I feel stuck", "My dog"], rewards, {"tok": 1.0}, cfg)
    assert last["kl"] > 0
    faithful = scst_step(policy, policy.model, opt, ["I feel stuck"], rewards, {"tok": 1.0}, cfg, faithful=True)
    assert faithful["kl"] != faithful["kl"]  # NaN: the authors' KL is a no-op, not computed


def test_authors_postprocess_keeps_segments_before_the_last_cls():
    assert authors_postprocess("You feel lost.") == "You feel lost."
    assert authors_postprocess("You feel lost. [CLS] It hurts. [CLS] and then") == "You feel lost. It hurts."
    assert authors_postprocess("[CLS]") == ""


def test_faithful_step_trains_on_retokenised_text_with_cls_and_no_eos(tiny_causal, tiny_t5):
    for model_dir in (tiny_causal, tiny_t5):
        policy = Policy(ModelConfig(id=model_dir, use_chat_template=False))
        ids, mask = authors_targets(policy, ["you feel lost", "sad"], "cpu")
        assert (ids[mask == 1] != policy.eos_token_id).all()  # the authors never trained EOS
        assert mask[1].sum() < mask[0].sum() and mask[:, 0].all()  # right-padded
        plain = policy.tokenizer("you feel lost", add_special_tokens=False)["input_ids"]
        assert ids[0, :len(plain)].tolist() == plain and mask[0].sum() > len(plain)  # + the "[CLS]" pieces
        policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=2, alpha=4, dropout=0.1), policy.kind))
        opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
        cfg = TrainingConfig(batch_size=2, k=2, max_new_tokens=4, baseline="mean", loss_reduction="sequence_sum")
        by_position = LocalRewards({"pos": lambda prompts, texts: [0.2 + 0.1 * i for i in range(len(texts))]})
        stats = scst_step(policy, policy.model, opt, ["I feel stuck", "My dog"], by_position, {"pos": 1.0}, cfg,
                          faithful=True)
        assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0


def test_bf16_autocast_step_keeps_float32_weights(tiny_causal):
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=2, alpha=4, dropout=0.0), "causal"))
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-2)
    by_position = LocalRewards({"pos": lambda prompts, texts: [0.2 + 0.1 * i for i in range(len(texts))]})
    cfg = TrainingConfig(batch_size=2, k=2, max_new_tokens=4, precision="bf16")
    stats = scst_step(policy, policy.model, opt, ["I feel stuck", "My dog"], by_position, {"pos": 1.0}, cfg)
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())


def test_gradient_scaler_path(tiny_causal):
    """The fp16 path's scaler (unscale, clip, step, update) on CPU with a CPU scaler."""
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=2, alpha=4, dropout=0.0), "causal"))
    params = [p for p in policy.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    by_position = LocalRewards({"pos": lambda prompts, texts: [0.2 + 0.1 * i for i in range(len(texts))]})
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    stats = scst_step(policy, policy.model, opt, ["I feel stuck", "My dog"], by_position, {"pos": 1.0},
                      TrainingConfig(batch_size=2, k=2, max_new_tokens=4), scaler=scaler)
    assert 0 < stats["grad_norm"] < 1024  # unscaled before clipping
    assert any(not torch.equal(a, b) for a, b in zip(before, params))


def test_checkpoint_checksums_catch_damage(tmp_path, tiny_causal):
    from emorl_ray.training.checkpoint import CorruptCheckpoint, load_checkpoint, save_checkpoint, verify_checkpoint

    policy = Policy(ModelConfig(id=str(tiny_causal), use_chat_template=False))
    model = get_peft_model(policy.model, lora_config(LoraConfig(), policy.kind))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(tmp_path, model, opt, {"step": 2}, [{"step": 1}], lora=True)
    verify_checkpoint(tmp_path)
    assert load_checkpoint(tmp_path, model, opt, lora=True)[0] == {"step": 2}
    (tmp_path / "history.jsonl").write_text('{"step": 9}\n')
    with pytest.raises(CorruptCheckpoint, match="history.jsonl"):
        load_checkpoint(tmp_path, model, opt, lora=True)
    (tmp_path / "state.json").unlink()
    with pytest.raises(CorruptCheckpoint, match="no state.json"):
        verify_checkpoint(tmp_path)



def test_response_logprobs_and_their_gradients_with_and_without_checkpointing(tiny_config):
    """token_logprobs projects only the response positions; it must equal log-softmax over the full
    logits, and gradient checkpointing must change memory, not gradients."""
    import dataclasses

    from emorl_ray.training.loop import build_trainable
    from emorl_ray.training.scst import response_logits, token_logprobs

    grads = []
    for checkpointing in (False, True):
        cfg = dataclasses.replace(tiny_config, training=dataclasses.replace(
            tiny_config.training, gradient_checkpointing=checkpointing, lora=LoraConfig(r=2, alpha=4, dropout=0.0)))
        torch.manual_seed(0)
        policy, _ = build_trainable(cfg, "cpu")
        model = policy.model
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
        for n, p in model.named_parameters():  # LoRA B starts at 0; make the adapter do something
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
        model.train()
        enc = policy.encode(["I feel stuck at work and nobody listens", "My dog"])  # left padding
        ids = torch.randint(3, 50, (2, 5), generator=torch.Generator().manual_seed(2))
        mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        logp = token_logprobs(response_logits(policy, model, enc, ids, mask), ids, mask)
        full = torch.cat([enc["input_ids"], ids], 1)
        attn = torch.cat([enc["attention_mask"], mask], 1)
        with torch.no_grad():
            logits = model(input_ids=full, attention_mask=attn, position_ids=(attn.cumsum(1) - 1).clamp(min=0)).logits
        P = enc["input_ids"].shape[1]
        expected = logits[:, P - 1:-1].log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
        torch.testing.assert_close(logp, expected, atol=1e-5, rtol=1e-5)
        logp.sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-5, rtol=1e-4, msg=n)


@pytest.mark.parametrize("k,T", [(2, 5), (3, 4), (2, 1)])
def test_shared_prompt_pass_gives_the_full_pass_logits_and_gradients(tiny_causal, k, T):
    """Each prompt passed once for its k responses (left-padded prompts of different lengths,
    responses ended early): the logits and the LoRA gradients of the full pass, for both the
    policy and the adapter-free base."""
    from emorl_ray.training.scst import kl_to_base, response_logits

    policy = _perturbed_lora_policy(tiny_causal, dropout=0.0)
    model = policy.model.eval()
    once = policy.encode(["I feel stuck at work and nobody listens to me", "My dog"])
    enc = {key: v.repeat_interleave(k, dim=0) for key, v in once.items()}
    ids = torch.randint(3, 50, (2 * k, T), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, T // 2 + 1:] = 0
    mask[-1, 1:] = 0
    out = []
    for repeats in (1, k):
        model.zero_grad()
        logits = response_logits(policy, model, enc, ids, mask, repeats)
        logp = logits.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
        kl = kl_to_base(policy, model, enc, ids, mask, logits, 0.8, repeats=repeats)
        (logp.sum() + kl).backward()
        out.append((logits.detach(), kl.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                   if p.requires_grad}))
    (full, kl_full, g_full), (shared, kl_shared, g_shared) = out
    assert shared.shape == full.shape == (2 * k, T, model.config.vocab_size)
    torch.testing.assert_close(shared, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kl_shared, kl_full, atol=1e-6, rtol=1e-5)
    assert g_full and any(g.abs().max() > 0 for g in g_full.values())
    for n in g_full:
        torch.testing.assert_close(g_shared[n], g_full[n], atol=1e-5, rtol=1e-4, msg=n)


def test_the_loss_shares_prompt_passes_only_where_exact(tiny_config):
    import dataclasses

    from emorl_ray.training.loop import build_trainable
    from emorl_ray.training.scst import shares_prompt_pass

    t = dataclasses.replace(tiny_config.training, k=2)
    policy, _ = build_trainable(tiny_config, "cpu")
    assert shares_prompt_pass(policy.model, t, faithful=False)
    assert not shares_prompt_pass(policy.model, t, faithful=True)  # dropout masks per sample
    assert not shares_prompt_pass(policy.model, dataclasses.replace(t, k=1), faithful=False)
    assert not shares_prompt_pass(policy.model, dataclasses.replace(t, gradient_checkpointing=True), False)
    ddp = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    assert not shares_prompt_pass(ddp, t, faithful=False)  # a wrapper: asked before its model is read


def _perturbed_lora_policy(tiny_causal, dropout: float):
    """A tiny policy whose LoRA adapter does something (B starts at 0) and has dropout."""
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    torch.manual_seed(0)
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=4, alpha=8, dropout=dropout), "causal"))
    for n, p in policy.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.3, generator=torch.Generator().manual_seed(1))
    return policy


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)],
                         ids=["plain", "warped"])
def test_loss_logprobs_are_the_samplers_own(tiny_causal, sampling):
    """On-policy: the loss scores each sampled token under the distribution it was drawn from, in
    the same (eval) mode, although the adapter has dropout and the model is in train mode."""
    from emorl_ray.training.scst import response_logits, scoring_mode, token_logprobs

    policy = _perturbed_lora_policy(tiny_causal, dropout=0.5)
    model = policy.model.train()
    torch.manual_seed(3)
    roll = sample(policy, model, ["I feel stuck at work", "My dog died"], k=3, max_new_tokens=8,
                  sampling=sampling, return_logprobs=True)
    assert model.training  # sample() restores the mode
    for repeats in (1, 3):  # the full pass, and each prompt passed once for its 3 samples
        with torch.no_grad(), scoring_mode(model, dropout=False):
            logp = token_logprobs(response_logits(policy, model, roll.enc, roll.response_ids, roll.response_mask,
                                                  repeats), roll.response_ids, roll.response_mask, sampling)
        assert torch.isfinite(logp).all() and (logp <= 0).all()
        torch.testing.assert_close(logp, roll.logprobs, atol=1e-4, rtol=1e-4)
    if sampling.top_k:  # truncation matters: the plain softmax gives other (lower) log-probs
        with torch.no_grad(), scoring_mode(model, dropout=False):
            plain = token_logprobs(response_logits(policy, model, roll.enc, roll.response_ids, roll.response_mask),
                                   roll.response_ids, roll.response_mask)
        assert (plain < roll.logprobs - 1e-3).any()
    # The authors' train-mode forward (dropout on) scores something else.
    with torch.no_grad(), scoring_mode(model, dropout=True):
        noisy = token_logprobs(response_logits(policy, model, roll.enc, roll.response_ids, roll.response_mask),
                               roll.response_ids, roll.response_mask, sampling)
    assert not torch.allclose(noisy, roll.logprobs, atol=1e-3)


def test_rollouts_decode_the_adapter_as_it_trains(tiny_causal):
    """Rollouts and validation decode through the stacked LoRA product (`adapter_routing`), kept
    per model and refreshed before every decode: after the weights change, the sampler's log-probs
    are still the loss's, and greedy decoding gives peft's own tokens."""
    from emorl_ray.decoding.engine import generate_texts
    from emorl_ray.ensemble.stacked_lora import StackedLoRA
    from emorl_ray.training.scst import adapter_routing, response_logits, scoring_mode, token_logprobs

    policy = _perturbed_lora_policy(tiny_causal, dropout=0.1)
    model = policy.model
    stack = adapter_routing(model)
    assert isinstance(stack, StackedLoRA) and adapter_routing(model) is stack  # one per model
    assert not isinstance(adapter_routing(model, dropout=True), StackedLoRA)  # the authors' sampling
    prompts = ["I feel stuck at work", "My dog died"]
    for update in range(2):
        if update:  # an optimizer step, as far as the decode can tell
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if "lora_" in n:
                        p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.3)
        torch.manual_seed(3)
        roll = sample(policy, model, prompts, k=2, max_new_tokens=8, sampling=SamplingConfig(), return_logprobs=True)
        with torch.no_grad(), scoring_mode(model, dropout=False):
            logp = token_logprobs(response_logits(policy, model, roll.enc, roll.response_ids, roll.response_mask),
                                  roll.response_ids, roll.response_mask, SamplingConfig())
        torch.testing.assert_close(logp, roll.logprobs, atol=1e-4, rtol=1e-4)
        with adapter_routing(model):
            stacked = generate_texts(policy, model, prompts, 8)
        assert stacked == generate_texts(policy, model, prompts, 8)  # peft's forward


def test_graph_rollouts_follow_the_adapter_without_recompiling(tiny_causal):
    """Rollouts with `model.decode_step: graph` (the GPU config): the eager tokens and log-probs,
    and after a weight update the same compiled step reads the refreshed stacks."""
    import copy
    import dataclasses

    policy = _perturbed_lora_policy(tiny_causal, dropout=0.0)
    graph = copy.copy(policy)
    graph.cfg = dataclasses.replace(policy.cfg, decode_step="graph")
    from emorl_ray.decoding.static import compile_counts, static_decoder

    counts = [compile_counts()]
    for update in range(2):
        if update:
            with torch.no_grad():
                for n, p in policy.model.named_parameters():
                    if "lora_B" in n:
                        p.mul_(-1.5)
        rolls = []
        for who in (policy, graph):
            torch.manual_seed(5)
            rolls.append(sample(who, policy.model, ["I feel stuck at work", "My dog died"], k=2, max_new_tokens=6,
                                sampling=SamplingConfig(temperature=0.9), return_logprobs=True))
        counts.append(compile_counts())
        assert torch.equal(rolls[0].response_ids, rolls[1].response_ids)
        torch.testing.assert_close(rolls[0].logprobs, rolls[1].logprobs, atol=1e-5, rtol=1e-5)
    # the compiled step (in one piece), replayed after the update without compiling again
    assert static_decoder(policy.model, compiled=True).caches
    assert counts[1]["graph_breaks"] == counts[0]["graph_breaks"] and counts[2] == counts[1]


def test_kl_gradient_is_nonzero_and_matches_finite_differences(tiny_causal):
    """The KL penalty to the adapter-free base carries a gradient (the authors' had none), and it is
    the gradient of the value the step adds to the loss (deterministic: no dropout in the forwards)."""
    from emorl_ray.training.scst import kl_to_base, response_logits, scoring_mode

    policy = _perturbed_lora_policy(tiny_causal, dropout=0.3)
    model = policy.model.train()
    torch.manual_seed(4)
    roll = sample(policy, model, ["I feel stuck at work", "My dog died"], k=2, max_new_tokens=6,
                  sampling=SamplingConfig())
    param = next(p for n, p in model.named_parameters() if "lora_A" in n)

    def kl() -> torch.Tensor:
        with scoring_mode(model, dropout=False):
            logits = response_logits(policy, model, roll.enc, roll.response_ids, roll.response_mask)
            return kl_to_base(policy, model, roll.enc, roll.response_ids, roll.response_mask, logits, 0.8)

    value = kl()
    assert value.item() > 0
    (grad,) = torch.autograd.grad(value, param)
    assert grad.abs().max() > 0
    # Central differences along a fixed random direction, in float64 to keep rounding out of it.
    model.double()
    direction = torch.randn(param.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    eps = 1e-4
    with torch.no_grad():
        param.add_(eps * direction)
        up = kl().item()
        param.sub_(2 * eps * direction)
        down = kl().item()
        param.add_(eps * direction)
    fd = (up - down) / (2 * eps)
    assert fd == pytest.approx((grad.double() * direction).sum().item(), rel=2e-2, abs=1e-7)


def test_checkpointed_step_is_the_plain_step_with_lora_dropout(tiny_config):
    """Eval-mode loss forwards and gradient checkpointing together: the backward pass re-runs each
    layer in the mode it ran in (no dropout), so the update equals the one without checkpointing,
    even for a model left in train mode with LoRA dropout 0.5."""
    import dataclasses

    from emorl_ray.training.loop import build_trainable

    after = []
    for checkpointing in (False, True):
        t = dataclasses.replace(tiny_config.training, gradient_checkpointing=checkpointing, kl_coef=0.1,
                                lora=LoraConfig(r=2, alpha=4, dropout=0.5))
        torch.manual_seed(0)
        policy, opt = build_trainable(dataclasses.replace(tiny_config, training=t), "cpu")
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5, generator=torch.Generator().manual_seed(1))
        policy.model.train()
        torch.manual_seed(5)
        scst_step(policy, policy.model, opt, ["I feel stuck at work", "My dog"], LocalRewards({"v": vowel_start}),
                  {"v": 1.0}, t)
        after.append({n: p.detach().clone() for n, p in policy.model.named_parameters() if p.requires_grad})
    for n in after[0]:
        torch.testing.assert_close(after[0][n], after[1][n], atol=1e-5, rtol=1e-4, msg=n)
