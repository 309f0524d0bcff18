"""Command-line plumbing shared by the jobs: the config arguments and their error messages."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

from emorl_ray.config import ConfigError, ExperimentConfig, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="experiment YAML")
    p.add_argument("--name", help="run name (overrides `name` in the config)")
    p.add_argument("--output-dir", help="where run directories go (overrides `output_dir`)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.max_steps=10 (value parsed as YAML)")


def setup_job() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_overrides(items: list[str]) -> dict | None:
    """`--set KEY=VALUE` items -> {KEY: value parsed as YAML}; None after printing a malformed one."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set {item!r}: expected KEY=VALUE", file=sys.stderr)
            return None
        overrides[key] = yaml.safe_load(value)
    return overrides


def config_from_args(args: argparse.Namespace) -> ExperimentConfig | None:
    """Set up a job's logging and environment; return the validated config, or None after printing
    what is wrong (the caller exits with 2)."""
    setup_job()
    overrides = parse_overrides(args.set)
    if overrides is None:
        return None
    if args.name:
        overrides["name"] = args.name
    if args.output_dir:
        overrides["output_dir"] = args.output_dir
    try:
        return load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return None
