"""Every `from X import name` in the project names something X has, including the imports inside
functions that only run on a GPU, on a cluster or in a benchmark, which no CPU test reaches (a
helper renamed in one place once broke `tests/test_gpu.py` where only a GPU would have shown it)."""

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted(p for d in ("emorl_ray", "jobs", "bench", "tests") for p in (ROOT / d).rglob("*.py"))
CAUGHT = {"ImportError", "ModuleNotFoundError", "Exception"}


def _guarded(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside a `try` that handles a failed import (optional features)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                h.type is None or {n.id for n in ast.walk(h.type) if isinstance(n, ast.Name)} & CAUGHT
                for h in node.handlers):
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.ImportFrom)}
    return out


def _has(module: str, name: str) -> bool:
    mod = importlib.import_module(module)
    if hasattr(mod, name):
        return True
    try:  # a submodule, not yet imported
        importlib.import_module(f"{module}.{name}")
        return True
    except ModuleNotFoundError:
        return False


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_imported_name_exists(path):
    tree = ast.parse(path.read_text(), str(path))
    guarded = _guarded(tree)
    missing, not_installed = [], set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in guarded or node.module == "__future__":
            continue
        assert node.level == 0, f"{path}:{node.lineno}: relative import"
        top = node.module.split(".")[0]
        if importlib.util.find_spec(top) is None:  # an extra the README installs by hand (trl for a benchmark)
            not_installed.add(top)
            continue
        missing += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}" for a in node.names
                    if a.name != "*" and not _has(node.module, a.name)]
    assert not missing, "imported names that do not exist:\n" + "\n".join(missing)
    assert not_installed <= {"trl"}, f"{path}: imports {sorted(not_installed)}, which the test install lacks"
