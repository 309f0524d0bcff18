"""k-sample self-critical REINFORCE (k-SCST), the RL step of EMORL stage 1 (docs/method.md §2).

One optimizer step, top to bottom:
  1. sample k responses per prompt (eval mode: no dropout; the authors sampled with dropout on)
     from the warped distribution of `decoding.sampling` (temperature, top-k, top-p);
  2. score each response with the objective's scorer(s) and transform: r = sum_i w_i * f(s_i),
     f = log(clip(s, 1e-4, 0.9999)) or identity;
  3. advantage A = r - baseline, baseline = mean of the k rewards of the same prompt (authors) or
     the mean of the other k-1 (leave-one-out, RLOO: unbiased);
  4. loss = -A * log pi(y | x) on the exact sampled token ids (EOS included, pads masked), summed
     per sequence (authors) or averaged over tokens, where pi is the distribution the tokens were
     sampled from (same warping, same eval mode: on-policy); plus an optional KL penalty to the
     frozen base model (the adapter switched off), with gradient;
  5. clip the gradient norm, AdamW step.

`faithful=True` reproduces the authors' step where it differs (docs/method.md §8.1-8.5): dropout on while
sampling and in the loss, no KL, the loss under the full softmax at temperature 1 whatever was
sampled, and on the re-tokenised text + " [CLS]" (EOS never trained) with the prompt re-encoded
to 512 tokens instead of the generation limit.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass

import torch

from emorl_ray.config import SamplingConfig, TrainingConfig
from emorl_ray.decoding.engine import Sampling, decode, eval_mode, prefill
from emorl_ray.decoding.prefill import can_prefill_apart, positions
from emorl_ray.decoding.sampling import warp_logits
from emorl_ray.ensemble.stacked_lora import StackedLoRA
from emorl_ray.models import Policy

SCORE_FLOOR, SCORE_CEIL = 1e-4, 0.9999


@dataclass
class Rollout:
    prompts: list[str]            # B * k, each prompt repeated k times (prompt-major)
    enc: dict[str, torch.Tensor]  # the encoded prompts, repeated the same way
    response_ids: torch.Tensor    # (B*k, T) sampled ids, padded after EOS
    response_mask: torch.Tensor   # (B*k, T) 1 up to and including the first EOS
    texts: list[str]
    logprobs: torch.Tensor | None = None  # (B*k, T) the sampler's own log-probs, if asked for


_stacks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_routing(model, dropout: bool = False):
    """The context of the policy's decodes (rollouts, validation): its LoRA adapter as one stacked
    product per layer (`ensemble.stacked_lora`, the ensemble's with K = 1), brought up to the
    adapter's current weights. The same function as peft's forward up to rounding, with a fraction
    of its per-layer Python and, on a CPU, the weight-first product of a decode step's few rows
    (`decoding.engine.linear`). peft's forward where the stack does not apply: dropout on (the
    authors' sampling), no adapter, several active, or kinds the stack does not cover (DoRA, ...)."""
    from peft import PeftModel

    names = list(model.active_adapters) if isinstance(model, PeftModel) else []
    if dropout or len(names) != 1 or not StackedLoRA.supported(model, names):
        return contextlib.nullcontext()
    stack = _stacks.get(model)
    if stack is None or stack.names != names:
        stack = _stacks[model] = StackedLoRA(model, names)
        return stack
    return stack.refresh()


@torch.no_grad()
def sample(policy: Policy, model, prompts: list[str], k: int, max_new_tokens: int, sampling: SamplingConfig,
           dropout: bool = False, return_logprobs: bool = False) -> Rollout:
    """k responses per prompt from the decode engine, drawn from `warp_logits(logits, sampling)`:
    the distribution `token_logprobs` scores. Eval mode (train mode with `dropout`: the authors')."""
    repeated = [p for p in prompts for _ in range(k)]
    # Each prompt encoded once, its rows repeated: the decode and the loss read the same encoding.
    once = policy.encode(prompts)
    enc = {key: v.repeat_interleave(k, dim=0) for key, v in once.items()}
    how = Sampling(sampling.temperature, sampling.top_k, sampling.top_p)
    with eval_mode(model, dropout), adapter_routing(model, dropout):
        # ... and passed once: its k samples start from the same prefill (with dropout on, each
        # sample draws its own masks over the prompt too, as the authors' did).
        pre = None if dropout or not can_prefill_apart(model) else prefill(model, once).repeat_interleave(k)
        out = decode(policy, model, repeated, max_new_tokens, sampling=how, return_logprobs=return_logprobs,
                     enc=enc, prefilled=pre)
    return Rollout(repeated, enc, out.ids, out.mask, policy.decode(out.ids), out.logprobs)


CLS = "[CLS]"
AUTHORS_LOSS_PROMPT_TOKENS = 512
AUTHORS_TARGET_TOKENS = 128


def authors_postprocess(text: str) -> str:
    """DynaOpt's post-processing kept by EMORL (docs/method.md §1): keep the segments before the last "[CLS]"."""
    if CLS not in text:
        return text.strip()
    return " ".join(seg.strip() for seg in text.split(CLS)[:-1] if seg.strip())


def authors_targets(policy: Policy, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The authors' loss targets (docs/method.md §8.3): `text + " [CLS]"` re-tokenised, no EOS, right-padded."""
    enc = policy.tokenizer([t + " " + CLS for t in texts], return_tensors="pt", padding=True, truncation=True,
                           max_length=AUTHORS_TARGET_TOKENS, add_special_tokens=False, padding_side="right")
    ids = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, policy.pad_token_id)
    return ids.to(device), enc["attention_mask"].to(device)


def response_logits(policy: Policy, model, enc: dict, ids: torch.Tensor, mask: torch.Tensor,
                    repeats: int = 1) -> torch.Tensor:
    """The logits that predict each response token, (N, T, V), by teacher forcing. `repeats`: the
    rows are each prompt `repeats` times in a row (a k-SCST batch, `shares_prompt_pass`); the
    prompt is then passed once and its responses continue from that pass (`_after_shared_prompt`)."""
    if policy.is_seq2seq:
        start = torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
        return model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                     decoder_input_ids=torch.cat([start, ids[:, :-1]], 1),
                     decoder_attention_mask=torch.cat([torch.ones_like(start), mask[:, :-1]], 1)).logits
    if repeats > 1:
        return _after_shared_prompt(model, enc, ids, mask, repeats)
    full = torch.cat([enc["input_ids"], ids], 1)
    attn = torch.cat([enc["attention_mask"], mask], 1)
    # Positions from the mask, as `generate` does, so left padding scores like sampling did.
    pos = positions(attn)
    # Only the positions that predict response tokens go through the LM head: the prompt's
    # full-vocabulary logits would be computed, kept for backward and thrown away.
    T = ids.shape[1]
    return model(input_ids=full, attention_mask=attn, position_ids=pos, logits_to_keep=T + 1).logits[:, :-1]


