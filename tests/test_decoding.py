"""The decode engine (`emorl_ray/decoding/engine.py`) that every generation goes through: greedy
decoding agrees with Hugging Face's, and sampled tokens follow the warped distribution the k-SCST
loss scores them under."""

import pytest
import torch

from emorl_ray.config import ModelConfig, SamplingConfig
from emorl_ray.data import read_demo
from emorl_ray.decoding.engine import Sampling, decode, generate_texts
from emorl_ray.decoding.sampling import warp_logits
from emorl_ray.models import Policy

PROMPTS = [r["prompt"] for r in read_demo()[:5]]


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_greedy_decode_is_hugging_faces_greedy_generate(kind, tiny_causal, tiny_t5):
    policy = Policy(ModelConfig(id=tiny_causal if kind == "causal" else tiny_t5, use_chat_template=False))
    enc = policy.encode(PROMPTS)
    out = policy.model.eval().generate(**enc, do_sample=False, max_new_tokens=12, pad_token_id=policy.pad_token_id,
                                       eos_token_id=policy.eos_token_id)
    expected = policy.decode(out[:, 1:] if policy.is_seq2seq else out[:, enc["input_ids"].shape[1]:])
    assert generate_texts(policy, policy.model, PROMPTS, 12, batch_size=2) == expected


def test_sampled_first_tokens_follow_the_warped_distribution(tiny_causal):
    """2,000 draws of the first token at T 0.7, top-k 5, top-p 0.9 against the probabilities
    `warp_logits` gives: every frequency within 0.035 of its probability (4 standard errors at
    p = 0.5), no token outside the kept set, and each draw's log-prob the warped one."""
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False))
    model = policy.model.eval()
    s = SamplingConfig(temperature=0.7, top_k=5, top_p=0.9)
    enc = policy.encode(PROMPTS[:1])
    with torch.no_grad():
        logits = model(**enc).logits[0, -1].float()
    probs = warp_logits(logits, s.temperature, s.top_k, s.top_p).softmax(-1)
    n = 2000
    out = decode(policy, model, PROMPTS[:1] * n, 1, return_logprobs=True,
                 sampling=Sampling(s.temperature, s.top_k, s.top_p, torch.Generator().manual_seed(0)))
    first = out.ids[:, 0]
    freq = torch.bincount(first, minlength=probs.numel()).float() / n
    assert set(first.tolist()) <= set(torch.nonzero(probs).flatten().tolist())
    assert (freq - probs).abs().max() < 0.035
    torch.testing.assert_close(out.logprobs[:, 0], probs.log()[first], atol=1e-4, rtol=1e-4)
