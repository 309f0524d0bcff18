"""Cluster launcher configs parse and pass Ray's own autoscaler schema."""

from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("path", sorted(CLUSTER.glob("*.yaml")), ids=lambda p: p.name)
def test_launcher_yaml_matches_ray_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    validate_config(prepare_config(config))  # Ray fills its defaults, then checks its schema
    workers = [n for name, n in config["available_node_types"].items() if name != config["head_node_type"]]
    assert any(n["resources"].get("GPU", 0) >= 1 for n in workers), "needs a GPU worker type"
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0  # the driver stays on a CPU node
    starts = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=0.0.0.0" not in starts and "--dashboard-host=127.0.0.1" in starts
    assert any("pip install" in c for c in config["setup_commands"])


def test_schema_check_catches_mistakes():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_workerz"] = 4
    with pytest.raises(Exception):
        validate_config(prepare_config(config))