def shares_prompt_pass(model, cfg: TrainingConfig, faithful: bool) -> bool:
    """Whether the loss may pass each prompt once for its k responses. Not with dropout (each of the
    authors' samples drew its own masks over the prompt), nor where the cache cannot carry the
    pass: gradient checkpointing turns Hugging Face's cache off, sliding-window layers keep only
    part of the prompt, and DDP expects one forward per backward."""
    return (cfg.k > 1 and not faithful and not cfg.gradient_checkpointing
            and not isinstance(model, torch.nn.parallel.DistributedDataParallel) and can_prefill_apart(model))


def _after_shared_prompt(model, enc: dict, ids: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """`response_logits` for k responses per prompt: one pass over each prompt, with gradient, then
    the k responses from its keys and values repeated k times. The same function of the weights
    as the full pass (up to rounding), so the same gradient, at 1/k of the prompt's compute: in a
    k-SCST batch the prompt is most of the tokens."""
    prompt_ids, prompt_attn = enc["input_ids"][::k], enc["attention_mask"][::k]
    out = model(input_ids=prompt_ids, attention_mask=prompt_attn, position_ids=positions(prompt_attn),
                use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1:].repeat_interleave(k, dim=0)  # predicts each response's first token
    T = ids.shape[1]
    if T == 1:
        return first
    cache = out.past_key_values
    cache.batch_repeat_interleave(k)  # differentiable: the k copies' gradients add up in the pass
    attn = torch.cat([enc["attention_mask"], mask[:, :-1]], 1)
    rest = model(input_ids=ids[:, :-1], attention_mask=attn, position_ids=positions(attn)[:, -(T - 1):],
                 past_key_values=cache, use_cache=True).logits
    return torch.cat([first, rest], 1)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                   sampling: SamplingConfig | None = None) -> torch.Tensor:
    """log pi(y_t | x, y_<t) for every response token, (N, T), zero where masked, under the
    sampling distribution `warp_logits(logits, sampling)` (None: the plain softmax)."""
    logits = logits.float()
    if sampling is not None:
        logits = warp_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return logp.masked_fill(mask == 0, 0.0)


