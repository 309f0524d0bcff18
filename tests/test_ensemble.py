import dataclasses

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

from emorl_ray.config import ConfigError, LoraConfig, ModelConfig
from emorl_ray.data import read_demo
from emorl_ray.decoding.engine import generate_texts
from emorl_ray.decoding.sampling import choose_token
from emorl_ray.decoding.static import KEPT_CACHES, compile_counts, padded_rows, padding_index, static_decoder
from emorl_ray.ensemble.adapter_ensemble import AdapterEnsemble
from emorl_ray.ensemble.weights import WeightError
from emorl_ray.models import Policy, lora_config

PROMPTS = [r["prompt"] for r in read_demo()[:6]]


def _random_adapters(model_dir, tmp_path, names=("a", "b", "c")):
    mc = ModelConfig(id=model_dir, use_chat_template=False)
    out = {}
    for i, name in enumerate(names):
        p = Policy(mc)
        torch.manual_seed(100 + i)
        m = get_peft_model(p.model, lora_config(LoraConfig(r=4, alpha=16, dropout=0.0), p.kind))
        for n, prm in m.named_parameters():
            if "lora_B" in n:  # B starts at zero: make each adapter really change the model
                torch.nn.init.normal_(prm, std=0.5)
        m.save_pretrained(tmp_path / name)
        out[name] = str(tmp_path / name)
    return mc, out


