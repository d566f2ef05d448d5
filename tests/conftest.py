"""Shared fixtures: where the benchmark data lives, and how to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data folder (env PROMPTSWEEP_DATA, else shared/data beside the checkout)."""
    path = Path(os.environ.get("PROMPTSWEEP_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "sst2").is_dir():
        pytest.skip(f"benchmark data not found at {path}")
    return path


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m pipelines.run ARGS`` from the repo root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "pipelines.run", *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
    )
