"""Placement: requests checked against the cluster before anything starts, and multi-node
scheduling on one machine with `ray.cluster_utils.Cluster` (fake nodes with custom resources)."""

import json
import socket

import pyarrow.parquet as pq
import pytest
from conftest import tiny_raw_config

from emorl_ray.config import ConfigError, parse_config
from emorl_ray.placement import check_fits, resource_requests

NODES = [{"CPU": 8.0}, {"CPU": 16.0, "GPU": 8.0, "trainer_node": 1.0}]


def test_requests_that_fit_pass(tiny_causal, tmp_path):
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["training"]["scaling"] = {"num_workers": 4, "use_gpu": True, "gpus_per_worker": 0.5, "cpus_per_worker": 2,
                                  "resources": {"trainer_node": 0.25}}
    raw["objectives"]["overlap"]["scorer"].update(num_gpus=0.5, num_replicas=2)
    cfg = parse_config(raw)
    requests = dict((f, (r, n)) for f, r, n in resource_requests(cfg))
    assert requests["training.scaling"] == ({"CPU": 2, "GPU": 0.5, "trainer_node": 0.25}, 4)
    assert requests["objectives.overlap.scorer"] == ({"CPU": 0.05, "GPU": 0.5}, 2)
    check_fits(resource_requests(cfg), NODES)


@pytest.mark.parametrize("change, field, words", [
    (lambda r: r["objectives"]["brevity"]["scorer"].update(num_gpus=16), "objectives.brevity.scorer", "no node"),
    (lambda r: r["training"]["scaling"].update(use_gpu=True, gpus_per_worker=1, num_workers=9), "training.scaling",
     "needs 9 x"),
    (lambda r: r["training"]["scaling"].update(resources={"tpu_slice": 1}), "training.scaling", "tpu_slice: 1"),
    (lambda r: r["search"].update(evaluator_cpus=32), "search.evaluator_*", "no node"),
    (lambda r: r["search"].update(trial_cpus=2, max_concurrent_trials=16), "search.trial_cpus", "needs 16 x"),
])
def test_a_request_that_can_never_fit_is_named(tiny_causal, tmp_path, change, field, words):
    raw = tiny_raw_config(tiny_causal, tmp_path)
    change(raw)
    with pytest.raises(ConfigError) as e:
        check_fits(resource_requests(parse_config(raw)), NODES)
    assert e.value.path == field and words in str(e.value) and "GPU: 8" in str(e.value)


def test_custom_resources_must_be_custom(tiny_causal, tmp_path):
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["objectives"]["overlap"]["scorer"]["resources"] = {"GPU": 1}
    with pytest.raises(ConfigError, match="objectives.overlap.scorer.resources.GPU: custom resources only"):
        parse_config(raw)


@pytest.mark.e2e
def test_multi_node_placement_on_fake_nodes(tiny_causal, tmp_path):
    """Head + two trainer nodes (one trainer slot each) + a scorer node: the two objectives train
    on different nodes, the scorers run where configured, and an impossible request fails fast."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from emorl_ray.placement import check_cluster
    from emorl_ray.rewards.serve import deploy_scorers
    from emorl_ray.training.launch import single_objective_jobs, train_all

    with socket.socket() as s:  # the state API needs the dashboard; any free port, not 8265
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": port})
    trainer_nodes = [cluster.add_node(num_cpus=1, resources={"trainer_node": 1}) for _ in range(2)]
    scorer_node = cluster.add_node(num_cpus=1, resources={"scorer_node": 1})
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        raw = tiny_raw_config(tiny_causal, tmp_path / "runs", max_steps=2, val_every=2)
        raw["training"]["scaling"]["resources"] = {"trainer_node": 1}
        for o in raw["objectives"].values():
            o["scorer"]["resources"] = {"scorer_node": 0.1}
        cfg = parse_config(raw)
        check_cluster(cfg)

        impossible = parse_config({**raw, "training": {**raw["training"], "scaling": {
            **raw["training"]["scaling"], "resources": {"trainer_node": 2}}}})
        with pytest.raises(ConfigError, match="training.scaling: one unit asks for .*trainer_node: 2"):
            check_cluster(impossible)

        serve.start(http_options={"host": "127.0.0.1"})
        deploy_scorers(cfg)
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                    if "emorl-scorer" in (a.class_name or "")]
        assert len(replicas) == 2 and {a.node_id for a in replicas} == {scorer_node.node_id}

        manifests = train_all(cfg, tmp_path / "run", single_objective_jobs(cfg))
        where = {}
        for m in manifests:
            rows = [r for r in pq.read_table(m["metrics_path"]).to_pylist() if r["kind"] == "val"]
            where[m["name"]] = rows[-1]["node_id"]
        assert set(where.values()) <= {n.node_id for n in trainer_nodes}
        assert len(set(where.values())) == 2, f"both trainers on one node: {json.dumps(where)}"
    finally:
        ray.shutdown()
        cluster.shutdown()
