"""Cluster launcher configs parse and pass Ray's own autoscaler schema."""

import functools
import gzip
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"


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
    with pytest.raises(Exception):  # noqa: B017 - Ray raises jsonschema's or its own error by version
        validate_config(prepare_config(config))


def _pins(lines) -> dict:
    return dict(line.split("==", 1) for line in lines if "==" in line and not line.startswith("#"))


def test_kuberay_pair_is_consistent():
    """The RayCluster and the RayJob that submits to it: matching names and Ray version, GPUs only
    on workers, nothing exposed beyond the cluster, the job's pins equal to our known-good set."""
    import ray

    cluster, claim = yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = cluster["spec"]
    assert spec["rayVersion"] == ray.__version__
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and spec["authOptions"]["mode"] == "token"
    head_res = head["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head_res["limits"]
    images = [head["template"]["spec"]["containers"][0]["image"]]
    for group in spec["workerGroupSpecs"]:
        c = group["template"]["spec"]["containers"][0]
        images.append(c["image"])
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert all(f":{ray.__version__}-" in image for image in images)

    js = job["spec"]
    assert js["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    # The shared volume the pods mount is provisioned by the same file, for many writers.
    mounts = {v["persistentVolumeClaim"]["claimName"] for v in spec["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert (claim["kind"], claim["metadata"]["name"]) == ("PersistentVolumeClaim", "emorl-ray-shared")
    assert mounts == {claim["metadata"]["name"]} and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    # The entrypoint checks, then runs; both with the shipped config, the data path it needs, and
    # the worker groups to plan GPU placement against. The arguments pass the config check here.
    entry = js["entrypoint"]
    args = shlex.split(entry.split('ARGS="', 1)[1].split('"', 1)[0])
    assert entry.count("python jobs/train_all.py $ARGS") == 2 and "$ARGS --check &&" in entry
    assert (ROOT / args[args.index("--config") + 1]).is_file()
    sets = dict(a.split("=", 1) for a in args[1::2] if "=" in a)
    assert sets["autoscaler_config"] == "cluster/kuberay/raycluster.yaml"
    assert sets["data.path"].startswith("/mnt/shared/")
    env = yaml.safe_load(js["runtimeEnvYAML"])
    assert env["working_dir"]
    known_good = _pins((ROOT / "constraints-cpu.txt").read_text().splitlines())
    for name, version in _pins(env["pip"]).items():
        assert known_good.get(name) == version, f"{name}=={version} differs from constraints-cpu.txt"


@functools.cache
def _crd_schema(kind: str) -> dict:
    # libyaml's loader: the CRDs are 1-1.4 MB of YAML, seconds each for the pure-Python one.
    with gzip.open(ROOT / "tests" / "kuberay" / f"ray.io_{kind.lower()}s.yaml.gz") as f:
        crd = yaml.load(f, Loader=yaml.CSafeLoader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@pytest.mark.parametrize("path", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_pass_the_crd_schemas(path):
    """What the Kubernetes API server checks on `kubectl apply`: KubeRay 1.7's OpenAPI schemas."""
    import jsonschema

    docs = [d for d in yaml.safe_load_all((CLUSTER / "kuberay" / path).read_text())
            if d["kind"] in ("RayCluster", "RayJob")]
    for doc in docs:
        jsonschema.Draft4Validator(_crd_schema(doc["kind"])).validate(doc)
    broken = dict(docs[0], spec=dict(docs[0]["spec"], **({"workerGroupSpecs": [{"groupName": 5}]} if
                                                           docs[0]["kind"] == "RayCluster" else {"entrypoint": 7})))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(_crd_schema(docs[0]["kind"])).validate(broken)
