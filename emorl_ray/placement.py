"""What the job asks of the cluster, and whether the cluster can ever give it.

Ray queues a request that no node can satisfy forever (a trainer "pending", a Serve replica never
healthy). Before anything is deployed the job checks, per phase, that what must run at the same
time fits on the cluster's nodes together:

- training: every scorer replica (they stay up for the whole job) beside one trainer's workers
  (more trainers than fit simply queue);
- search and evaluation: the scorers, the evaluator replicas and one Tune trial;
- serving (`emorl serve`, checked before it deploys): every endpoint replica, beside the scorers
  where the bandit learns from them.

The nodes are the live ones plus, on an autoscaling cluster, the nodes its autoscaler may start:
the node types of the Ray cluster launcher's config (on the head at ~/ray_bootstrap_config.yaml,
or named by `autoscaler_config`), or of a KubeRay RayCluster manifest, each up to its max count.

Where GPUs are asked for, the torch on each live GPU node must be able to use them (a CUDA or
ROCm build). Once placed, a process keeps to what it reserved: `use_reserved_cpus` sizes torch's thread pool.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import yaml

from emorl_ray.config import ConfigError, ExperimentConfig, ScalingConfig

log = logging.getLogger(__name__)

# Where `ray up` leaves the cluster's launcher config on the head node (the autoscaler reads it).
LAUNCHER_CONFIG = "~/ray_bootstrap_config.yaml"
MAX_NODES_PER_TYPE = 64  # enough for any phase of one job; keeps the packing cheap


def trainer_worker_request(sc: ScalingConfig) -> dict[str, float]:
    """Resources of one Ray Train worker (the same dict goes to `ScalingConfig.resources_per_worker`)."""
    req = {"CPU": sc.cpus_per_worker, **sc.resources}
    if sc.use_gpu:
        req["GPU"] = sc.gpus_per_worker or 1
    return req


def use_reserved_cpus(num_cpus: float) -> None:
    """Run torch with as many threads as CPUs were reserved for this process, rounded up.

    Ray does not cap torch's thread pool for actors with fractional CPUs; several processes each
    spinning up one thread per core on a small machine slow everything down several-fold. Nothing
    is imported for it: a process that has not loaded torch (a scorer that is a plain python
    function) is spared the seconds that takes, and if it loads torch later, torch reads the
    thread count from OMP_NUM_THREADS then."""
    n = max(1, math.ceil(num_cpus))
    os.environ["OMP_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)


def _nonzero(req: dict) -> dict:
    return {k: v for k, v in req.items() if v}


def _show(d: dict) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(d.items())) + "}"


def scorer_requests(cfg: ExperimentConfig, objectives: list[str] | None = None) -> list[tuple[str, dict, int]]:
    """(config field, resources of one replica, replicas) of each objective's scorer."""
    out = []
    for o in objectives or cfg.objective_names:
        sc = cfg.objectives[o].scorer
        out.append((f"objectives.{o}.scorer", _nonzero({"CPU": sc.num_cpus, "GPU": sc.num_gpus, **sc.resources}),
                    sc.num_replicas))
    return out


def resource_requests(cfg: ExperimentConfig, objectives: list[str] | None = None,
                      training: bool = True) -> list[tuple[str, dict, int]]:
    """(config field, resources of one unit, units needed at once) for everything the job starts."""
    out = scorer_requests(cfg, objectives)
    if training:
        sc = cfg.training.scaling
        out.append(("training.scaling", _nonzero(trainer_worker_request(sc)), sc.num_workers))
    se = cfg.search
    out.append(("search.evaluator_*", _nonzero({"CPU": se.evaluator_cpus, "GPU": se.evaluator_gpus,
                                                **se.evaluator_resources}), se.evaluator_replicas))
    out.append(("search.trial_cpus", {"CPU": se.trial_cpus}, se.max_concurrent_trials))
    return out


def serving_requests(cfg: ExperimentConfig, with_scorers: bool) -> list[tuple[str, dict, int]]:
    """What `emorl serve` starts: the endpoint's replicas, and the scorers where the bandit learns from them."""
    sv = cfg.serving
    return ((scorer_requests(cfg) if with_scorers else [])
            + [("serving", _nonzero({"CPU": sv.num_cpus, "GPU": sv.num_gpus}), sv.num_replicas)])


def phases(requests: list[tuple[str, dict, int]]) -> dict[str, list[tuple[str, dict, int]]]:
    """What must run at the same time: the scorers throughout, one trainer while training, the
    evaluator and one trial while searching, every endpoint replica while serving."""
    scorers = [r for r in requests if r[0].startswith("objectives.")]
    by_field = {r[0]: r for r in requests}
    out = {}
    if "training.scaling" in by_field:
        out["training"] = scorers + [by_field["training.scaling"]]
    if "search.trial_cpus" in by_field:
        field, req, _ = by_field["search.trial_cpus"]
        out["search"] = scorers + [by_field["search.evaluator_*"], (field, req, 1)]
    if "serving" in by_field:
        out["serving"] = scorers + [by_field["serving"]]
    return out


