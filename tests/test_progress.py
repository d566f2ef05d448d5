"""The sweep's progress view: counts by status, budget against the cap, the ETA, live and plain output."""

from __future__ import annotations

import io
import math
import pickle
from types import SimpleNamespace

import pytest

from pipelines.progress import SweepProgress, counts, eta_s, plain_lines, row, table


def trial(status: str, method: str = "ape", seed: int = 0, **result):
    return SimpleNamespace(status=status, last_result=result,
                           config={"trial": {"method_name": method, "seed": seed, "method": {}}, "sample": {}})


def sweep():
    return [
        trial("TERMINATED", "manual", 0, step=1, scorer_examples=64, test_score=0.6),
        trial("RUNNING", "ape", 0, step=2, dev_score=0.81, scorer_examples=640, scorer_calls=12, wall_s=63.0),
        trial("RUNNING", "opro", 1, step=5, dev_score=0.7, scorer_examples=100, scorer_calls=5, wall_s=30.0),
        trial("PENDING", "evoprompt_ga", 0),
        trial("ERROR", "grips", 0, step=1),
    ]


def test_each_trials_share_done_is_its_budget_or_its_steps_whichever_is_further():
    rows = [row(t, cap=1000, max_steps=10) for t in sweep()]
    assert [r.share for r in rows] == [1.0, 0.64, 0.5, 0.0, 1.0]
    assert row(sweep()[1], cap=None, max_steps=10).share == pytest.approx(0.2)  # no cap: steps only
    assert counts(rows) == {"running": 2, "pending": 1, "done": 1, "failed": 1}
    assert rows[1].label == "ape seed=0" and rows[3].dev != rows[3].dev  # nothing reported yet: NaN


def test_a_trial_ended_before_its_test_score_counts_as_stopped_not_done():
    # Ctrl+C and the ASHA/PBT schedulers end trials that Tune then calls terminated
    rows = [row(t, 1000, 10) for t in [trial("TERMINATED", step=3, scorer_examples=50), *sweep()[:2]]]
    assert counts(rows) == {"running": 1, "pending": 0, "done": 1, "failed": 0, "stopped": 1}
    assert "1 done, 0 failed, 1 stopped |" in plain_lines(rows, 1.0, None, 1000, 10)[0]


def test_a_trials_own_progress_report_is_used_when_it_has_one():
    # e.g. APE with 1 round of 2 planned: half done, though far from its step cap and unbounded
    assert row(trial("RUNNING", step=1, scorer_examples=448, progress=0.5), None, 20).share == 0.5
    assert row(trial("RUNNING", step=1, scorer_examples=448), None, 20).share == 0.05


def test_sampled_hyperparameters_name_the_trial():
    t = trial("RUNNING", "ape")
    t.config["sample"] = {"ape": {"n_prompts": 8}}
    assert row(t, 100, 10).label == "ape seed=0 n_prompts=8"


def test_eta_extrapolates_this_runs_pace_to_the_work_left():
    rows = [row(t, cap=1000, max_steps=10) for t in sweep()]  # 3.14 of 5 trials' work done
    done = sum(r.share for r in rows) / 5
    assert eta_s(rows, elapsed_s=100.0, share_at_start=0.0) == pytest.approx(100.0 * (1 - done) / done)
    # resumed with 2 trials' work already done: only what this run did sets the pace
    assert eta_s(rows, 100.0, share_at_start=0.4) == pytest.approx(100.0 * (1 - done) / (done - 0.4))
    assert eta_s(rows, 100.0, share_at_start=done) is None  # no progress yet this run
    assert eta_s([row(trial("TERMINATED"), 10, 10)], 5.0, 0.0) == 0.0


def test_plain_lines_show_counts_eta_and_each_running_trials_budget():
    rows = [row(t, cap=1000, max_steps=10) for t in sweep()]
    lines = plain_lines(rows, 125.0, 300.0, cap=1000, max_steps=10)
    assert lines[0] == ("[sweep] 2 running, 1 pending, 1 done, 1 failed | 63% of the sweep | "
                        "elapsed 2m05s, ETA 5m00s")
    assert lines[1] == "[sweep]   ape seed=0: step 2/10, dev 0.810, scorer_examples 640/1,000 (64%), 1m03s"
    assert len(lines) == 3  # running trials only


