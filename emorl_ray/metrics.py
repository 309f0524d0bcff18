"""Custom Ray metrics of the job (`ray.util.metrics`): exported by each node's metrics agent with a
`ray_` prefix, so Prometheus/Grafana behind the Ray dashboard can chart them while the job runs.

    ray_emorl_train_step{run}             steps done
    ray_emorl_train_reward{run}           mean sampled reward of the last step
    ray_emorl_val_score{run}              last validation score
    ray_emorl_train_data_points{run}      data points trained on (counter)
    ray_emorl_tokens_per_second{run}      generated response tokens / second of the last step
    ray_emorl_search_trials{aggregation}  search trials finished (counter)
    ray_emorl_search_score{aggregation}   validation score of the last finished trial

Metric objects are per process (each Ray worker makes its own), hence the lazily filled cache.
"""

from __future__ import annotations

from functools import cache


@cache
def _gauge(name: str, description: str, tag: str):
    from ray.util.metrics import Gauge

    return Gauge(name, description=description, tag_keys=(tag,))


@cache
def _counter(name: str, description: str, tag: str):
    from ray.util.metrics import Counter

    return Counter(name, description=description, tag_keys=(tag,))


def record_train_step(run: str, step: int, reward: float, data_points: int, tokens: float, seconds: float) -> None:
    tags = {"run": run}
    _gauge("emorl_train_step", "training steps done", "run").set(step, tags)
    _gauge("emorl_train_reward", "mean sampled reward of the last training step", "run").set(reward, tags)
    _counter("emorl_train_data_points", "data points trained on", "run").inc(data_points, tags)
    if seconds > 0:
        _gauge("emorl_tokens_per_second", "generated response tokens per second, last step", "run").set(
            tokens / seconds, tags)


def record_validation(run: str, score: float) -> None:
    _gauge("emorl_val_score", "last validation score (mean of the run's objectives)", "run").set(score, {"run": run})


def record_trial(aggregation: str, score: float) -> None:
    tags = {"aggregation": aggregation}
    _counter("emorl_search_trials", "search trials finished", "aggregation").inc(1, tags)
    _gauge("emorl_search_score", "validation score of the last finished trial", "aggregation").set(score, tags)
