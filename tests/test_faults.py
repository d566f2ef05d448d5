"""Faults a cluster has, injected into real sweeps on the tiny model: nothing is lost or counted twice.

Each fault test breaks one run of the reference sweep (see ``tests/_fault_sweeps.py``) and
then requires every trial's result and exactly the reference's evaluation records: zero
lost, zero duplicated. Each prints one ``FAULT ...`` line saying what it injected, what
happened and the counts (``pytest -s`` shows them).

The sweeps take 30-90 s each on two cores, so all but the failed-trial test are ``slow``:
``pytest -m slow tests/test_faults.py``.
"""

from __future__ import annotations

import json
import re
import signal
import time

import pytest
from ray import tune

from pipelines.results import EvalLog, read_jsonl
from tests._fault_cluster import LocalCluster
from tests._fault_sweeps import (
    TINY, extra_conf, finished_trials, lost_and_duplicated, record_keys, run_cli, start_cli, steps_logged,
    summary_rows, sweep_args, wait_for,
)

RESUMED = re.compile(r"resumed at step (\d+) \(dropped (\d+) uncheckpointed records\)")


@pytest.fixture(scope="module")
def conf(tmp_path_factory):
    return extra_conf(tmp_path_factory.mktemp("conf"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, conf, data_dir):
    """The sweep run once with no fault: what every recovered run must reproduce."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    proc = run_cli(sweep_args(run_dir, conf, data_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_all_ok(run_dir)
    assert sum(record_keys(run_dir).values()) > 4, "the reference sweep scored too little to compare against"
    return run_dir


def _assert_all_ok(run_dir, n: int = 4) -> list[dict]:
    rows = summary_rows(run_dir)
    assert len(rows) == n and all(r["status"] == "ok" for r in rows), rows
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted({(r["method"], r["seed"]) for r in rows})
    return rows


def _no_duplicate_keys(run_dir) -> int:
    keys = [(r["trial"], r["step"], r["idx"]) for r in read_jsonl(run_dir / "evaluations.jsonl")]
    return len(keys) - len(set(keys))


@pytest.mark.slow
def test_lm_actor_killed_mid_request_is_restarted_and_its_requests_retried(tmp_path, conf, data_dir, reference):
    marker = tmp_path / "died"
    fault = [arg for role in ("scorer", "proposer") for arg in (
        f"lm.{role}._target_=tests.drills.dying_backend", f"+lm.{role}.marker={marker}",
        f"+lm.{role}.die_on_call=3")]
    run_dir = tmp_path / "run"
    proc = run_cli(sweep_args(run_dir, conf, data_dir) + fault)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.exists(), "the LM actor never died: the fault was not injected"
    pids = (tmp_path / "died.pids").read_text().split()
    assert len(set(pids)) == 2, f"expected the model loaded by the first actor and by its restart, got pids {pids}"
    _assert_all_ok(run_dir)
    lost, dup = lost_and_duplicated(reference, run_dir)
    print(f"\nFAULT lm-actor: SIGKILL of the LM actor process during its 3rd scoring call; Ray restarted it "
          f"(pid {pids[0]} -> {pids[1]}) and retried the calls in flight; 4/4 trials ok; lost={lost} duplicated={dup}")
    assert (lost, dup) == (0, 0)


@pytest.mark.slow
def test_sigint_then_resume_finishes_in_place_with_nothing_lost_or_repeated(tmp_path, conf, data_dir, reference):
    run_dir = tmp_path / "run"
    # With the live W&B runs on: each trial's run must continue across the resume.
    proc = start_cli(sweep_args(run_dir, conf, data_dir, step_sleep_s=1.5, logger="wandb"), tmp_path / "first.log")
    try:
        wait_for(lambda: finished_trials(run_dir) >= 2 and len(steps_logged(run_dir)) == 2
                 and min(steps_logged(run_dir).values()) >= 2, 240, "manual done and both APE trials at step 2", proc)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    first = (tmp_path / "first.log").read_text()
    assert proc.returncode == 130, first[-3000:]
    assert "interrupted with 2 of 4 trial(s) unfinished" in first and f"resume={run_dir}" in first
    assert not (run_dir / "summary.json").exists(), "an interrupted sweep must not write a summary"
    kept = {p.name: p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*.json")}
    assert len(kept) == 2
    before = _wandb_steps(run_dir)
    assert len(before) == 4 and all(sessions[0] for sessions in before.values()), f"a trial's steps before Ctrl+C are not on disk: {before}"

    hydra_dir = tmp_path / "hydra_resume"
    resumed = run_cli([f"resume={run_dir}", f"hydra.run.dir={hydra_dir}"])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out = resumed.stdout + resumed.stderr
    assert "[manual seed=" not in out, "a finished trial was run again"
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "trials").glob("*.json") if p.name in kept} == kept
    restarts = [(int(a), int(b)) for a, b in RESUMED.findall(out)]
    assert len(restarts) == 2 and all(step >= 1 for step, _ in restarts), out[-3000:]
    _assert_all_ok(run_dir)
    assert not hydra_dir.exists(), "resume left an empty Hydra output directory behind"
    lost, dup = lost_and_duplicated(reference, run_dir)
    after = _wandb_steps(run_dir)
    rows = {r["trial"]: r for r in summary_rows(run_dir)}
    for trial, sessions in after.items():
        steps = [s for session in sessions for s in session]
        assert steps == list(range(1, rows[trial]["steps"] + 1)), f"{trial}: W&B steps {sessions}"  # none twice, no gap
        assert sessions[: len(before[trial])] == before[trial]  # the same run, continued
    resumed_runs = {t: len(s) for t, s in after.items() if len(s) > 1}
    print(f"\nFAULT sigint W&B: per-trial runs before Ctrl+C {_spans(before)}; after resume {_spans(after)}; "
          f"{len(resumed_runs)} run(s) continued across the resume, no step logged twice")
    assert len(resumed_runs) == 2
    print(f"\nFAULT sigint: SIGINT to the driver with manual done and both APE trials past step 2; exit 130; "
          f"resume=<run_dir> continued them from steps {[s for s, _ in restarts]} (dropping "
          f"{sum(d for _, d in restarts)} records logged after their checkpoints); 4/4 trials ok; "
          f"lost={lost} duplicated={dup}")
    assert (lost, dup) == (0, 0) and _no_duplicate_keys(run_dir) == 0


def _wandb_steps(run_dir) -> dict[str, list[list[int]]]:
    """Each trial's W&B run (by trial id): the steps each of its sessions logged, oldest first."""
    from pipelines.live import folder_run_id, records, run_dirs, steps

    out: dict[str, list[list[int]]] = {}
    for folder in run_dirs(run_dir / "wandb"):
        run_id = folder_run_id(folder)
        if "_" in run_id:  # a Tune trial id; the comparison run has W&B's own id
            out.setdefault(run_id, []).append(steps(records(folder)))
    return out


def _spans(runs: dict) -> str:
    return "; ".join(f"{t}: " + " + ".join(f"{s[0]}..{s[-1]}" if len(s) > 1 else (str(s[0]) if s else "none") for s in sessions)
                     for t, sessions in sorted(runs.items()))


def test_trial_that_raises_is_reported_failed_and_the_others_finish(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    # The LM scores for real but every proposal is junk, so APE is left with no usable
    # candidate and raises. A retry would fail the same way (the fault is deterministic).
    junk = [f"lm.{role}._target_=tests.drills.babbling_backend" for role in ("scorer", "proposer")]
    proc = run_cli([*TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", "search.methods=[manual,ape]",
                    "search.seeds=[0,1]", "method.n_prompts=3", "method.n_eval=8", "search.max_failures=0", *junk])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {(r["method"], r["seed"]): r for r in summary_rows(run_dir)}
    assert sorted(rows) == [("ape", 0), ("ape", 1), ("manual", 0), ("manual", 1)]
    assert all(rows[("manual", s)]["status"] == "ok" for s in (0, 1))
    for s in (0, 1):
        assert rows[("ape", s)]["status"] == "failed"
        assert "APE has scored no candidate yet" in rows[("ape", s)]["error"], rows[("ape", s)]
    assert rows[("ape", 0)]["error"].startswith("ValueError: APE has scored no candidate yet")
    assert json.loads((run_dir / "summary.json").read_text())["failed"] == 2
    assert proc.stdout.count("FAILED: ValueError: APE has scored") == 2 and "2 of 4 trial(s) FAILED" in proc.stdout
    records = read_jsonl(run_dir / "evaluations.jsonl")
    dup = _no_duplicate_keys(run_dir)
    print(f"\nFAULT trial-raises: proposer returns junk -> APE raises in both its trials, which are marked "
          f"failed with the error; 2 manual trials ok; exit 1; {len(records)} records, duplicated={dup}")
    assert len(records) == 2 and {r["method"] for r in records} == {"manual"} and dup == 0


@pytest.mark.slow
def test_worker_node_killed_mid_sweep_its_trial_resumes_from_checkpoint(tmp_path, conf, data_dir, reference):
    run_dir = tmp_path / "run"
    with LocalCluster() as cluster:
        # The head has the only CPU, so the LM actor lives there; workers have no CPU and one
        # trial slot each, so trials run only on workers and each slow APE trial on its own node.
        cluster.start_head(num_cpus=1)
        for name in ("w1", "w2"):
            cluster.add_node(name, num_cpus=0, resources={"psw_worker": 1})
        args = sweep_args(run_dir, conf, data_dir, step_sleep_s=1.5) + [
            f"ray.address={cluster.address}", "resources.trial_cpus=0", "+resources.trial_resources={psw_worker: 1}"]
        proc = start_cli(args, tmp_path / "sweep.log", env=cluster.env)
        try:
            wait_for(lambda: finished_trials(run_dir) >= 2 and len(steps_logged(run_dir)) == 2
                     and min(steps_logged(run_dir).values()) >= 2, 240, "both APE trials at step 2", proc)
            killed_at = time.monotonic()
            cluster.kill_node("w1")
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
        recovery_s = time.monotonic() - killed_at
    out = (tmp_path / "sweep.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    _assert_all_ok(run_dir)
    restarts = [(int(a), int(b)) for a, b in RESUMED.findall(out)]
    assert len(restarts) == 1 and restarts[0][0] >= 1, out[-4000:]
    failures = sum(t.num_failures for t in tune.ExperimentAnalysis(str(run_dir / "tune")).trials)
    assert failures == 1
    lost, dup = lost_and_duplicated(reference, run_dir)
    print(f"\nFAULT worker-node: SIGKILL of worker node w1 (raylet, object store, trial process) mid-sweep; "
          f"Tune saw {failures} trial failure and retried it on w2 from its step-{restarts[0][0]} checkpoint "
          f"(dropping {restarts[0][1]} records logged after it); sweep done {recovery_s:.0f}s after the kill; "
          f"4/4 trials ok; lost={lost} duplicated={dup}")
    assert (lost, dup) == (0, 0)


@pytest.mark.slow
def test_a_standing_service_serves_a_second_sweep_without_a_load_and_survives_a_replica_kill(
        tmp_path, conf, data_dir, reference):
    """``lm.service``: two sweeps on one running cluster; the second joins the first's model actors."""
    import os

    pids = tmp_path / "never.pids"  # the wrapped tiny backend appends its pid here each time it loads
    (tmp_path / "never").write_text("claimed")  # its die-once marker is taken: it never dies by itself
    service = [f"lm.scorer._target_=tests.drills.dying_backend", f"+lm.scorer.marker={tmp_path / 'never'}",
               "+lm.scorer.die_on_call=1", "lm.service=svc"]
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=4)
        first = tmp_path / "first"
        proc = run_cli(sweep_args(first, conf, data_dir) + service + [f"ray.address={cluster.address}"], env=cluster.env)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        loaded = pids.read_text().split()
        assert len(loaded) == 1  # the service's scorer loaded its model once

        second = tmp_path / "second"
        proc = start_cli(sweep_args(second, conf, data_dir, step_sleep_s=1.0) + service
                         + [f"ray.address={cluster.address}"], tmp_path / "second.log", env=cluster.env)
        try:
            wait_for(lambda: len(steps_logged(second)) == 2 and min(steps_logged(second).values()) >= 1, 240,
                     "both APE trials of the second sweep at step 1", proc)
            before_kill = pids.read_text().split()
            os.kill(int(loaded[0]), signal.SIGKILL)  # the replica, mid-sweep
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    out = (tmp_path / "second.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    assert before_kill == loaded, "the second sweep loaded a model of its own before the kill"
    assert len(pids.read_text().split()) == 2  # the restarted replica loaded it again, once
    _assert_all_ok(first)
    _assert_all_ok(second)
    lost = [lost_and_duplicated(reference, run) for run in (first, second)]
    print(f"\nFAULT service: sweep 2 joined service 'svc' (0 loads before the kill), its scorer replica "
          f"(pid {loaded[0]}) SIGKILLed mid-sweep and restarted by Ray; lost/duplicated per sweep {lost}")
    assert lost == [(0, 0), (0, 0)]


def test_restore_drops_records_newer_than_the_checkpoint_and_a_torn_line(tmp_path):
    """What a restarted trial does to its log first: keep steps <= checkpoint, drop the rest."""
    log = EvalLog(tmp_path / "t.jsonl")
    log.append([{"step": s, "idx": i} for s in (1, 2, 3) for i in range(2)])
    with open(log.path, "a") as f:
        f.write('{"step": 3, "idx"')  # a crash in the middle of a write
    assert log.truncate_after(2) == 2
    assert [(r["step"], r["idx"]) for r in read_jsonl(log.path)] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert log.path.read_text().endswith("\n")
    assert log.truncate_after(2) == 0
    # A torn line alone (nothing newer to drop) must go too, or the next append is glued onto it.
    with open(log.path, "a") as f:
        f.write('{"step": 3, "idx"')
    assert log.truncate_after(2) == 0
    log.append([{"step": 3, "idx": 0}])
    assert [(r["step"], r["idx"]) for r in read_jsonl(log.path)][-1] == (3, 0)