def test_running_trials_past_their_search_say_test_scoring_is_left():
    rows = [row(trial("RUNNING", step=1, progress=1.0), None, 20), row(trial("TERMINATED", test_score=0.5), None, 20)]
    eta = eta_s(rows, 60.0, 0.0)
    assert eta == 0.0 and plain_lines(rows, 60.0, eta, None, 20)[0].endswith("elapsed 1m00s, test scoring left")
    done = [row(trial("TERMINATED", test_score=0.5), None, 20)]
    assert plain_lines(done, 60.0, eta_s(done, 60.0, 0.0), None, 20)[0].endswith("ETA 0s")


def test_the_live_table_lists_running_then_failed_trials():
    from rich.console import Console

    rows = [row(t, cap=1000, max_steps=10) for t in sweep()]
    console = Console(file=io.StringIO(), width=140, record=True)
    console.print(table(rows, 125.0, None, cap=1000, max_steps=10))
    text = console.export_text()
    assert "2 running, 1 pending, 1 done, 1 failed" in text and "ETA ?" in text
    assert "640/1,000 (64%)" in text and "0.810" in text
    assert text.index("opro seed=1") < text.index("grips seed=0") and "manual" not in text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_on_a_terminal_the_view_is_redrawn_in_place(monkeypatch):
    out = Terminal()
    monkeypatch.setattr("sys.stdout", out)
    view = SweepProgress(cap=1000, max_steps=10)
    view.setup()
    view.on_step_end(0, sweep())
    view.on_experiment_end(sweep())
    text = out.getvalue()
    assert "ape seed=0" in text and "640/1,000" in text
    assert "\x1b[" in text and "[sweep]" not in text  # cursor control: redrawn, not appended


def test_off_a_terminal_plain_lines_are_printed_when_counts_change_and_on_an_interval(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr("pipelines.progress.time.monotonic", lambda: clock[0])
    view = SweepProgress(cap=1000, max_steps=10, interval_s=30)
    view.setup()
    trials = sweep()
    view.on_step_end(0, trials)  # first: the whole view
    clock[0] = 5.0
    view.on_step_end(1, trials)  # nothing changed, too soon: nothing
    trials[3].status = "RUNNING"
    view.on_trial_start(2, trials, trials[3])  # a trial started: the headline only
    clock[0] = 40.0
    view.on_step_end(3, trials)  # the interval passed: the whole view again
    lines = capsys.readouterr().out.splitlines()
    heads = [ln for ln in lines if not ln.startswith("[sweep]   ")]
    assert len(heads) == 3 and "3 running, 0 pending" in heads[1]
    assert sum(ln.startswith("[sweep]   ") for ln in lines) == 2 + 3


def test_trials_tune_has_not_created_yet_count_as_pending(capsys):
    view = SweepProgress(cap=1000, max_steps=10, mode="plain")
    view.setup(total_num_samples=8)  # Tune creates trials lazily when few may run at once
    view.on_step_end(0, sweep())
    head = capsys.readouterr().out.splitlines()[0]
    assert head.startswith("[sweep] 2 running, 4 pending, 1 done, 1 failed | 39% of the sweep")


def test_the_view_pickles_to_its_settings_for_tune_restore():
    view = SweepProgress(cap=5, max_steps=3, mode="plain", interval_s=7)
    view.setup()
    view.on_step_end(0, sweep())
    back = pickle.loads(pickle.dumps(view))
    assert (back.cap, back.max_steps, back.mode, back.interval_s) == (5, 3, "plain", 7.0)
    assert back._share_at_start is None and math.isinf(back._printed_at)  # a resumed sweep measures afresh


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="progress.mode must be one of auto, live, plain, off"):
        SweepProgress(cap=None, max_steps=1, mode="fancy")


def test_a_trial_reports_the_furthest_of_budget_step_cap_and_planned_steps():
    from methods.ape import APE
    from methods.manual import Manual
    from pipelines.lm.budget import share_spent

    assert share_spent(1, 100, None, 20, Manual().planned_steps()) == 1.0  # one planned step
    assert share_spent(1, 448, None, 20, APE(rounds=1).planned_steps()) == 0.5
    assert share_spent(2, 600, 1000, 20) == 0.6  # open-ended: the budget
    assert share_spent(5, 100, 1000, 10) == 0.5  # the step cap
    assert share_spent(30, 2000, 1000, 10) == 1.0
