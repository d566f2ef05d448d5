"""A trial's live W&B run: its step tables, and a resumed run that continues without logging a step twice.

The resume tests write real offline W&B runs and read them back with W&B's own reader
(``wandb leet inspect``), as ``python -m pipelines.live`` does.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from methods.base import Evaluated, Snapshot
from methods.lm import PrefixPrompt, SoftPrompt, TextPrompt, TokenPrompt
from pipelines.live import LiveLog, history, last_table, logged_steps, records, run_dirs, show, step_rows

VOCAB = {5: " great", 9: "!", 11: " movie"}


def test_autoprompt_rows_show_the_current_triggers_token_by_token():
    best, current = TokenPrompt((5, 9), " great!"), TokenPrompt((11, 9), " movie!")
    hist, per_step = step_rows(4, 0.7, best, Snapshot(current=current), (Evaluated(" movie!", 0.6, 8),), VOCAB.get)
    assert hist["triggers"] == [[4, 0.7, " movie!", "' movie' | '!'", "11 9", " great!"]]
    assert hist["best_prompt"] == [[4, 0.7, " great!"]]
    assert per_step == {"candidates": [[4, 0, "candidate", " movie!", 0.6, 8]]}


def test_soft_prompt_rows_show_norms_and_nearest_tokens():
    best = SoftPrompt(np.array([[3.0, 4.0], [0.0, 1.0]], dtype=np.float32), ("good", "film"))
    current = SoftPrompt(np.array([[6.0, 8.0], [0.0, 2.0]], dtype=np.float32))
    hist, _ = step_rows(2, 0.5, best, Snapshot(current=current), (), VOCAB.get)
    assert hist["soft_prompt"] == [[2, 0.5, "soft", 6.0, 3.0, "10 2", "'good' | 'film'"]]
    assert "triggers" not in hist
    prefix = PrefixPrompt(np.ones((2, 4), dtype=np.float32), "Classify")
    hist, _ = step_rows(1, 0.5, prefix, Snapshot(), (), VOCAB.get)  # no snapshot: the best is the current
    assert hist["soft_prompt"][0][2:6] == ["prefix", 2.0, 2.0, "2 2"]


def test_text_rows_show_the_population_best_first():
    snap = Snapshot(population=(("b", 0.9), ("a", 0.4)))
    hist, per_step = step_rows(3, 0.9, TextPrompt("b"), snap, (), VOCAB.get)
    assert per_step == {"population": [[3, 1, "b", 0.9], [3, 2, "a", 0.4]]}
    assert set(hist) == {"best_prompt"}


def test_population_methods_show_what_they_keep_best_first():
    from methods.evoprompt import EvoPrompt, EvoState
    from methods.opro import OPRO, OPROState
    from methods.protegi import ProTeGi, ProTeGiState

    evo = EvoPrompt(variant="ga", pop_size=3).snapshot(EvoState(population=(("x", 0.2), ("y", 0.8), ("z", 0.5))))
    assert evo.population == (("y", 0.8), ("z", 0.5), ("x", 0.2))
    opro = OPRO(top_k=2).snapshot(OPROState(scored=(("a", 0.1), ("b", 0.3), ("c", 0.2))))
    assert opro.population == (("b", 0.3), ("c", 0.2))
    beam = ProTeGi().snapshot(ProTeGiState(beam=("p", "q"), scored=(("q", 0.6), ("p", 0.4), ("r", 0.9))))
    assert beam.population == (("q", 0.6), ("p", 0.4))  # the beam, not every prompt ever scored


class Recorder:
    """A W&B run that keeps what is logged."""

    def __init__(self) -> None:
        self.logged = []

    def log(self, data: dict, step: int, commit: bool = False) -> None:
        self.logged.append((step, data))


def _three_steps(log: LiveLog, steps=(1, 2, 3)) -> None:
    for s in steps:
        log.record(s, {"dev_score": s / 10, "scorer_examples": 8 * s, "note": "text is not a scalar"},
                   {"best_prompt": [[s, s / 10, f"p{s}"]]}, {"candidates": [[s, 0, "candidate", f"p{s}", s / 10, 8]]})


def test_a_step_the_run_already_holds_is_not_logged_again():
    run = Recorder()
    log = LiveLog(run=run, logged=2)  # a resumed run whose files hold steps up to 2
    _three_steps(log)
    assert [s for s, _ in run.logged] == [3]
    step, data = run.logged[0]
    assert data["dev_score"] == 0.3 and "note" not in data
    assert [row[0] for row in data["best_prompt"].data] == [1, 2, 3]  # rows of earlier steps kept


def test_catch_up_logs_checkpointed_steps_whose_log_was_lost():
    first = LiveLog()
    _three_steps(first)  # the checkpoint holds steps 1-3; the old process's file only 1
    run = Recorder()
    resumed = LiveLog(first.state(), run=run, logged=1)
    resumed.catch_up()
    assert [s for s, _ in run.logged] == [2, 3]
    step2, step3 = run.logged[0][1], run.logged[1][1]
    assert [r[0] for r in step2["best_prompt"].data] == [1, 2]  # the table as it stood at step 2
    assert "candidates" not in step2 and step3["candidates"].data[0][3] == "p3"


SESSION = """
import sys, time, wandb
from pipelines.live import LiveLog, run_settings
run = wandb.init(project="t", mode="offline", dir=sys.argv[1], id="trial1", resume="allow", settings=run_settings())
log = LiveLog(run=run)
for s in (1, 2, 3):
    log.record(s, {"dev_score": s / 10}, {"best_prompt": [[s, s / 10, f"p{s}"]]}, {})
