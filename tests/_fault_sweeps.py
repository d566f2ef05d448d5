"""The sweep the fault tests break, and how they count what a fault lost or duplicated.

One small sweep (``manual`` and a slowed APE, two seeds each, on the tiny model) is run
once undisturbed as the reference. A broken-then-recovered run of the same sweep must log
exactly the reference's evaluation records: the tiny model, the data draws and every
trial's RNG (checkpointed with the trial) are deterministic, so any record missing is lost
work and any extra one is double-counted work.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pipelines.results import read_jsonl

ROOT = Path(__file__).resolve().parents[1]

# APE slowed down by a sleep before every step; the sleep changes no result.
SLOW_APE = """\
_target_: tests.drills.SlowSteps
step_sleep_s: 0.0
method:
  _target_: methods.ape.APE
  n_prompts: 4
  n_eval: 8
  rounds: 5
  max_new_tokens: 12
"""
METHODS = "search.methods=[manual,slow_ape]"
BASE = ["model@lm.scorer=tiny", "model@lm.proposer=tiny", "task.n_train=20", "task.n_dev=16", "task.n_test=24",
        "++cache.enabled=false"]
TINY = [*BASE, "logger=none"]


def extra_conf(root: Path) -> Path:
    """A config directory adding method ``slow_ape`` (passed with ``hydra.searchpath``)."""
    (root / "method").mkdir(parents=True, exist_ok=True)
    (root / "method" / "slow_ape.yaml").write_text(SLOW_APE)
    return root


def sweep_args(run_dir: Path, conf: Path, data_dir: Path, step_sleep_s: float = 0.0, seeds: str = "[0,1]",
               logger: str = "none") -> list[str]:
    return [*BASE, f"logger={logger}", f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", f"hydra.searchpath=[file://{conf}]",
            METHODS, f"search.seeds={seeds}", f"+search.method_overrides.slow_ape.step_sleep_s={step_sleep_s}"]


def cli_env(extra: dict | None = None) -> dict:
    # No log de-duplication: tests read per-trial lines ("resumed at step ...") from stdout.
    return {**os.environ, "WANDB_SILENT": "true", "RAY_DEDUP_LOGS": "0", **(extra or {})}


def start_cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """``python -m pipelines.run ARGS`` in the background, stdout and stderr to ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipelines.run", *args], cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env=cli_env(env))


def run_cli(args: list[str], env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipelines.run", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=cli_env(env))


def wait_for(check: Callable[[], bool], timeout_s: float, what: str, proc: subprocess.Popen | None = None) -> None:
    """Poll ``check`` until true; fail after ``timeout_s`` or if ``proc`` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited ({proc.returncode}) before: {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for: {what}")


def steps_logged(run_dir: Path, method: str = "slow_ape") -> dict[tuple, int]:
    """Highest step logged so far per (method, seed), from the per-trial evaluation logs."""
    best: dict[tuple, int] = {}
    for path in (run_dir / "evaluations").glob("*.jsonl"):
        for r in read_jsonl(path):
            if r["method"] == method:
                key = (r["method"], r["seed"])
                best[key] = max(best.get(key, 0), r["step"])
    return best


def record_keys(run_dir: Path) -> collections.Counter:
    """The merged evaluation log as a multiset of what was scored (trial ids differ between runs)."""
    records = read_jsonl(run_dir / "evaluations.jsonl")
    return collections.Counter((r["method"], r["seed"], r["step"], r["idx"], r["prompt"], r["score"]) for r in records)


def lost_and_duplicated(reference: Path, run_dir: Path) -> tuple[int, int]:
    """Records of the reference missing from the run, and records the run has beyond the reference."""
    ref, got = record_keys(reference), record_keys(run_dir)
    return sum((ref - got).values()), sum((got - ref).values())


def summary_rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "summary.json").read_text())["trials"]


def finished_trials(run_dir: Path) -> int:
    return len(list((run_dir / "trials").glob("*.json")))
