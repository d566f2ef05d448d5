"""Promptimal-style rewriting: requests from failures, strict improvement, lineages, starts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from methods.promptimal import Promptimal, hardest_first, rewrite_request, task_description
from tasks.core import example_key
from tests.fakes import GOOD_WORDS, PlantedLM, planted_task, quality, resumed_and_uninterrupted, run_steps


class Recording(PlantedLM):
    """The planted LM, keeping every generate context."""

    def __init__(self, script: list[str] | None = None) -> None:
        super().__init__()
        self.contexts: list[str] = []
        self.script = script

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.contexts += list(contexts)
        if self.script is not None:
            self.calls += 1
            return [list(self.script[:n]) for _ in contexts]
        return super().generate(contexts, max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed, stop=stop)


def test_rewriting_climbs_and_every_rewrite_names_the_lineage_text_it_was_written_from():
    task, lm = planted_task(), PlantedLM()
    method = Promptimal(steps=4, n_samples=4, n_eval=40)
    state, reports = run_steps(method, task, lm, steps=10)
    assert len(reports) == 5 and method.done(state)
    start = reports[0].evaluated[0]
    assert start.prompt == task.instruction and start.parent == ""
    lineage, current = task.instruction, start.score
    for report in reports[1:]:
        assert report.evaluated, "every round rewrites"
        assert {e.parent for e in report.evaluated} == {lineage}
        for e in report.evaluated:  # the first best rewrite strictly above the lineage's score
            if e.score > current:
                lineage, current = e.prompt, e.score
    assert state.lineages[0].text == lineage and state.lineages[0].score == current
    assert reports[-1].metrics["dev_score"] > reports[0].metrics["dev_score"]
    assert quality(method.best(state).text) > quality(task.instruction)


def test_a_rewrite_is_kept_only_when_strictly_better_on_the_same_examples():
    task = planted_task()
    tie = "The apple"  # quality 0.5, as the seed "the banana": the same score on every example
    lm = Recording(script=[tie])
    state, reports = run_steps(Promptimal(steps=1, n_samples=1, n_eval=40), task, lm, steps=2)
    assert reports[1].evaluated[0].prompt == tie
    assert reports[1].evaluated[0].score == pytest.approx(reports[0].evaluated[0].score)
    assert state.lineages[0].text == task.instruction and reports[1].metrics["accepted"] == 0


def test_the_request_shows_the_current_prompts_failures_most_missed_first():
    task = planted_task(n_dev=20)
    good = " ".join(GOOD_WORDS[:2]).capitalize()
    lm = Recording(script=[good])
    method = Promptimal(steps=2, n_samples=1, n_failures=20, n_eval=0)
    state, reports = run_steps(method, task, lm, steps=3)
    seed = reports[0].evaluated[0]
    wrong = [k for k, o in zip(seed.examples, seed.outcomes) if o < 1]
    first = lm.contexts[0]
    assert first.startswith(rewrite_request(task_description(task), task.instruction, seed.score, "")[:60])
    shown = [ln.removeprefix("Input: ") for ln in first.splitlines() if ln.startswith("Input: ")]
    by_key = {example_key(ex): ex.inputs["sentence"] for ex in task.dev}
    assert shown == [by_key[k] for k in wrong] and len(shown) == len(wrong) > 0
    # Second request: the new lineage text's failures, the ones both prompts missed first.
    second = lm.contexts[1]
    assert f"Instruction: {good}\n" in second
    rewrite = reports[1].evaluated[0]
    misses = {k: (a < 1) + (b < 1) for k, a, b in zip(seed.examples, seed.outcomes, rewrite.outcomes)}
    expected = [by_key[rewrite.examples[i]] for i in hardest_first(rewrite.examples, rewrite.outcomes, misses)]
    shown2 = [ln.removeprefix("Input: ") for ln in second.splitlines() if ln.startswith("Input: ")]
    assert shown2 == expected
    assert [misses[k] for k in (example_key(ex) for ex in task.dev) if by_key[k] in shown2][:1] == [2]


def test_hardest_first_orders_wrong_examples_by_misses_then_dev_order():
    keys = ["a", "b", "c", "d"]
    assert hardest_first(keys, [0, 1, 0, 0], {"a": 1, "c": 3, "d": 3}) == [2, 3, 0]


def test_a_rewrite_copying_a_shown_example_is_dropped():
    task, lm = planted_task(n_dev=10), Recording()
    method, rng = Promptimal(steps=1, n_samples=2, n_failures=10, n_eval=0), np.random.default_rng(0)
    state, report = method.step(method.init(task, lm, lm, rng), task, lm, lm, rng)
    missed = [k for k, o in zip(report.evaluated[0].examples, report.evaluated[0].outcomes) if o < 1][0]
    copy = next(ex.inputs["sentence"] for ex in task.dev if example_key(ex) == missed)
    lm.script = [copy, "Decide the label carefully"]
    _, report = method.step(state, task, lm, lm, rng)
    assert copy in lm.contexts[-1]
    assert [e.prompt for e in report.evaluated] == ["Decide the label carefully"]


def test_starts_file_gives_one_lineage_per_prompt_for_its_task(tmp_path):
    task = planted_task()
    path = tmp_path / "starts.json"
    path.write_text(json.dumps({"planted": ["the banana seven", "maybe purple"], "other": ["x y"]}))
    state, reports = run_steps(Promptimal(steps=1, n_samples=2, starts_file=str(path)), task, PlantedLM(), steps=2)
    assert len(state.lineages) == 2
    assert [e.prompt for e in reports[0].evaluated] == ["the banana seven", "maybe purple"]
    # both lineages were rewritten in the one call, each rewrite naming its own lineage's text
    assert {e.parent for e in reports[1].evaluated} == {"the banana seven", "maybe purple"}
    with pytest.raises(ValueError, match="starts_file"):
        Promptimal(starts_file=str(tmp_path / "missing.json"))


def test_state_is_a_faithful_checkpoint():
    resumed, full = resumed_and_uninterrupted(Promptimal(steps=3), planted_task(), PlantedLM, steps=4, split=2)
    assert resumed == full


def test_one_generate_and_one_scoring_call_per_round():
    task, lm = planted_task(), PlantedLM()
    method = Promptimal(steps=1, n_samples=3, starts=("the banana", "seven maybe"))
    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    state, _ = method.step(state, task, lm, lm, rng)
    before = lm.calls
    method.step(state, task, lm, lm, rng)
    assert lm.calls - before == 2
