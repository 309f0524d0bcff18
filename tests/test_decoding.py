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


def test_random_stand_in_has_the_shape_and_the_tokenizer(tiny_causal, tmp_path):
    """bench/random_model.py's stand-ins (for GPU nodes without the weights): the named
    architecture, the given tokenizer, loadable as a policy; a static-cache decode of it gives the
    dynamic cache's tokens."""
    from transformers import AutoConfig

    from emorl_ray.testing import MODEL_SHAPES, build_random_model

    path = build_random_model(tmp_path / "small", "small", tiny_causal, dtype="bfloat16")
    conf = AutoConfig.from_pretrained(path)
    assert (conf.hidden_size, conf.num_hidden_layers, conf.vocab_size) == (192, 6, MODEL_SHAPES["small"]["vocab_size"])
    ids = {}
    for step in ("eager", "static"):
        policy = Policy(ModelConfig(id=path, use_chat_template=False, decode_step=step))
        assert policy.tokenizer.get_vocab() == Policy(ModelConfig(id=tiny_causal)).tokenizer.get_vocab()
        ids[step] = decode(policy, policy.model.eval(), PROMPTS, 6).ids
    assert torch.equal(ids["static"], ids["eager"]) and ids["eager"].unique().numel() > 3
    with pytest.raises(ValueError, match="shape must be one of"):
        build_random_model(tmp_path / "x", "gpt-5", tiny_causal)


# prompts and a token they both reach early on the seeded tiny model (greedy, or sampled with seed 3)
ENDING = {"greedy": ([PROMPTS[1], PROMPTS[4]], 213), "sampled": ([PROMPTS[0], PROMPTS[2]], 25)}


class EndingAt(Policy):
    """A policy whose EOS is a token of our choosing (to end rows early on a random model)."""

    def __init__(self, model_config: ModelConfig, eos: int, device: str = "cpu"):
        super().__init__(model_config, device)
        self.eos = eos

    @property
    def eos_token_id(self) -> int:
        return self.eos


@pytest.mark.parametrize("how", ["greedy", "sampled"])
def test_a_trailing_stop_check_changes_no_token(how, tiny_causal, monkeypatch):
    """On a GPU the stop check reads the previous step's flag (`StopCheck`, lag 1), so that the host
    never waits for the device mid-decode, and the decode runs one step past the longest row.
    Forced onto the CPU here, on two rows that end at different steps before the last: the same
    tokens, masks, ends and log-probs as the check read at once."""
    from emorl_ray.decoding import engine

    prompts, eos = ENDING[how]
    policy = EndingAt(ModelConfig(id=tiny_causal, use_chat_template=False), eos)
    model = policy.model.eval()

    def run():
        sampling = None if how == "greedy" else Sampling(0.9, 20, 1.0, torch.Generator().manual_seed(3))
        return decode(policy, model, prompts, 16, sampling=sampling, return_logprobs=True)

    at_once = run()
    monkeypatch.setitem(engine.STOP_CHECK_LAG, "cpu", 1)
    trailing = run()
    lengths = at_once.mask.sum(1).tolist()
    assert at_once.ended.all() and len(set(lengths)) == 2 and at_once.ids.shape[1] == max(lengths) < 16
    for field in ("ids", "mask", "ended", "logprobs"):
        assert torch.equal(getattr(trailing, field), getattr(at_once, field)), field


@pytest.mark.parametrize("decode_step", ["eager", "static"])
def test_a_decode_of_t_tokens_runs_the_decoder_t_times(decode_step, tiny_causal):
    """The prompt pass, then one step per token after the first: no pass for a token past the budget."""
    policy = EndingAt(ModelConfig(id=tiny_causal, use_chat_template=False, decode_step=decode_step), eos=-1)
    model = policy.model.eval()
    calls = []
    handle = model.get_decoder().register_forward_hook(lambda *_: calls.append(1))
    try:
        out = decode(policy, model, PROMPTS[:2], 7)
    finally:
        handle.remove()
    assert out.ids.shape == (2, 7) and not out.ended.any()
    assert len(calls) == 7
