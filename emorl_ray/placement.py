"""What the job asks of the cluster, and whether the cluster can ever give it.

Ray queues a request that no node can satisfy forever (a trainer "pending", a Serve replica never
healthy). The job checks every request against the live nodes first and names the one that
cannot fit, with the config field to change.
"""

from __future__ import annotations

from emorl_ray.config import ConfigError, ExperimentConfig, ScalingConfig


def trainer_worker_request(sc: ScalingConfig) -> dict[str, float]:
    """Resources of one Ray Train worker (the same dict goes to `ScalingConfig.resources_per_worker`)."""
    req = {"CPU": sc.cpus_per_worker, **sc.resources}
    if sc.use_gpu:
        req["GPU"] = sc.gpus_per_worker or 1
    return req


def _nonzero(req: dict) -> dict:
    return {k: v for k, v in req.items() if v}


def resource_requests(cfg: ExperimentConfig, objectives: list[str] | None = None,
                      training: bool = True) -> list[tuple[str, dict, int]]:
    """(config field, resources of one unit, units needed at once) for everything the job starts."""
    out = []
    for o in objectives or cfg.objective_names:
        sc = cfg.objectives[o].scorer
        out.append((f"objectives.{o}.scorer", _nonzero({"CPU": sc.num_cpus, "GPU": sc.num_gpus, **sc.resources}),
                    sc.num_replicas))
    if training:
        sc = cfg.training.scaling
        out.append(("training.scaling", _nonzero(trainer_worker_request(sc)), sc.num_workers))
    se = cfg.search
    out.append(("search.evaluator_*", _nonzero({"CPU": se.evaluator_cpus, "GPU": se.evaluator_gpus,
                                                **se.evaluator_resources}), se.evaluator_replicas))
    out.append(("search.trial_cpus", {"CPU": se.trial_cpus}, se.max_concurrent_trials))
    return out


def check_fits(requests: list[tuple[str, dict, int]], nodes: list[dict[str, float]]) -> None:
    """Raise ConfigError for the first request no node can hold (or that the whole cluster cannot
    hold `units` times over). `nodes`: each alive node's total resources."""
    def show(d):
        return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(d.items())) + "}"

    offered = "; ".join(show({k: v for k, v in n.items() if not k.startswith(("node:", "object_store", "memory"))})
                        for n in nodes) or "none"
    for field, req, units in requests:
        if not any(all(n.get(k, 0) >= v for k, v in req.items()) for n in nodes):
            raise ConfigError(field, f"one unit asks for {show(req)}, but no node of this cluster has that much "
                              f"(nodes: {offered}); lower the request, add a node that has it, or set "
                              "check_resources: false if such nodes start on demand (autoscaling)")
        for k, v in req.items():
            total = sum(n.get(k, 0) for n in nodes)
            if v * units > total + 1e-9:
                raise ConfigError(field, f"needs {units} x {show(req)} at once, but the cluster has only "
                                  f"{total:g} {k} in all (nodes: {offered})")


def check_cluster(cfg: ExperimentConfig, objectives: list[str] | None = None, training: bool = True) -> None:
    """check_fits against the live Ray cluster (call after connecting)."""
    if not cfg.check_resources:
        return
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_fits(resource_requests(cfg, objectives, training), nodes)
