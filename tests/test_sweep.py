"""The driver's start-up checks go through the evaluation cache, so a re-run loads no model for them."""

from __future__ import annotations

import numpy as np

from pipelines import sweep
from pipelines.lm.cache import CachedLM, EvalStore
from pipelines.lm.client import Meter
from pipelines.plan import Plan, task_key
from tests.fakes import planted_task


class CountingLM:
    """Scores every request 0.0 and counts the requests and calls that reached it."""

    def __init__(self) -> None:
        self.usage = Meter()

    def loglikelihood(self, requests) -> np.ndarray:
        self.usage.calls += 1
        self.usage.requests += len(requests)
        return np.zeros(len(requests))

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.usage.calls += 1
        self.usage.requests += len(contexts) * n
        return [["x"] * n for _ in contexts]


def test_start_up_checks_answered_by_the_cache_reach_no_model(tmp_path, monkeypatch):
    task = planted_task(n_train=4, n_dev=4, n_test=4)
    specs = [{"task": {"name": "planted"}, "task_name": "planted"}]
    plan = Plan({}, specs, {}, tasks={task_key(specs[0]): task})
    store = EvalStore(tmp_path / "evals.sqlite")
    first, again = CountingLM(), CountingLM()
    for lm in (first, again):  # the first run, then a re-run against the same cache
        cached = CachedLM(lm, store, "counting:0")
        sweep.check_context(plan, cached)
        sweep.check_proposer(cached)
    assert (first.usage.calls, first.usage.requests) == (2, 2)
    assert (again.usage.calls, again.usage.requests) == (0, 0) and again.usage.cache_calls == 2


class Result:
    """What ``_rows`` reads of a Tune result."""

    def __init__(self, name: str, error=None, metrics=None, sample=None) -> None:
        self.path = f"/runs/tune/{name}"
        self.error, self.metrics = error, metrics or {}
        spec = {"method_name": "prefix_tuning", "task_name": "sst2", "seed": 0, "method": {"lr": 0.01}}
        self.config = {"trial": spec, "sample": sample or {}}


def test_trials_stopped_by_the_scheduler_are_listed_apart_from_failures(tmp_path):
    import json

    from pipelines.summary import format_table

    (tmp_path / "trials").mkdir()
    (tmp_path / "trials" / "t1.json").write_text(json.dumps(
        {"trial": "t1", "method": "prefix_tuning", "task": "sst2", "seed": 0, "best_prompt": "<prefix 4x8>",
         "dev_score": 0.9, "test_score": 0.8}))
    grid = [
        Result("prefix_tuning_s0_t1"),  # finished: its result file is the row
        Result("prefix_tuning_s0_t2", metrics={"step": 4, "dev_score": 0.7, "scorer_calls": 6},
               sample={"prefix_tuning": {"lr": 0.05}}),
        Result("prefix_tuning_s0_t3", error=RuntimeError("boom")),
    ]
    rows = sweep._rows(tmp_path, grid)
    assert [r["status"] for r in rows] == ["ok", "stopped", "failed"]
    stopped = rows[1]
    assert stopped["steps"] == 4 and stopped["dev_score"] == 0.7 and stopped["params"] == {"lr": 0.05}
    table = format_table(rows)
    assert "stopped early at step 4 lr=0.05" in table and "FAILED: RuntimeError: boom" in table