def transform(scores: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "log":
        return scores.clamp(SCORE_FLOOR, SCORE_CEIL).log()
    return scores


def advantages(rewards: torch.Tensor, k: int, baseline: str) -> torch.Tensor:
    """rewards (B*k,) prompt-major -> advantages (B*k,)."""
    r = rewards.view(-1, k)
    if baseline == "mean":
        b = r.mean(1, keepdim=True)  # includes the sample itself (the authors' k-SCST)
    else:
        b = (r.sum(1, keepdim=True) - r) / (k - 1)  # leave-one-out
    return (r - b).reshape(-1)


def policy_loss(logp: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "sequence_sum":
        return -(adv * logp.sum(1)).mean()
    return -(adv.unsqueeze(1) * logp).sum() / mask.sum().clamp(min=1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) = E[exp(d) - d - 1], d = ref - logp; >= 0."""
    d = (ref_logp - logp) * mask
    return ((torch.exp(d) - d - 1) * mask).sum() / mask.sum().clamp(min=1)


@contextlib.contextmanager
def scoring_mode(model, dropout: bool):
    """The mode of the loss forwards. With `dropout` (the authors'): train mode. Otherwise the mode
    the rollouts were sampled in, eval, so that the scored distribution is the sampled one, except
    that layers doing gradient checkpointing keep their own `training` flag on (Hugging Face only
    checkpoints in train mode; the flag turns no dropout on: that lives in the layers' children)."""
    was_training = model.training
    model.train(dropout)
    if not dropout:
        for m in model.modules():
            if getattr(m, "gradient_checkpointing", False) is True:
                m.training = True
    try:
        yield
    finally:
        model.train(was_training)


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def scst_step(policy: Policy, model, optimizer, prompts: list[str], rewards, reward_weights: dict[str, float],
              cfg: TrainingConfig, faithful: bool = False, gen_model=None, scaler=None) -> dict:
    """One k-SCST update. `model` may be DDP-wrapped; `gen_model` is the plain model for sampling;
    `scaler` a `torch.amp.GradScaler` for fp16."""
    gen_model = gen_model or model
    s = cfg.sampling
    amp = autocast(policy.device, cfg.precision)
    with amp:
        roll = sample(policy, gen_model, prompts, cfg.k, cfg.max_new_tokens, s, dropout=faithful)
    enc, ids, mask, texts = roll.enc, roll.response_ids, roll.response_mask, roll.texts
    if faithful:
        texts = [authors_postprocess(t) for t in texts]
        ids, mask = authors_targets(policy, texts, ids.device)
        enc = policy.encode(roll.prompts, max_length=AUTHORS_LOSS_PROMPT_TOKENS)
    scores = rewards.score_all(roll.prompts, texts, list(reward_weights))
    r = sum(w * transform(torch.tensor(scores[o]), cfg.reward_transform) for o, w in reward_weights.items())
    adv = advantages(r, cfg.k, cfg.baseline).to(ids.device)

    repeats = cfg.k if shares_prompt_pass(model, cfg, faithful) else 1
    # The backward pass stays inside: gradient checkpointing re-runs the forward in the current mode.
    with scoring_mode(model, dropout=faithful):
        with amp:
            logits = response_logits(policy, model, enc, ids, mask, repeats)
        # The authors scored the full softmax at temperature 1 whatever was sampled (docs/method.md §8.5).
        logp = token_logprobs(logits, ids, mask, None if faithful else s)
        loss = policy_loss(logp, mask, adv, cfg.loss_reduction)
        kl = float("nan")
        # The authors' KL term carried no gradient and was multiplied by zero-mean advantages: a no-op.
        if cfg.kl_coef > 0 and not faithful:
            kl_t = kl_to_base(policy, gen_model, enc, ids, mask, logits, s.temperature, amp, repeats)
            loss = loss + cfg.kl_coef * kl_t
            kl = kl_t.item()
        del logits
        optimizer.zero_grad(set_to_none=True)
        params = [p for p in model.parameters() if p.requires_grad]
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()

    stats = {"loss": loss.item(), "reward": float(r.mean()), "kl": kl, "grad_norm": float(grad_norm),
             "response_tokens": float(roll.response_mask.sum(1).float().mean())}
    stats.update({f"weight/{o}": float(w) for o, w in reward_weights.items()})
    for o in reward_weights:
        stats[f"score/{o}"] = float(sum(scores[o]) / len(scores[o]))
    return stats


def kl_to_base(policy: Policy, model, enc: dict, ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor,
               temperature: float, amp=None, repeats: int = 1) -> torch.Tensor:
    """Per-token k3 KL from the policy to the adapter-free base, both at the sampling temperature
    and untruncated (top-k/top-p would leave the base -inf on tokens the policy sampled). Gradient
    through the policy's `logits` only; the base forward runs in the caller's mode (eval: no dropout)."""
    warm = SamplingConfig(temperature=temperature)
    with torch.no_grad(), _adapter_disabled(model), amp or contextlib.nullcontext():
        ref = token_logprobs(response_logits(policy, model, enc, ids, mask, repeats), ids, mask, warm)
    return kl_penalty(token_logprobs(logits, ids, mask, warm), ref, mask)


@contextlib.contextmanager
def _adapter_disabled(model):
    # The reference policy is the base model: the same weights with the LoRA adapter off.
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
    else:
        raise ValueError("training.kl_coef > 0 needs LoRA (the adapter-free base is the reference)")


def converged(history: list[float], window: int, threshold: float) -> bool:
    """The authors' rule: the last `window` validation scores have std / mean < threshold."""
    if len(history) < window:
        return False
    tail = history[-window:]
    mean = sum(tail) / window
    if mean <= 0:
        return False
    std = math.sqrt(sum((x - mean) ** 2 for x in tail) / window)  # population std, as the authors
    return std / mean < threshold
