"""Placement: requests checked against the cluster before anything starts, and multi-node
scheduling on one machine with `ray.cluster_utils.Cluster` (fake nodes with custom resources)."""

import json
import logging
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import free_port, tiny_raw_config

from emorl_ray.config import ConfigError, load_config, parse_config
from emorl_ray.placement import check_fits, resource_requests, trainers_at_once
from emorl_ray.rundir import RunDir

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


def test_what_runs_together_must_fit_together(tiny_causal, tmp_path):
    """Two 1-GPU scorers and a 1-GPU trainer each fit a 1-GPU node alone, but the scorers stay up
    while the trainer runs: refused, naming the phase. Two such nodes are not enough either; three are."""
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["training"]["scaling"].update(use_gpu=True, gpus_per_worker=1)
    for o in raw["objectives"].values():
        o["scorer"]["num_gpus"] = 1
    requests = resource_requests(parse_config(raw))
    one_gpu = {"CPU": 4.0, "GPU": 1.0}
    for nodes in ([one_gpu], [one_gpu, one_gpu]):
        with pytest.raises(ConfigError, match="during training") as e:
            check_fits(requests, nodes)
        assert e.value.path in ("training.scaling", "objectives.overlap.scorer", "objectives.brevity.scorer")
    assert check_fits(requests, [one_gpu] * 3) == {"training": "fits", "search": "fits"}
    raw["search"]["evaluator_gpus"] = 1  # while searching: 2 scorers + the evaluator
    with pytest.raises(ConfigError, match="during search"):
        check_fits(resource_requests(parse_config(raw), training=False), [one_gpu] * 2 + [{"CPU": 4.0}])


def test_how_many_trainers_fit_at_once_beside_the_scorers(tiny_causal, tmp_path):
    """Trainers of two 1-GPU workers beside two 0.5-GPU scorers: on two 4-GPU nodes the scorers take
    one GPU of eight, which leaves room for three trainers; on one node for one; never more than
    asked, none where a trainer cannot fit at all. Ray's own keys (memory, node:IP) are ignored."""
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["training"]["scaling"].update(use_gpu=True, gpus_per_worker=1, num_workers=2)
    for o in raw["objectives"].values():
        o["scorer"]["num_gpus"] = 0.5
    requests = resource_requests(parse_config(raw))
    node = {"CPU": 8.0, "GPU": 4.0, "memory": 1e10, "node:10.0.0.1": 1.0}
    assert trainers_at_once(requests, [node, node], 10) == 3
    assert trainers_at_once(requests, [node, node], 2) == 2
    assert trainers_at_once(requests, [node], 10) == 1
    assert trainers_at_once(requests, [{"CPU": 8.0}], 10) == 0


@pytest.mark.parametrize("manifest, gpu_nodes", [("cluster/aws-gpu.yaml", 4), ("cluster/gcp-gpu.yaml", 4),
                                                 ("cluster/kuberay/raycluster.yaml", 4)])
def test_autoscaling_clusters_count_the_nodes_they_may_start(tiny_causal, tmp_path, manifest, gpu_nodes):
    """Only the CPU head is alive; the GPU workers start on demand. A GPU request is planned against
    the node types of the shipped cluster files, and refused without them."""
    from emorl_ray.placement import autoscaler_nodes

    root = Path(__file__).resolve().parents[1]
    nodes, source = autoscaler_nodes(str(root / manifest))
    assert source.endswith(manifest) and len(nodes) == gpu_nodes
    assert all(n["GPU"] == 8 and n["CPU"] >= 90 for n in nodes)
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["training"]["scaling"].update(use_gpu=True, num_workers=8)
    requests = resource_requests(parse_config(raw))
    head = [{"CPU": 8.0}]
    with pytest.raises(ConfigError, match="no node of this cluster"):
        check_fits(requests, head)
    assert check_fits(requests, head + nodes)["training"] == "fits"


def test_autoscaler_config_must_name_node_resources(tmp_path):
    from emorl_ray.placement import autoscaler_nodes

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"head_node_type": "h", "available_node_types": {
        "h": {"resources": {"CPU": 4}}, "gpu": {"max_workers": 2, "node_config": {}}}}))
    with pytest.raises(ConfigError, match="node type 'gpu' does not list its `resources`"):
        autoscaler_nodes(str(f))
    with pytest.raises(ConfigError, match="cannot read"):
        autoscaler_nodes(str(tmp_path / "missing.yaml"))


