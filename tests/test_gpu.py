"""The GPU paths: the same unit checks on CUDA tensors. Skipped (with the reason) where no CUDA
device is visible, so the suite passes on CPU-only machines; run `pytest -m gpu` on a GPU node."""

import pytest
import torch
from peft import get_peft_model

from emorl_ray.config import LoraConfig, ModelConfig, TrainingConfig
from emorl_ray.models import Policy, lora_config
from emorl_ray.rewards import LocalRewards
from emorl_ray.testing import vowel_start

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (torch.cuda.is_available())")]

PROMPTS = ["I feel stuck at work", "My dog died last week", "Nobody listens to me", "I can't sleep"]


@pytest.mark.parametrize("decode_step", ["eager", "graph"])
@pytest.mark.parametrize("prefill_cache_mb", [0, 64])
@pytest.mark.parametrize("aggregation", ["hidden_state", "logit", "parameter"])
def test_ensemble_decodes_on_cuda_greedy_and_seeded(tiny_causal, tmp_path, aggregation, prefill_cache_mb,
                                                    decode_step):
    """"graph": the static KV cache's step captured as CUDA graphs (decoding.static) and replayed."""
    import dataclasses

    from test_ensemble import _random_adapters

    from emorl_ray.decoding.static import compile_counts, static_decoder
    from emorl_ray.ensemble.adapter_ensemble import AdapterEnsemble

    before = compile_counts()
    mc, adapters = _random_adapters(tiny_causal, tmp_path)
    ens = AdapterEnsemble(Policy(dataclasses.replace(mc, decode_step=decode_step), "cuda"), adapters,
                          prefill_cache_mb=prefill_cache_mb)
    cpu = AdapterEnsemble(Policy(mc, "cpu"), adapters)
    w = {"a": 0.2, "b": 0.5, "c": 0.3}
    greedy = ens.generate(PROMPTS, w, 8, aggregation=aggregation)
    assert greedy == cpu.generate(PROMPTS, w, 8, aggregation=aggregation)
    # 3 prompts: the fixed-shape step pads each block to 4 rows and drops the copies' outputs
    assert ens.generate(PROMPTS[:3], w, 8, aggregation=aggregation) == \
        cpu.generate(PROMPTS[:3], w, 8, aggregation=aggregation)
    sampled = [ens.generate(PROMPTS, w, 8, greedy=False, seed=7, top_k=5, top_p=0.9, aggregation=aggregation)
               for _ in range(2)]
    assert sampled[0] == sampled[1]  # the seed reproduces on the device's own generator
    rows = [w, [1, 0, 0], [0, 1, 1], w]
    assert ens.generate(PROMPTS, rows, 8, aggregation=aggregation) == \
        [ens.generate([p], r, 8, aggregation=aggregation)[0] for p, r in zip(PROMPTS, rows)]
    after = compile_counts()
    assert bool(static_decoder(ens.model, compiled=True).caches) == (decode_step == "graph")
    # every compiled step captured as a CUDA graph, in one piece (torch only logs a skipped capture)
    assert after["cudagraph_skips"] == before["cudagraph_skips"]
    assert after["graph_breaks"] == before["graph_breaks"]


@pytest.mark.parametrize("decode_step", ["eager", "graph"])
def test_the_trailing_stop_check_on_cuda_changes_no_token(tiny_causal, decode_step):
    """On CUDA the stop check reads the step before's flag (an event, not a wait for the device):
    two rows that end at different steps give the CPU's tokens, and the decode's last column is
    the longest row's EOS."""
    import dataclasses

    from test_decoding import ENDING, EndingAt

    from emorl_ray.decoding.engine import STOP_CHECK_LAG, decode

    assert STOP_CHECK_LAG["cuda"] == 1
    prompts, eos = ENDING["greedy"]
    mc = ModelConfig(id=tiny_causal, use_chat_template=False)
    cpu = EndingAt(mc, eos)
    gpu = EndingAt(dataclasses.replace(mc, decode_step=decode_step), eos, "cuda")
    want = decode(cpu, cpu.model.eval(), prompts, 16)
    got = decode(gpu, gpu.model.eval(), prompts, 16)
    assert want.ended.all() and want.ids.shape[1] < 16
    assert torch.equal(got.ids.cpu(), want.ids) and torch.equal(got.mask.cpu(), want.mask)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_scst_step_on_cuda(tiny_causal, precision):
    from emorl_ray.training.scst import scst_step

    policy = Policy(ModelConfig(id=tiny_causal, use_chat_template=False), "cuda")
    policy.model = get_peft_model(policy.model, lora_config(LoraConfig(r=4, alpha=8, dropout=0.1), "causal"))
    cfg = TrainingConfig(k=2, max_new_tokens=6, kl_coef=0.05, precision=precision)
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    stats = scst_step(policy, policy.model, opt, PROMPTS[:2], LocalRewards({"v": vowel_start}), {"v": 1.0}, cfg,
                      scaler=scaler)
    assert all(v == v for k, v in stats.items() if k != "kl") and stats["kl"] >= 0