def _pack(units: list[tuple[str, dict]], nodes: list[dict[str, float]]) -> str | None:
    """First-fit decreasing of the units onto the nodes' free resources; the field of the first
    unit that finds no room, or None when everything fits."""
    free = [dict(n) for n in nodes]
    order = sorted(units, key=lambda u: (-u[1].get("GPU", 0), -u[1].get("CPU", 0), -len(u[1])))
    for field, req in order:
        for n in free:
            if all(n.get(k, 0) >= v - 1e-9 for k, v in req.items()):
                for k, v in req.items():
                    n[k] = n.get(k, 0) - v
                break
        else:
            return field
    return None


def _schedulable(nodes: list[dict[str, float]]) -> list[dict[str, float]]:
    """The nodes' resources that requests name (not Ray's per-node markers, memory or object store)."""
    return [{k: v for k, v in n.items() if not k.startswith(("node:", "object_store", "memory"))} for n in nodes]


def check_fits(requests: list[tuple[str, dict, int]], nodes: list[dict[str, float]],
               where: str = "this cluster") -> dict[str, str]:
    """Raise ConfigError naming the request that cannot fit: alone on any node, or beside what
    must run with it. `nodes`: each node's total resources (live, or startable by the autoscaler)."""
    nodes = _schedulable(nodes)
    offered = "; ".join(_show(n) for n in nodes[:8]) + (f"; ... ({len(nodes)} nodes)" if len(nodes) > 8 else "")
    offered = offered or "none"
    for field, req, units in requests:
        if not any(all(n.get(k, 0) >= v for k, v in req.items()) for n in nodes):
            raise ConfigError(field, f"one unit asks for {_show(req)}, but no node of {where} has that much "
                              f"(nodes: {offered}); lower the request, add a node type that has it, or name the "
                              "autoscaler's config in `autoscaler_config` if such nodes start on demand")
        for k, v in req.items():
            total = sum(n.get(k, 0) for n in nodes)
            if v * units > total + 1e-9:
                raise ConfigError(field, f"needs {units} x {_show(req)} at once, but {where} has only "
                                  f"{total:g} {k} in all (nodes: {offered})")
    verdict = {}
    for phase, reqs in phases(requests).items():
        units = [(field, req) for field, req, n in reqs for _ in range(n)]
        stuck = _pack(units, nodes)
        if stuck is not None:
            together = "; ".join(f"{n} x {_show(r)} ({f})" for f, r, n in reqs)
            raise ConfigError(stuck, f"does not fit beside what runs with it during {phase}: {together}; "
                              f"the nodes of {where} ({offered}) cannot hold them all at once (scorers stay up for "
                              "the whole job). Lower the requests, or add nodes")
        verdict[phase] = "fits"
    return verdict


def trainers_at_once(requests: list[tuple[str, dict, int]], nodes: list[dict[str, float]], most: int) -> int:
    """How many trainers (each all its workers) fit beside the scorers on `nodes` at the same
    time, up to `most`: the rest of a job's runs wait for one of these to finish (or for nodes
    the autoscaler adds). First-fit decreasing, like `check_fits`."""
    scorers = [(f, r) for f, r, n in requests if f.startswith("objectives.") for _ in range(n)]
    trainer = [(f, r) for f, r, n in requests if f == "training.scaling" for _ in range(n)]
    nodes = _schedulable(nodes)
    fit = 0
    while fit < most and _pack(scorers + trainer * (fit + 1), nodes) is None:
        fit += 1
    return fit