def _single_greedy(mc, adapter_dir, prompts, n):
    policy = Policy(mc)
    model = PeftModel.from_pretrained(policy.model, adapter_dir).eval()
    enc = policy.encode(prompts)
    out = model.generate(**enc, do_sample=False, max_new_tokens=n, pad_token_id=policy.pad_token_id,
                         eos_token_id=policy.eos_token_id)
    ids = out[:, 1:] if policy.is_seq2seq else out[:, enc["input_ids"].shape[1]:]
    return policy.decode(ids)


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_one_hot_weights_reproduce_each_single_adapter(kind, tiny_causal, tiny_t5, tmp_path):
    mc, adapters = _random_adapters(tiny_causal if kind == "causal" else tiny_t5, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    outputs = {}
    for name in adapters:
        one_hot = {n: float(n == name) for n in adapters}
        outputs[name] = ens.generate(PROMPTS, one_hot, 10)
        assert outputs[name] == _single_greedy(mc, adapters[name], PROMPTS, 10)
    assert len({tuple(v) for v in outputs.values()}) > 1  # the adapters really differ


def test_greedy_output_is_invariant_to_scaling_the_weights(tiny_causal, tmp_path):
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    assert ens.generate(PROMPTS, w, 10) == ens.generate(PROMPTS, {k: 7 * v for k, v in w.items()}, 10)
    assert ens.generate(PROMPTS, list(w.values()), 10) == ens.generate(PROMPTS, w, 10)


@pytest.mark.parametrize("aggregation", ["hidden_state", "logit"])
def test_sampled_output_is_invariant_to_scaling_the_weights(tiny_causal, tmp_path, aggregation):
    """One weight convention: the ensemble decodes with w / sum w, so (1, 1, 1) samples at the
    requested temperature, not at 1/3 of it (logits are linear in h)."""
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    kw = dict(greedy=False, seed=11, temperature=1.3, aggregation=aggregation)
    assert ens.generate(PROMPTS, w, 10, **kw) == ens.generate(PROMPTS, {k: 3 * v for k, v in w.items()}, 10, **kw)
    assert ens.weights_used({k: 3 * v for k, v in w.items()}, aggregation) == pytest.approx(w)
    # ... while the merged adapter of parameter aggregation depends on the scale of w.
    assert ens.weights_used({k: 3 * v for k, v in w.items()}, "parameter") == pytest.approx(
        {k: 3 * v for k, v in w.items()})


@pytest.mark.parametrize("aggregation", ["hidden_state", "logit", "parameter"])
def test_mixed_weight_batch_equals_each_prompt_alone(tiny_causal, tmp_path, aggregation):
    """Each prompt of a batch may carry its own weights; the batch decodes in one forward per step
    (one per distinct vector for parameter aggregation) and gives each prompt the tokens it gets alone."""
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    rows = [{"a": 1.0, "b": 0.0, "c": 0.0}, [0.2, 0.5, 0.3], {"a": 0.0, "b": 2.0, "c": 1.0},
            [1.0, 1.0, 1.0], {"a": 0.0, "b": 0.0, "c": 1.0}, [0.2, 0.5, 0.3]]
    batch = ens.generate(PROMPTS, rows, 10, aggregation=aggregation)
    alone = [ens.generate([p], w, 10, aggregation=aggregation)[0] for p, w in zip(PROMPTS, rows)]
    assert batch == alone
    assert len(set(batch)) > 2  # the rows really decode differently
    with pytest.raises(WeightError, match="5 weight vectors for 6 prompts"):
        ens.generate(PROMPTS, rows[:5], 2)
    with pytest.raises(WeightError, match="all zero"):
        ens.generate(PROMPTS[:2], [[1, 0, 0], [0, 0, 0]], 2)


@pytest.mark.parametrize("aggregation", ["hidden_state", "logit"])
def test_kept_prompt_passes_change_no_token(tiny_causal, tmp_path, aggregation):
    """The prefill cache (a search decodes the same prompts with new weights): every decode gives
    the tokens of an ensemble without it, each adapter's prompt pass is computed once per prompt
    batch whatever the weights and adapter subsets, and the cache stays within its memory."""
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    plain = AdapterEnsemble(Policy(mc), adapters)
    kept = AdapterEnsemble(Policy(mc), adapters, prefill_cache_mb=64)
    sampled = dict(greedy=False, seed=5, temperature=0.9, top_k=20)
    calls = [({"a": 0.2, "b": 0.5, "c": 0.3}, {}), ({"a": 1.0, "b": 0.0, "c": 2.0}, {}),
             ([[1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [2, 1, 0], [1, 0, 0]], {}),
             ({"a": 0.2, "b": 0.5, "c": 0.3}, sampled), (None, {})]
    for w, how in calls:
        for _ in range(2):
            assert kept.generate(PROMPTS, w, 10, aggregation=aggregation, batch_size=4, **how) == \
                plain.generate(PROMPTS, w, 10, aggregation=aggregation, batch_size=4, **how)
    cache = kept.prefills
    # 2 prompt batches (4 + 2 prompts) x (3 adapters + the base model), each computed once
    assert (cache.misses, len(cache.entries)) == (8, 8)
    # every other lookup (2 runs x 2 batches x the 3, 2, 3, 3 and 1 blocks of the calls) came from it
    assert cache.hits == 2 * 2 * (3 + 2 + 3 + 3 + 1) - 8
    assert plain.prefills is None
    small = AdapterEnsemble(Policy(mc), adapters, prefill_cache_mb=1.5 * cache.bytes / 8 / 2**20)
    small.generate(PROMPTS, {"a": 1, "b": 1, "c": 1}, 3, batch_size=4)
    assert 0 < len(small.prefills.entries) < 6 and small.prefills.bytes <= small.prefills.max_bytes


@pytest.mark.parametrize("decode_step", ["static", "graph"])
def test_fixed_shape_decode_steps_give_the_eager_tokens(decode_step, tiny_causal, tmp_path):
    """The static KV cache (`decoding.static`), stepped eagerly or compiled, changes no token: one
    policy, and the ensemble with kept prompt passes and mixed per-row weights, greedy and seeded;
    a decode of a shape seen before reuses its cache. (On a GPU "graph" replays CUDA graphs:
    tests/test_gpu.py.)"""
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    fixed = dataclasses.replace(mc, decode_step=decode_step)
    eager_policy, fixed_policy = Policy(mc), Policy(fixed)
    before = compile_counts()
    assert generate_texts(fixed_policy, fixed_policy.model, PROMPTS, 10, batch_size=6) == \
        generate_texts(eager_policy, eager_policy.model, PROMPTS, 10, batch_size=6)
    eager, static = AdapterEnsemble(Policy(mc), adapters), AdapterEnsemble(Policy(fixed), adapters, prefill_cache_mb=16)
    rows = [[1, 0, 0], [0.2, 0.5, 0.3], [0, 2, 1], [1, 1, 1], [0, 0, 1], [0.2, 0.5, 0.3]]
    for how in ({}, dict(greedy=False, seed=5, temperature=0.9, top_k=20)):
        for _ in range(2):
            assert static.generate(PROMPTS, rows, 10, **how) == eager.generate(PROMPTS, rows, 10, **how)
    assert len(set(eager.generate(PROMPTS, rows, 10))) > 2
    caches = static_decoder(static.model, decode_step == "graph").caches
    # K = 3 blocks of 6 prompts padded to 8 rows each; prompt + 10 tokens rounded up to 64
    assert list(caches) == [(3 * 8, 64)]
    compiled = compile_counts()
    # 5 prompts pad to the same 8 rows a block: the same cache and compiled step, the eager tokens
    assert static.generate(PROMPTS[:5], rows[:5], 10) == eager.generate(PROMPTS[:5], rows[:5], 10)
    assert list(caches) == [(3 * 8, 64)] and compile_counts()["graphs"] == compiled["graphs"]
    assert len(caches) <= KEPT_CACHES
    after = compile_counts()
    assert (after["graphs"] > before["graphs"]) == (decode_step == "graph")
    # one graph for the whole decoder stack: a break would split every step into pieces with Python between
    assert after["graph_breaks"] == before["graph_breaks"]


class HostReads(TorchDispatchMode):
    """Counts the ops that bring a tensor's values to the host (`bool()`, `.item()`, `nonzero`,
    boolean-mask indexing): on a GPU each makes the host wait for the device, which then idles
    while the host launches the next step. (It sees ops only: on a CPU, `.tolist()` runs none and
    goes uncounted.)"""

    OPS = {"_local_scalar_dense", "nonzero", "masked_select", "equal", "_unique2", "unique_dim", "unique_consecutive"}

    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func.overloadpacket.__name__ in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("who", ["hidden_state", "logit", "rollouts"])
def test_a_fixed_shape_decode_reads_the_host_once_a_token(who, tiny_causal, tmp_path):
    """Around the static step (the computation a GPU replays as a graph) the decode loop reads
    nothing on the host but the stop check, once a token: the ensemble with mixed per-row weights,
    greedy and seeded-sampled, and the k-SCST rollouts with their log-probs. Counted as what a
    12-token decode reads more than a 4-token one, so that the once-a-decode reads (the prompt
    pass's mask) cancel. (Eager steps read twice a token: transformers checks the padding mask
    on the host in every forward, `masking_utils._ignore_causal_mask_sdpa`.)"""
    from emorl_ray.config import SamplingConfig
    from emorl_ray.training.scst import sample

    fixed = ModelConfig(id=tiny_causal, use_chat_template=False, decode_step="static")
    if who == "rollouts":
        policy = Policy(fixed)
        model = get_peft_model(policy.model, lora_config(LoraConfig(r=4, alpha=16, dropout=0.0), policy.kind))
        runs = [lambda n: sample(policy, model, PROMPTS[:3], 2, n, SamplingConfig(temperature=0.9, top_k=20),
                                 return_logprobs=True).response_ids.shape[1]]
    else:
        ens = AdapterEnsemble(Policy(fixed), _random_adapters(tiny_causal, tmp_path)[1])
        rows = [[1, 0, 0], [0.2, 0.5, 0.3], [0, 2, 1], [1, 1, 1], [0, 0, 1]]
        runs = [lambda n, how=how: max(d["tokens"] for d in ens.generate(PROMPTS[:5], rows, n, aggregation=who,
                                                                            details=True, **how))
                for how in ({}, dict(greedy=False, seed=5, temperature=0.9, top_k=20, top_p=0.9))]
    for run in runs:
        reads = {}
        for n in (4, 12):
            with HostReads() as counted:
                assert run(n) == n  # no early stop: n steps
            reads[n] = counted.reads
        assert reads[12] - reads[4] == 12 - 4, reads


def test_fixed_shape_steps_pad_each_adapter_block_to_a_few_row_counts():
    assert [padded_rows(b) for b in range(1, 19)] == [1, 2, 4, 4, 8, 8, 8, 8, 16, 16, 16, 16, 16, 16, 16, 16, 24, 24]
    assert padding_index(2, 3, "cpu").tolist() == [0, 1, 2, 2, 3, 4, 5, 5]  # each block's last row again
    assert padding_index(3, 8, "cpu") is None


def test_fixed_shape_steps_need_a_decoder_only_model_and_linear_adapters(tiny_t5, tiny_causal, tmp_path):
    with pytest.raises(ConfigError, match="model.decode_step.*decoder-only"):
        Policy(ModelConfig(id=tiny_t5, decode_step="static"))
    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False, decode_step="static"))
    dora = get_peft_model(policy.model, peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, task_type="CAUSAL_LM"))
    dora.save_pretrained(tmp_path / "dora")
    with pytest.raises(ConfigError, match="model.decode_step.*DoRA"):
        AdapterEnsemble(Policy(ModelConfig(id=tiny_causal, use_chat_template=False, decode_step="static")),
                        {"d": str(tmp_path / "dora")})


