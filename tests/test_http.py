"""The HTTP ensemble endpoint: request validation, and a real Serve HTTP round trip."""

import json
import socket
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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    from conftest import start_local_ray, tiny_raw_config
    from ray import serve
    from test_ensemble import _random_adapters

    from emorl_ray.config import parse_config
    from emorl_ray.ensemble.http import deploy_http

    raw = tiny_raw_config(tiny_causal, tmp_path / "runs")
    port = _free_port()
    raw["serving"] = {"port": port, "num_cpus": 0.5, "max_prompts": 4, "max_new_tokens": 8}
    cfg = parse_config(raw)
    _, adapters = _random_adapters(tiny_causal, tmp_path, names=("overlap", "brevity"))
    start_local_ray()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy_http(cfg, adapters)
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
    finally:
        ray.shutdown()
