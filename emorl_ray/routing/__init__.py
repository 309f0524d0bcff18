"""Weights per prompt: a router fitted on the search's per-prompt scores (`router.py`)."""

from emorl_ray.routing.router import KNNRouter, fit_router, fit_run_router, load_router, save_router

__all__ = ["KNNRouter", "fit_router", "fit_run_router", "load_router", "save_router"]
