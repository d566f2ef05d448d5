"""Shared fixtures: where the benchmark data lives, and how to run the CLI in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PROMPTSWEEP_DATA", ROOT.parent / "shared" / "data"))


def data_found(path: Path = DATA) -> bool:
    return (path / "SOURCES.md").is_file() and (path / "sst2").is_dir()


def pytest_sessionstart(session) -> None:
    # On CI a missing data folder must fail the run: skipping would turn a broken checkout green.
    if os.environ.get("CI") == "true" and not data_found():
        raise pytest.UsageError(f"benchmark data not found at {DATA} (CI=true needs it; set PROMPTSWEEP_DATA)")


def pytest_report_header(config) -> str:
    if data_found():
        return f"benchmark data: {DATA}"
    return f"benchmark data not found at {DATA}: the tests that read it are skipped (set PROMPTSWEEP_DATA)"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data folder (env PROMPTSWEEP_DATA, else shared/data beside the checkout)."""
    if not data_found():
        pytest.skip("benchmark data not found (see the header)")
    return DATA


def run_cli(*args: str, timeout: int = 600, env: dict | None = None, module: str = "pipelines.run") -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (the sweep by default) from the repo root; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "WANDB_SILENT": "true", **(env or {})},
    )
