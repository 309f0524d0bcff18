"""Stage 3: the hierarchical grid search of the ensemble weights, a Ray Tune `Searcher`."""

from emorl_ray.search.hierarchical import HierarchicalGridSearcher

__all__ = ["HierarchicalGridSearcher"]
