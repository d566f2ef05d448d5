"""Re-running a sweep against the evaluation cache: what the second run costs, as a fraction of the first.

Usage:
    python bench/cache_rerun.py [--data-dir DIR] [--keep] [-- extra Hydra overrides]

Runs the same sweep twice through ``python -m pipelines.run`` (default: manual vs APE on SST-2
with the default model on CPU, at small sizes) against one fresh cache file, then prints for
each run: scorer calls that reached the model, calls answered by the cache, models the LM
actors loaded (on first use: none when the cache answers everything), the trials' own time
(steps plus test scoring), the sweep's wall time (Ray start and any model load included) and
the whole process's; then run 2 as a fraction of run 1. It also checks that both runs found
the same prompts with the same scores. Other work on the machine slows both runs: the load
average is printed beside each.

Examples:
    python bench/cache_rerun.py
    python bench/cache_rerun.py -- +experiment=sst2_text      # the full text-method sweep
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["task=sst2", "method=ape", "task.n_test=200", "method.n_prompts=6", "method.n_eval=48", "search.seeds=[0]"]


def run_sweep(overrides: list[str], run_dir: Path, cache: Path) -> dict:
    """One sweep in a subprocess; its summary plus the process's wall time and the load before it."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "pipelines.run", *overrides, "logger=none", f"hydra.run.dir={run_dir}", f"cache.path={cache}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_SILENT": "true"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sweep failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    trials = summary["trials"]
    return {
        "load": load, "process_s": wall, "sweep_s": summary["wall_s"],
        "trial_s": sum(t["wall_s"] for t in trials),
        "scorer_calls": sum(t["scorer_calls"] for t in trials),
        "cache_calls": sum(t["scorer_cache_calls"] for t in trials),
        "proposer_calls": sum(t["proposer_calls"] for t in trials),
        # models the LM actors loaded (they load on first use: none when the cache answers all)
        "model_loads": sum(a.get("loads", 0) for pool in summary.get("lm_actors", {}).values() for a in pool),
        "results": sorted((t["method"], t["seed"], t["best_prompt"], t["test_score"]) for t in trials),
    }


def report(first: dict, second: dict) -> None:
    rows = [("scorer calls (reached the model)", "scorer_calls", ".0f"), ("scorer calls answered by the cache", "cache_calls", ".0f"),
            ("proposer calls (reached the model)", "proposer_calls", ".0f"), ("models loaded by the LM actors", "model_loads", ".0f"),
            ("trials' own time, s", "trial_s", ".1f"),
            ("sweep wall time (Ray + model load + trials), s", "sweep_s", ".1f"), ("whole process, s", "process_s", ".1f")]
    print(f"{'':48} {'run 1':>9} {'run 2':>9} {'run 2 / run 1':>14}")
    for label, key, fmt in rows:
        ratio = f"{second[key] / first[key]:.1%}" if first[key] else "-"
        print(f"{label:48} {first[key]:>9{fmt}} {second[key]:>9{fmt}} {ratio:>14}")
    print(f"{'load average (1 min) before the run':48} {first['load']:>9.2f} {second['load']:>9.2f}   on {os.cpu_count()} CPU(s)")
    same = first["results"] == second["results"]
    print(f"same best prompts and test scores in both runs: {same}")
    if not same:
        sys.exit("the cached re-run disagrees with the first run")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=None, help="benchmark data (default: the sweep's own default)")
    parser.add_argument("--keep", action="store_true", help="keep the run directories and the cache file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides replacing the small default sweep")
    args = parser.parse_args()
    overrides = (args.overrides or SMALL) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    tmp = Path(tempfile.mkdtemp(prefix="psw-cache-bench-"))
    cache = tmp / "evals.sqlite"
    print(f"sweep: {' '.join(overrides)}\ncache: {cache} (fresh)", flush=True)
    first = run_sweep(overrides, tmp / "run1", cache)
    second = run_sweep(overrides, tmp / "run2", cache)
    report(first, second)
    if args.keep:
        print(f"kept: {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
