"""Chaos drill: a 64-trial sweep while LM actors and trial processes are killed at random moments.

The reference sweep (``manual`` and a slowed APE, 32 seeds each, on the tiny model) runs once
undisturbed; the same sweep then runs while a seeded killer SIGKILLs a random LM actor or trial
process every few seconds (bounded count and time). Ray restarts the actor and retries its
calls; Tune restarts the trial from its last checkpoint, which trims its own log back to it.
Afterwards every trial must have finished and the merged evaluation log must equal the
reference's record by record: nothing lost, nothing twice. Opt-in: ``pytest -m slow tests/test_chaos.py -s``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from tests._fault_sweeps import SLOW_APE, TINY, finished_trials, lost_and_duplicated, run_cli, start_cli, summary_rows

# APE with 8 proposals a round: with 4, the tiny model's junk leaves some seed no usable
# candidate at all, and a trial that fails by itself would blur what the kills did.
CHAOS_APE = SLOW_APE.replace("step_sleep_s: 0.0", "step_sleep_s: 0.3").replace("n_prompts: 4", "n_prompts: 8")
SEEDS = "[" + ",".join(map(str, range(32))) + "]"  # x 2 methods = 64 trials
VICTIMS = ("ray::LMActor", "ray::ImplicitFunc")  # process titles Ray gives LM actors and Tune trials
MAX_KILLS, MAX_LM_KILLS, MAX_S = 12, 2, 900  # LM actors restart at most 3 times (pool.PoolSpec.max_restarts)


def victims() -> list[tuple[int, str]]:
    """``(pid, kind)`` of every live LM actor and trial process."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    found = []
    for line in out.splitlines():
        pid, _, args = line.strip().partition(" ")
        kind = next((v for v in VICTIMS if args.startswith(v)), None)
        if kind:
            found.append((int(pid), kind))
    return found


def kill_at_random(proc: subprocess.Popen, rng: np.random.Generator) -> list[str]:
    """SIGKILL a random victim every 2-6 s until the sweep ends or the caps are reached."""
    kills, lm_kills, deadline = [], 0, time.monotonic() + MAX_S
    while proc.poll() is None and len(kills) < MAX_KILLS and time.monotonic() < deadline:
        time.sleep(float(rng.uniform(2.0, 6.0)))
        pool = [(pid, kind) for pid, kind in victims() if kind != VICTIMS[0] or lm_kills < MAX_LM_KILLS]
        if not pool or proc.poll() is not None:
            continue
        pid, kind = pool[int(rng.integers(len(pool)))]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
        lm_kills += kind == VICTIMS[0]
        kills.append(kind)
    return kills


def chaos_args(run_dir, conf, data_dir) -> list[str]:
    # Enough retries that a trial killed several times still finishes (Tune counts each kill as a failure).
    return [*TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", f"hydra.searchpath=[file://{conf}]",
            "search.methods=[manual,chaos_ape]", f"search.seeds={SEEDS}", "search.max_failures=10"]


@pytest.mark.slow
def test_a_sweep_under_random_kills_finishes_with_nothing_lost_or_repeated(tmp_path, data_dir):
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "chaos_ape.yaml").write_text(CHAOS_APE)
    reference = tmp_path / "reference"
    start = time.perf_counter()
    ref = run_cli(chaos_args(reference, conf, data_dir), timeout=1800)
    assert ref.returncode == 0, ref.stdout[-3000:] + ref.stderr[-3000:]
    ref_s = time.perf_counter() - start

    run_dir = tmp_path / "chaos"
    start = time.perf_counter()
    proc = start_cli(chaos_args(run_dir, conf, data_dir), tmp_path / "chaos.log")
    try:
        kills = kill_at_random(proc, np.random.default_rng(0))
        proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
    chaos_s = time.perf_counter() - start
    log = (tmp_path / "chaos.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    rows = summary_rows(run_dir)
    ok = sum(r["status"] == "ok" for r in rows)
    lost, dup = lost_and_duplicated(reference, run_dir)
    print(f"\nCHAOS {len(kills)} kills ({kills.count(VICTIMS[0])} LM actor, {kills.count(VICTIMS[1])} trial) "
          f"in a 64-trial sweep; {ok}/{len(rows)} trials ok, {finished_trials(run_dir)} result files; "
          f"lost={lost} duplicated={dup}; reference {ref_s:.0f}s, chaos run {chaos_s:.0f}s")
    assert len(kills) >= 3, "too few kills landed to call this a drill"
    assert len(rows) == 64 and ok == 64
    assert (lost, dup) == (0, 0)