print("logged", flush=True)
time.sleep(60)  # killed here, as Ctrl+C kills a trial: no finish, no final flush
"""


def _killed_session(tmp_path) -> None:
    """Steps 1-3 logged by a process that is then SIGKILLed (a trial stopped by Ctrl+C)."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(SESSION), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True, env={"WANDB_SILENT": "true", **_env()})
    try:
        assert proc.stdout.readline().strip() == "logged"
        time.sleep(2.5)  # past the run's 1 s flush interval
    finally:
        proc.kill()
        proc.wait()


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}


def test_a_killed_trials_steps_survive_and_its_resumed_run_continues_them(tmp_path):
    import wandb

    from pipelines.live import run_settings

    _killed_session(tmp_path)
    wandb_dir = tmp_path / "wandb"
    assert logged_steps(wandb_dir, "trial1") == [1, 2, 3], "the killed process's steps did not reach its file"

    # The resumed trial restarts from its step-2 checkpoint and redoes step 3.
    checkpoint = LiveLog()
    for s in (1, 2):
        checkpoint.record(s, {"dev_score": s / 10}, {"best_prompt": [[s, s / 10, f"p{s}"]]}, {})
    run = wandb.init(project="t", mode="offline", dir=str(tmp_path), id="trial1", resume="allow",
                     settings=run_settings())
    resumed = LiveLog(checkpoint.state(), run=run, logged=max(logged_steps(wandb_dir, "trial1")))
    resumed.catch_up()
    for s in (3, 4):
        resumed.record(s, {"dev_score": s / 10}, {"best_prompt": [[s, s / 10, f"p{s}"]]}, {})
    resumed.finish({"test_score": 0.5})

    sessions = run_dirs(wandb_dir, "trial1")
    assert len(sessions) == 2
    steps = [[h["_step"] for h in history(records(d))] for d in sessions]
    assert steps == [[1, 2, 3], [4]]  # the same run continued; step 3 not logged twice
    table = last_table(sessions[-1], records(sessions[-1]), "best_prompt")
    assert table["step"] == 4 and [r[0] for r in table["data"]] == [1, 2, 3, 4]
    out = show(tmp_path, table="best_prompt")
    assert "2 session(s), steps 1..3 + 4" in out and "LOGGED TWICE" not in out and "p4" in out


@pytest.mark.parametrize("bad", [["x"], [], [".", "width=wide"]])
def test_the_reader_needs_a_run_directory(bad, capsys):
    from pipelines.live import main

    assert main(bad) == 2
    assert "usage: python -m pipelines.live RUN_DIR" in capsys.readouterr().err


def test_a_failing_live_view_never_ends_the_search(capsys):
    """A method whose best() fails mid-search (or a W&B error) costs one line, not the trial."""
    from pipelines.trial import _watch

    class Broken:
        def best(self, state):
            raise RuntimeError("no best yet")

    run = {"step": 3, "dev_score": 0.5, "state": None}
    live = LiveLog(run=Recorder())
    _watch(live, Broken(), run, {"dev_score": 0.5}, type("R", (), {"evaluated": ()})(), None, "opro seed=0")
    assert live.run is None and "live" in run
    assert "[opro seed=0] live view failed at step 3 (RuntimeError: no best yet)" in capsys.readouterr().out