def node_types(config: dict) -> list[tuple[str, dict[str, float], int]]:
    """(node type, resources of one node, how many the autoscaler may start) from a Ray cluster
    launcher config (`available_node_types`) or a KubeRay RayCluster (`workerGroupSpecs`)."""
    out = []
    if "available_node_types" in config:
        head = config.get("head_node_type")
        for name, t in config["available_node_types"].items():
            if name == head:
                continue  # the head is alive already: it is among the live nodes
            res = t.get("resources")
            if not res:
                raise ConfigError("autoscaler_config", f"node type {name!r} does not list its `resources`; add "
                                  "them (e.g. {CPU: 96, GPU: 8}) so the job can plan for nodes not started yet")
            out.append((name, {k: float(v) for k, v in res.items()},
                        int(t.get("max_workers", config.get("max_workers", 0)))))
    elif config.get("kind") == "RayCluster":
        for g in config.get("spec", {}).get("workerGroupSpecs", []):
            params = g.get("rayStartParams") or {}
            limits = {}
            for c in g.get("template", {}).get("spec", {}).get("containers", [])[:1]:
                limits = (c.get("resources") or {}).get("limits") or {}
            res = {"CPU": float(params.get("num-cpus", _k8s_cpus(limits.get("cpu", 0)))),
                   "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}
            if params.get("resources"):
                res |= {k: float(v) for k, v in yaml.safe_load(params["resources"].strip("'\"")).items()}
            out.append((g.get("groupName", "workers"), res, int(g.get("maxReplicas", g.get("replicas", 0)))))
    else:
        raise ConfigError("autoscaler_config", "neither a Ray cluster launcher config (available_node_types) "
                          "nor a KubeRay RayCluster manifest (kind: RayCluster)")
    return out


def _k8s_cpus(v) -> float:
    v = str(v)
    return float(v[:-1]) / 1000 if v.endswith("m") else float(v or 0)


def autoscaler_nodes(path: str | None) -> tuple[list[dict[str, float]], str | None]:
    """The nodes the autoscaler may add (at most MAX_NODES_PER_TYPE of each type), and the file they
    come from: `path`, else the launcher's config on this (head) node, else none."""
    if path is None:
        default = Path(LAUNCHER_CONFIG).expanduser()
        if not default.is_file():
            return [], None
        path = str(default)
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).expanduser().read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError("autoscaler_config", f"cannot read {path}: {e}") from None
    # A manifest file may hold other objects too (a volume claim beside the RayCluster).
    config = next((d for d in docs if "available_node_types" in d or d.get("kind") == "RayCluster"), {})
    nodes = []
    for _, res, count in node_types(config):
        nodes += [dict(res) for _ in range(min(count, MAX_NODES_PER_TYPE))]
    return nodes, path


def torch_build() -> dict:
    """The torch this process imports, and what it was built for (no device needed to tell)."""
    import torch

    return {"torch": torch.__version__, "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}


def live_nodes() -> list[dict]:
    """Ray's records of the cluster's live nodes (`Resources`, `NodeID`, `NodeManagerAddress`)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def check_gpu_torch(requests: list[tuple[str, dict, int]], live: list[dict],
                    timeout_s: float = 120.0) -> dict[str, str]:
    """Where the job asks for GPUs: the torch on every live GPU node must be a CUDA (or ROCm) build.
    A CPU wheel there (a CPU index's pick, or an install that replaced the node's torch) fails
    only once the scorers are up and the trainers started, in each process's `.to("cuda")`. One
    probe per node asks no CPU or GPU, so a busy node still answers at once. Returns each GPU
    node's torch."""
    field = next((f for f, req, _ in requests if req.get("GPU")), None)
    if field is None:
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in live if n["Resources"].get("GPU")]
    if not nodes:  # none up yet: the autoscaler's GPU nodes start later, unprobed
        return {}
    probe = ray.remote(num_cpus=0)(torch_build)
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out = {}
    for n, ref in zip(nodes, refs):
        where = f"{n['NodeManagerAddress']} (node {n['NodeID'][:8]})"
        if ref not in ready:
            log.warning("GPU node %s did not say which torch it has within %.0f s; not checked", where, timeout_s)
            continue
        b = ray.get(ref)
        if not (b["cuda"] or b["hip"]):
            raise ConfigError(field, f"asks for GPUs, but the torch on GPU node {where} is {b['torch']}, a CPU "
                              "build; install a CUDA build of torch there (the README's Quick start says how), "
                              "or ask for no GPUs")
        out[where] = f"{b['torch']} (CUDA {b['cuda']})" if b["cuda"] else f"{b['torch']} (ROCm {b['hip']})"
    return out


def check_cluster(cfg: ExperimentConfig, objectives: list[str] | None = None, training: bool = True) -> dict:
    """The job's requests against the cluster (`check_requests`)."""
    return check_requests(cfg, resource_requests(cfg, objectives, training))


def check_serving(cfg: ExperimentConfig, with_scorers: bool) -> dict:
    """`emorl serve`'s requests against the cluster (`check_requests`)."""
    return check_requests(cfg, serving_requests(cfg, with_scorers))


def check_requests(cfg: ExperimentConfig, requests: list[tuple[str, dict, int]]) -> dict:
    """check_fits against the live Ray cluster plus what its autoscaler may start, then the torch
    on its GPU nodes where GPUs are asked for (call after connecting)."""
    if not cfg.check_resources:
        return {"checked": False}
    live = live_nodes()
    extra, source = autoscaler_nodes(cfg.autoscaler_config)
    where = "this cluster" if not extra else f"this cluster with the nodes its autoscaler may start ({source})"
    verdict = check_fits(requests, [n["Resources"] for n in live] + extra, where)
    gpu_torch = check_gpu_torch(requests, live)
    return {"checked": True, "live_nodes": len(live), "autoscaler_nodes": len(extra), "autoscaler_config": source,
            **verdict, **({"gpu_torch": gpu_torch} if gpu_torch else {})}
