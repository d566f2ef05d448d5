"""tasks/ and methods/ stay free of the distributed/config stack; imports point one way."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"ray", "deepspeed", "wandb", "hydra", "omegaconf"}
UPWARD = {"tasks": {"methods", "pipelines"}, "methods": {"pipelines"}}


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("layer", ["tasks", "methods"])
def test_lower_layers_import_no_ray_hydra_wandb_or_deepspeed(layer):
    files = sorted((ROOT / layer).rglob("*.py"))
    assert files, f"no python files under {layer}/"
    bad = {f"{p.relative_to(ROOT)}: {sorted(imported_roots(p) & (FORBIDDEN | UPWARD[layer]))}"
           for p in files if imported_roots(p) & (FORBIDDEN | UPWARD[layer])}
    assert not bad, "layering violated:\n" + "\n".join(sorted(bad))


def test_the_checker_sees_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\nfrom ray import tune\nimport hydra.utils\n")
    assert imported_roots(bad) & FORBIDDEN == {"ray", "hydra"}
