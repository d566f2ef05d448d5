"""End to end through Hydra, Ray and Tune on a tiny random model: the spine works as a whole."""

from __future__ import annotations

import json

import pytest

from pipelines.results import read_jsonl
from tests.conftest import run_cli

TINY = ["model=tiny", "task.n_train=20", "task.n_dev=16", "task.n_test=24", "cache.enabled=false"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_dir):
    """One small sweep (manual vs APE, two seeds) whose outputs several tests read."""
    run_dir = tmp_path_factory.mktemp("run")
    proc = run_cli(*TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", "search.seeds=[0,1]",
                   "method.n_prompts=3", "method.n_eval=8", "method.rounds=1", "logger=wandb",
                   env={"WANDB_API_KEY": "secret-key-do-not-log"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir, proc


def test_every_trial_finishes_and_the_table_is_printed(sweep):
    run_dir, proc = sweep
    rows = json.loads((run_dir / "summary.json").read_text())["trials"]
    assert sorted((r["method"], r["seed"]) for r in rows) == [("ape", 0), ("ape", 1), ("manual", 0), ("manual", 1)]
    assert all(r["status"] == "ok" and r["n_test"] == 24 for r in rows)
    assert "best prompt" in proc.stdout and f"run directory: {run_dir}" in proc.stdout
    report = (run_dir / "report.md").read_text()
    assert all(f"{r['test_score']:.3f}" in report for r in rows)


def rescored(row: dict, data_dir) -> float:
    """A text trial's best prompt scored in-process on the tiny model and the ``TINY`` test split."""
    from backends.tiny import tiny_backend
    from methods.evaluate import predict
    from methods.lm import TextPrompt
    from tasks.loaders import sst2

    task = sst2(data_dir, n_train=20, n_dev=16, n_test=24)
    return task.score(predict(task, TextPrompt(row["best_prompt"]), task.test, tiny_backend()), task.test)


def test_the_reported_test_score_is_the_prompt_scored_on_test(sweep, data_dir):
    """Rescore every trial's best prompt in-process on the same tiny model: the numbers must agree."""
    run_dir, _ = sweep
    for trial in (run_dir / "trials").glob("*.json"):
        row = json.loads(trial.read_text())
        assert row["test_score"] == pytest.approx(rescored(row, data_dir)), row["method"]


def test_evaluation_log_matches_what_the_methods_scored(sweep):
    run_dir, _ = sweep
    records = read_jsonl(run_dir / "evaluations.jsonl")
    rows = {r["trial"]: r for r in json.loads((run_dir / "summary.json").read_text())["trials"]}
    for trial, row in rows.items():
        mine = [r for r in records if r["trial"] == trial]
        assert mine, f"no evaluations logged for {trial}"
        keys = [(r["step"], r["idx"]) for r in mine]
        assert len(keys) == len(set(keys)), "duplicated evaluation records"
        assert max(r["score"] for r in mine) == pytest.approx(row["dev_score"])
        assert max(r["step"] for r in mine) == row["steps"]
    manual = [r for r in rows.values() if r["method"] == "manual"]
    # manual scores one prompt in one call; plus the one test call at the end
    assert all(r["scorer_calls"] == 2 and r["proposer_calls"] == 0 for r in manual)


def test_one_shared_model_served_every_trial(sweep):
    run_dir, proc = sweep
    assert proc.stdout.count("replica(s) ready") == 1  # proposer shares the scorer's actors
    assert not list((run_dir / "tune").glob("*/model*"))
    actors = json.loads((run_dir / "summary.json").read_text())["lm_actors"]
    assert list(actors) == ["scorer"] and [a["loads"] for a in actors["scorer"]] == [1]


def _summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def test_the_summary_says_what_the_orchestration_cost(sweep):
    """The figures bench/scaling.py builds on: each trial's CPU and wait, the driver's, the replicas' busy time."""
    run_dir, _ = sweep
    summary = _summary(run_dir)
    fit_s = summary["overhead"]["fit_s"]
    assert 0 < summary["overhead"]["driver_cpu_s"] and 0 < fit_s <= summary["wall_s"]
    for row in summary["trials"]:
        assert 0 < row["cpu_s"] and 0 < row["scorer_wait_s"] <= row["wall_s"], row["trial"]
    for actor in summary["lm_actors"]["scorer"]:  # one model thread: never busy longer than the fit
        assert 0 < actor["busy_s"] <= fit_s and 0 < actor["cpu_s"]


@pytest.mark.slow
def test_a_rerun_answered_by_the_cache_loads_no_model(tmp_path, data_dir):
    """The same sweep twice against one cache: the second run's actors never build their model.

    Two whole sweeps (about a minute on two cores), so opt-in; ``tests/test_actor.py`` and
    ``tests/test_sweep.py`` check the same for a fresh pool and for the driver's checks.
    """
    args = [*TINY[:-1], f"data_dir={data_dir}", f"cache.path={tmp_path / 'evals.sqlite'}", "logger=none",
            "search.methods=[ape]", "method.n_prompts=3", "method.n_eval=8", "method.rounds=1"]
    runs = []
    for name in ("first", "again"):
        proc = run_cli(*args, f"hydra.run.dir={tmp_path / name}")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs.append(_summary(tmp_path / name))
    first, again = runs
    assert [a["loads"] for a in first["lm_actors"]["scorer"]] == [1]
    assert [(a["loaded"], a["loads"], a["calls"]) for a in again["lm_actors"]["scorer"]] == [(False, 0, 0)]
    assert all(t["scorer_calls"] == 0 and t["proposer_calls"] == 0 and t["scorer_cache_calls"] > 0 for t in again["trials"])

    def outcome(summary):
        return sorted((t["method"], t["best_prompt"], t["test_score"]) for t in summary["trials"])

    assert outcome(again) == outcome(first)


@pytest.mark.parametrize("role", ["scorer", pytest.param("proposer", marks=pytest.mark.slow)])
def test_a_model_that_cannot_load_is_one_line_and_exit_2(role, tmp_path, data_dir):
    """Actors load their model on first use; the driver's first request to each still fails in one line."""
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "logger=none", f"data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                   f"model@lm.{role}=hf", f"lm.{role}.model=nope-org/nope-model", f"lm.{role}.engine=torch",
                   env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith(f"error: {role} model failed to load: cannot load model 'nope-org/nope-model'"), proc.stderr[-2000:]
    assert sum(ln.startswith("error: ") for ln in lines) == 1
    assert not (run_dir / "summary.json").exists()


def test_secrets_never_reach_results_or_wandb(sweep):
    run_dir, _ = sweep
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and b"secret-key-do-not-log" in p.read_bytes()]
    assert not leaked
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb")), "no offline W&B run written"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["task=nope"], "unknown task 'nope'"),
        (["method=nope"], "unknown method 'nope'"),
        (["model@lm.scorer=nope"], "unknown model 'nope'"),
        (["search.methods=[manual,nope]"], "unknown method 'nope'"),
        (["data_dir=/nonexistent/data"], "data directory not found"),
        (["method.n_prompts=abc"], "n_prompts='abc' should be int"),
        (["search.methods=[]"], "search.methods is empty"),
        (["search.scheduler=nope"], "unknown search.scheduler"),
        (["search.max_steps=nan"], "search.max_steps=nan: expected an integer >= 0"),
        (["resources.replicas=inf"], "resources.replicas=inf: expected an integer >= 1"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, "logger=none", f"hydra.run.dir={run_dir}", *([f"data_dir={data_dir}"] if "data_dir" not in args[0] else []), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr
    assert not run_dir.exists()


def test_a_generative_task_saves_every_test_output_and_reports_wrong_answers(tmp_path):
    rows = [{"word": w, "answer": w[::-1]} for w in ("ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx")]
    data = tmp_path / "reverse.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_dir = tmp_path / "run"
    proc = run_cli("model=tiny", "task=custom_gen", f"task.path={data}", "task.input_fields=[word]",
                   "task.output_field=answer", "task.n_train=4", "task.n_dev=4", "task.max_new_tokens=4",
                   "method=ape", "method.n_prompts=2", "method.n_eval=4", "search.max_steps=1",
                   "cache.enabled=false", "logger=none", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = json.loads((run_dir / "summary.json").read_text())["trials"]
    assert sorted(r["method"] for r in trials) == ["ape", "manual"]
    for r in trials:
        saved = read_jsonl(run_dir / r["outputs"])
        assert [s["input"] for s in saved] == sorted(s["input"] for s in saved) and len(saved) == r["n_test"] == 4
        assert r["test_score"] == pytest.approx(sum(s["score"] for s in saved) / len(saved))
        assert all({"output", "answer", "gold", "correct"} <= set(s) for s in saved)
    report = (run_dir / "report.md").read_text()
    assert "Wrong answers" in report or all(s["correct"] for r in trials for s in read_jsonl(run_dir / r["outputs"]))


def run_transfer(*args: str, timeout: int = 600):
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    return subprocess.run([sys.executable, "-m", "pipelines.transfer", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "WANDB_SILENT": "true"})


def test_transfer_scores_every_trials_prompt_on_another_task(sweep, data_dir):
    """The run's prompts on MR with the same tiny model: each score is that prompt rescored in-process."""
    from backends.tiny import tiny_backend
    from methods.evaluate import predict
    from methods.lm import TextPrompt
    from tasks.loaders import mr

    run_dir, _ = sweep
    proc = run_transfer(str(run_dir), "task=mr", "task.n_train=20", "task.n_dev=16", "task.n_test=20",
                        f"data_dir={data_dir}", "cache.enabled=false")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = (run_dir / "transfer").glob("mr__*.json")
    result = json.loads(path.read_text())
    assert result["same_model"] and result["n_test"] == 20 and len(result["rows"]) == 4
    task, lm = mr(data_dir, n_train=20, n_dev=16, n_test=20), tiny_backend()
    for row in result["rows"]:
        assert row["test_score"] == pytest.approx(task.score(predict(task, TextPrompt(row["best_prompt"]), task.test, lm),
                                                             task.test)), row["method"]
        assert len(row["scores"]) == 20 and row["test_score_raw"] is not None and row["test_score_calibrated"] is not None
    assert "## Transfer" in (run_dir / "report.md").read_text() and "### mr with" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize(("args", "message"), [
    ((), "usage: python -m pipelines.transfer RUN_DIR"),
    (("/nonexistent/run",), "not a finished run directory"),
    (("{run}", "task.n_test=5"), "name it with task=NAME"),
    (("{run}", "task=nope"), "nope"),
    (("{run}", "trials=some"), "trials='some'; expected all or best"),
])
def test_transfer_refuses_bad_input_in_one_line(args, message, tmp_path):
    (tmp_path / "summary.json").write_text('{"trials": [{"status": "ok", "method": "manual", "task": "sst2"}]}')
    (tmp_path / "config.json").write_text('{"lm": {"scorer": {}}}')
    proc = run_transfer(*[a.format(run=tmp_path) for a in args], timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "transfer").exists()


def test_only_text_and_matching_prompts_move_to_another_model(tmp_path):
    import numpy as np

    from methods.lm import PrefixPrompt, SoftPrompt, TextPrompt, TokenPrompt
    from pipelines.results import load_vectors, save_vectors
    from pipelines.transfer import movable

    soft = SoftPrompt(np.arange(8, dtype=np.float32).reshape(2, 4), ("a", "b"))
    save_vectors(tmp_path / "prompts" / "t.npz", soft)
    prefix = PrefixPrompt(np.ones((3, 6), np.float32), "Classify")
    save_vectors(tmp_path / "prompts" / "p.npz", prefix)
    back = load_vectors(tmp_path / "prompts" / "p.npz")
    assert isinstance(back, PrefixPrompt) and np.array_equal(back.key_values, prefix.key_values) and back.origin == "Classify"
    soft_row = {"prompt_kind": "SoftPrompt", "best_prompt": soft.describe(), "prompt_file": "prompts/t.npz"}
    assert movable({"prompt_kind": "TextPrompt", "best_prompt": "Be brief."}, tmp_path, False) == (TextPrompt("Be brief."), "")
    assert movable({"prompt_kind": "TokenPrompt", "best_prompt": "ab", "prompt_tokens": [5, 6]}, tmp_path, False)[0] == \
        TokenPrompt((5, 6), "ab")
    moved, why = movable(soft_row, tmp_path, False)
    assert moved is None and "embedding space" in why
    moved, why = movable(soft_row, tmp_path, True)
    assert isinstance(moved, SoftPrompt) and np.array_equal(moved.embeddings, soft.embeddings) and why == ""
    assert moved.nearest == ("a", "b")
    assert movable({**soft_row, "prompt_file": ""}, tmp_path, True)[0] is None
    assert "not a SoftPrompt" in movable({**soft_row, "prompt_file": "prompts/p.npz"}, tmp_path, True)[1]


def test_trials_best_keeps_each_methods_best_dev_seed():
    from pipelines.transfer import chosen_trials

    rows = [{"trial": f"{m}{s}", "method": m, "task": "sst2", "seed": s, "dev_score": d}
            for m, s, d in [("ape", 0, 0.7), ("ape", 1, 0.9), ("ape", 2, 0.8), ("manual", 0, 0.6)]]
    assert [r["trial"] for r in chosen_trials(rows, "best")] == ["ape1", "manual0"]
    assert chosen_trials(rows, "all") == rows


def test_every_trial_logs_a_live_wandb_run_in_the_sweeps_group(sweep):
    """Per step, each trial's own W&B run holds the dev score and the best prompt so far; the
    comparison run joins them in one group; the API key in the environment reaches none of it."""
    from pipelines.live import history, last_table, records, run_dirs, run_info

    run_dir, proc = sweep
    group = json.loads((run_dir / "config.json").read_text())["logger"]["group"]
    assert group == f"{run_dir.parent.name}-{run_dir.name}"
    for row in _summary(run_dir)["trials"]:
        (folder,) = run_dirs(run_dir / "wandb", row["trial"])
        recs = records(folder)
        assert run_info(recs)["group"] == group and run_info(recs)["job_type"] == "trial"
        steps = history(recs)
        assert [h["_step"] for h in steps] == list(range(1, row["steps"] + 1))
        assert steps[-1]["dev_score"] == pytest.approx(row["dev_score"])
        best = last_table(folder, recs, "best_prompt")
        assert [r[0] for r in best["data"]] == list(range(1, row["steps"] + 1))
        assert best["data"][-1][2] == row["best_prompt"]
        if row["method"] == "ape":  # a population method shows what it keeps
            assert last_table(folder, recs, "population")["data"][0][2] == row["best_prompt"]
    comparison = [d for d in run_dirs(run_dir / "wandb") if run_info(records(d)).get("job_type") == "comparison"]
    assert len(comparison) == 1 and run_info(records(comparison[0]))["group"] == group
    files = [p for p in (run_dir / "wandb").rglob("*") if p.is_file()]
    assert not [p for p in files if b"secret-key-do-not-log" in p.read_bytes()]


def test_off_a_terminal_the_sweep_prints_plain_progress_lines(sweep):
    _, proc = sweep
    heads = [ln for ln in proc.stdout.splitlines() if ln.startswith("[sweep] ")]
    assert heads and heads[-1].startswith("[sweep] 0 running, 0 pending, 4 done, 0 failed | 100% of the sweep")
    assert "\x1b[2K" not in proc.stdout  # no in-place redraws in a log