def test_custom_resources_must_be_custom(tiny_causal, tmp_path):
    raw = tiny_raw_config(tiny_causal, tmp_path)
    raw["objectives"]["overlap"]["scorer"]["resources"] = {"GPU": 1}
    with pytest.raises(ConfigError, match="objectives.overlap.scorer.resources.GPU: custom resources only"):
        parse_config(raw)


@pytest.mark.e2e
def test_multi_node_placement_on_fake_nodes(tiny_causal, tmp_path, caplog):
    """Head + two trainer nodes (one trainer slot each) + a scorer node + a node that claims a GPU:
    the two objectives train on different nodes, the scorers run where configured, a third run would
    be said to wait, an impossible request fails fast, and so does a GPU request where the GPU
    node's torch is a CPU build (this machine's)."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from emorl_ray.placement import check_cluster
    from emorl_ray.rewards.serve import deploy_scorers
    from emorl_ray.training.launch import log_queue, single_objective_jobs, train_runs

    port = free_port()  # the state API needs the dashboard; any free port, not 8265
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True,
                                                            "dashboard_host": "127.0.0.1", "dashboard_port": port})
    trainer_nodes = [cluster.add_node(num_cpus=1, resources={"trainer_node": 1}) for _ in range(2)]
    scorer_node = cluster.add_node(num_cpus=1, resources={"scorer_node": 1})
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        raw = tiny_raw_config(tiny_causal, tmp_path / "runs", max_steps=2, val_every=2)
        raw["training"]["scaling"]["resources"] = {"trainer_node": 1}
        for o in raw["objectives"].values():
            o["scorer"]["resources"] = {"scorer_node": 0.1}
        cfg = parse_config(raw)
        check_cluster(cfg)
        jobs = single_objective_jobs(cfg)
        with caplog.at_level(logging.INFO, logger="emorl_ray.training.launch"):
            assert log_queue(cfg, jobs) == 2 and "room for" not in caplog.text
            assert log_queue(cfg, jobs + jobs[:1]) == 2
        assert "training 3 runs; the live nodes have room for 2 at once beside the scorers" in caplog.text

        impossible = parse_config({**raw, "training": {**raw["training"], "scaling": {
            **raw["training"]["scaling"], "resources": {"trainer_node": 2}}}})
        with pytest.raises(ConfigError, match="training.scaling: one unit asks for .*trainer_node: 2"):
            check_cluster(impossible)
        assert "gpu_torch" not in check_cluster(cfg)  # no GPU asked for: no node probed
        on_gpu = parse_config({**raw, "training": {**raw["training"], "scaling": {
            **raw["training"]["scaling"], "use_gpu": True, "gpus_per_worker": 0.5, "resources": {}}}})
        with pytest.raises(ConfigError, match=r"training.scaling: asks for GPUs, but the torch on GPU node "
                           rf".*node {gpu_node.node_id[:8]}\) is {re.escape(torch.__version__)}, a CPU build"):
            check_cluster(on_gpu)

        serve.start(proxy_location="Disabled")  # handles only: no port 8000
        deploy_scorers(cfg)
        replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
                    if "emorl-scorer" in (a.class_name or "")]
        assert len(replicas) == 2 and {a.node_id for a in replicas} == {scorer_node.node_id}

        manifests = train_runs(cfg, RunDir.at(tmp_path / "run"), jobs)
        where = {}
        for m in manifests:
            rows = [r for r in pq.read_table(m.metrics_path).to_pylist() if r["kind"] == "val"]
            where[m.name] = rows[-1]["node_id"]
        assert set(where.values()) <= {n.node_id for n in trainer_nodes}
        assert len(set(where.values())) == 2, f"both trainers on one node: {json.dumps(where)}"
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_the_one_gpu_node_config_fits_one_gpu_node_and_not_a_cpu_one(tiny_causal):
    """configs/gpu_one_node.yaml: the three trainers, the scorers and the evaluator as fractions of
    one GPU. All three trainers run beside the scorers at once; nothing fits without a GPU."""
    cfg = load_config("configs/gpu_one_node.yaml", {"model.id": tiny_causal})
    requests = resource_requests(cfg)
    node = {"CPU": 16.0, "GPU": 1.0}
    assert check_fits(requests, [node]) == {"training": "fits", "search": "fits"}
    assert trainers_at_once(requests, [node], 3) == len(cfg.objective_names)
    with pytest.raises(ConfigError, match="no node"):
        check_fits(requests, [{"CPU": 16.0}])