def test_base_model_path_matches_plain_generate(tiny_causal, tmp_path):
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    policy = Policy(mc)
    enc = policy.encode(PROMPTS)
    out = policy.model.generate(**enc, do_sample=False, max_new_tokens=8, pad_token_id=policy.pad_token_id,
                                eos_token_id=policy.eos_token_id)
    assert ens.generate(PROMPTS, None, 8) == policy.decode(out[:, enc["input_ids"].shape[1]:])


@pytest.mark.parametrize("weights, msg", [
    ({"a": 0, "b": 0, "c": 0}, "all zero"),
    ({"a": -1, "b": 1, "c": 1}, ">= 0"),
    ({"a": float("nan"), "b": 1, "c": 1}, "finite"),
    ({"a": 1, "b": 1}, "missing"),
    ({"a": 1, "b": 1, "c": 1, "d": 1}, "unknown"),
    ([1.0, 2.0], "2 weights for 3"),
    (["x", 1, 1], "numbers"),
])
def test_bad_weights_are_rejected(tiny_causal, tmp_path, weights, msg):
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    with pytest.raises(WeightError, match=msg):
        ens.generate(PROMPTS[:1], weights, 2)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert choose_token(logits, greedy=True).item() == 2
    draws = {choose_token(logits, False, top_k=1, generator=g).item() for _ in range(20)}
    assert draws == {2}
    draws = {choose_token(logits, False, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    draws = {choose_token(logits, False, top_p=0.5, generator=g).item() for _ in range(50)}
    assert draws == {2}


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_fast_path_equals_the_plain_reference(kind, tiny_causal, tiny_t5, tmp_path):
    """Batched adapters + KV cache give the same tokens as K model copies re-run without a cache."""
    from emorl_ray.ensemble.reference import ReferenceEnsemble

    mc, adapters = _random_adapters(tiny_causal if kind == "causal" else tiny_t5, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    ref = ReferenceEnsemble(Policy(mc), adapters)
    for w in ({"a": 0.2, "b": 0.5, "c": 0.3}, {"a": 1.0, "b": 0.0, "c": 2.0}):
        assert ens.generate(PROMPTS, w, 12) == ref.generate(PROMPTS, w, 12)


@pytest.mark.parametrize("rows", [1, 3, 48, 49, 200])
@pytest.mark.parametrize("bias", [True, False])
def test_skinny_product_is_the_linear_product(rows, bias):
    from emorl_ray.decoding.engine import linear as _linear

    torch.manual_seed(rows)
    x, w = torch.randn(rows, 64), torch.randn(96, 64)
    b = torch.randn(96) if bias else None
    torch.testing.assert_close(_linear(x, w, b), torch.nn.functional.linear(x, w, b))


def test_generate_leaves_the_peft_layers_as_they_were(tiny_causal, tmp_path):
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    enc = ens.policy.encode(PROMPTS)
    before = ens.model(**enc).logits
    for aggregation in ("hidden_state", "logit", "parameter"):
        ens.generate(PROMPTS, {"a": 0.5, "b": 0.3, "c": 0.2}, 4, aggregation=aggregation)
    assert not [n for n, m in ens.model.named_modules() if "forward" in vars(m)]
    assert ens.model.active_adapter == "a" and "__merged__" not in ens.model.peft_config
    torch.testing.assert_close(ens.model(**enc).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["causal", "t5"])
def test_logit_and_parameter_aggregation_run(kind, tiny_causal, tiny_t5, tmp_path):
    mc, adapters = _random_adapters(tiny_causal if kind == "causal" else tiny_t5, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    for agg in ("logit", "parameter"):
        out = ens.generate(PROMPTS, w, 8, aggregation=agg)
        assert len(out) == len(PROMPTS)
        # One-hot weights reduce every aggregation to the single adapter.
        assert ens.generate(PROMPTS, {"a": 0, "b": 1, "c": 0}, 8, aggregation=agg) == \
            ens.generate(PROMPTS, {"a": 0, "b": 1, "c": 0}, 8)
    assert "__merged__" not in ens.model.peft_config  # the merged adapter is temporary
    # Logit mixing is scale-invariant; parameter merging is not.
    assert ens.generate(PROMPTS, w, 8, aggregation="logit") == \
        ens.generate(PROMPTS, {k: 5 * v for k, v in w.items()}, 8, aggregation="logit")
    with pytest.raises(ValueError, match="aggregation"):
        ens.generate(PROMPTS, w, 2, aggregation="soup")


def test_parameter_merge_is_the_exact_weighted_sum_of_deltas(tiny_causal, tmp_path):
    """sum_i w_i B_i A_i, checked against the merged weights of each adapter on its own."""
    from peft import PeftModel

    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    base = Policy(mc).model.state_dict()
    expected = {k: v.clone() for k, v in base.items()}
    for name, path in adapters.items():
        merged = PeftModel.from_pretrained(Policy(mc).model, path).merge_and_unload().state_dict()
        for k in expected:
            expected[k] += w[name] * (merged[k] - base[k])
    ens = AdapterEnsemble(Policy(mc), adapters)
    ens.model.add_weighted_adapter(list(w), list(w.values()), "m", combination_type="cat")
    ens.model.set_adapter("m")
    got = ens.model.merge_and_unload(adapter_names=["m"]).state_dict()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=1e-5, rtol=1e-5)


def test_adapter_directory_without_an_adapter_is_named(tiny_causal, tmp_path):
    mc, adapters = _random_adapters(tiny_causal, tmp_path, names=("a",))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="adapter 'b': .*empty holds no adapter_config.json"):
        AdapterEnsemble(Policy(mc), {"a": adapters["a"], "b": str(tmp_path / "empty")})


def test_reported_weights_are_the_ones_decoded(tiny_causal, tmp_path):
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(mc), adapters)
    assert ens.weights_used([1, 1, 2]) == {"a": 0.25, "b": 0.25, "c": 0.5}
    assert ens.weights_used([1, 1, 2], "parameter") == {"a": 1.0, "b": 1.0, "c": 2.0}
