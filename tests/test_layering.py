"""Imports point one way: ``tasks`` <- ``methods`` <- ``backends`` <- ``pipelines``.

``tasks/``, ``methods/`` and ``backends/`` never import the distributed or config stack (ray,
wandb, hydra, omegaconf); deepspeed only where a backend loads a model (``backends/loading.py``).
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STACK = {"ray", "wandb", "hydra", "omegaconf"}
# What each layer must not import: the stack, and every layer above it.
FORBIDDEN = {
    "tasks": STACK | {"deepspeed", "methods", "backends", "pipelines"},
    "methods": STACK | {"deepspeed", "backends", "pipelines"},
    "backends": STACK | {"deepspeed", "pipelines"},
}
# The one place a model is handed to DeepSpeed.
ALLOWED = {"backends/loading.py": {"deepspeed"}}


def imported_roots(path: Path) -> set[str]:
    """Top-level packages ``path`` imports anywhere (function-level imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def violations(root: Path, layer: str) -> set[str]:
    out = set()
    for path in sorted((root / layer).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        bad = imported_roots(path) & (FORBIDDEN[layer] - ALLOWED.get(rel, set()))
        if bad:
            out.add(f"{rel}: {sorted(bad)}")
    return out


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_lower_layers_import_nothing_above_them(layer):
    assert list((ROOT / layer).rglob("*.py")), f"no python files under {layer}/"
    bad = violations(ROOT, layer)
    assert not bad, "layering violated:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_a_violation(tmp_path):
    (tmp_path / "backends").mkdir()
    (tmp_path / "backends" / "hf.py").write_text("import numpy\ndef f():\n    from ray import tune\n")
    (tmp_path / "backends" / "loading.py").write_text("import deepspeed\nimport pipelines.lm\n")
    (tmp_path / "backends" / "masked.py").write_text("import deepspeed\n")
    assert violations(tmp_path, "backends") == {
        "backends/hf.py: ['ray']", "backends/loading.py: ['pipelines']", "backends/masked.py: ['deepspeed']",
    }