def test_scorers_on_cuda_match_cpu(tiny_causal):
    """The scorers that load a model run on the device their replica reserved (`num_gpus`), with
    and without the fluency scorer's kept prompt passes."""
    from emorl_ray.rewards.fluency import PerplexityFluency
    from emorl_ray.rewards.similarity import EmbeddingSimilarity

    mc = ModelConfig(id=tiny_causal, use_chat_template=False)
    responses = ["It sounds hard", "You miss him", "", "Sleep matters to you"]
    cpu = PerplexityFluency("policy", mc, cap=1e6).perplexities(PROMPTS, responses)
    for cache_mb in (0, 16):
        gpu = PerplexityFluency("policy", mc, cap=1e6, device="cuda", context_cache_mb=cache_mb)
        assert next(gpu.model.parameters()).is_cuda
        for _ in range(2):  # the second time from the kept passes
            assert gpu.perplexities(PROMPTS, responses) == pytest.approx(cpu, rel=1e-3)
    encoder = EmbeddingSimilarity(tiny_causal, device="cuda")
    assert next(encoder.model.parameters()).is_cuda
    assert encoder(PROMPTS, responses) == pytest.approx(EmbeddingSimilarity(tiny_causal)(PROMPTS, responses), abs=1e-4)


def pipeline_then_endpoint(tiny_causal, tmp_path, gpu: bool = True) -> None:
    """The whole pipeline on one node with the trainers, the scorers and the evaluator each on a
    fraction of the GPU and every decode a replayed CUDA graph (the seeded sampled evaluation
    crashed there once); then the run's adapters behind the HTTP endpoint on the GPU, greedy and
    seeded sampled requests. `gpu=False` runs the same on the CPU (to check the test itself)."""
    import json
    from pathlib import Path

    import ray
    from conftest import free_port, tiny_raw_config
    from ray import serve
    from test_http import _post

    from emorl_ray.config import parse_config
    from emorl_ray.ensemble.http import deploy_http
    from emorl_ray.pipeline import run_pipeline

    fraction = 0.2 if gpu else 0
    raw = tiny_raw_config(tiny_causal, tmp_path / "runs", scaling={
        "num_workers": 1, "cpus_per_worker": 0.3, "use_gpu": gpu, **({"gpus_per_worker": fraction} if gpu else {})})
    raw["model"]["decode_step"] = "graph" if gpu else "static"
    raw["search"]["evaluator_gpus"] = fraction
    for objective in raw["objectives"].values():
        objective["scorer"]["num_gpus"] = fraction / 4
    port = free_port()
    raw["serving"] = {"port": port, "num_cpus": 0.2, "num_gpus": fraction, "max_new_tokens": 8}
    cfg = parse_config(raw)
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})  # the pipeline joins this Serve
        summary = run_pipeline(cfg)
        run_dir = Path(summary["run_dir"])
        tables = json.loads((run_dir / "eval" / "metrics.json").read_text())["tables"]
        assert {t["decoding"] for t in tables} == {"greedy", "sampled"}
        assert all(m["n_generations"] > 0 for t in tables for m in t["methods"])
        manifest = json.loads((run_dir / "training" / "manifest.json").read_text())["runs"]
        deploy_http(cfg, {m["name"]: m["adapter_path"] for m in manifest})
        url = f"http://127.0.0.1:{port}/emorl/generate"
        for how in ({}, {"greedy": False, "seed": 3, "temperature": 0.8}):
            body = json.dumps({"prompts": ["I feel stuck at work", "My dog died"], "weights": [1, 3], **how}).encode()
            answers = [_post(url, body) for _ in range(2)]
            assert all(status == 200 for status, _ in answers), answers
            assert answers[0][1]["responses"] == answers[1][1]["responses"]  # greedy, or the same seed
    finally:
        ray.shutdown()


@pytest.mark.e2e
def test_pipeline_and_endpoint_on_gpu_fractions(tiny_causal, tmp_path):
    pipeline_then_endpoint(tiny_causal, tmp_path)
