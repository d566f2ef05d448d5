"""The driver's start-up checks go through the evaluation cache, so a re-run loads no model for them."""

from __future__ import annotations

import numpy as np

from pipelines import sweep
from pipelines.lm.budget import Meter
from pipelines.lm.cache import CachedLM, EvalStore
from tests.fakes import planted_task


class CountingLM:
    """Scores every request 0.0 and counts the requests and calls that reached it."""

    def __init__(self) -> None:
        self.usage = Meter()

    def loglikelihood(self, requests, prompt=None) -> np.ndarray:
        self.usage.calls += 1
        self.usage.requests += len(requests)
        return np.zeros(len(requests))

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.usage.calls += 1
        self.usage.requests += len(contexts) * n
        return [["x"] * n for _ in contexts]


def test_start_up_checks_answered_by_the_cache_reach_no_model(tmp_path, monkeypatch):
    task = planted_task(n_train=4, n_dev=4, n_test=4)
    monkeypatch.setattr("pipelines.trial.build", lambda spec: (task, None))
    specs = [{"task": {"name": "planted"}, "task_name": "planted"}]
    store = EvalStore(tmp_path / "evals.sqlite")
    first, again = CountingLM(), CountingLM()
    for lm in (first, again):  # the first run, then a re-run against the same cache
        cached = CachedLM(lm, store, "counting:0")
        sweep.check_context(specs, cached)
        sweep.check_proposer(cached)
    assert (first.usage.calls, first.usage.requests) == (2, 2)
    assert (again.usage.calls, again.usage.requests) == (0, 0) and again.usage.cache_calls == 2
