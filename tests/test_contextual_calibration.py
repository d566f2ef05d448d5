"""Contextual calibration (Zhao et al. 2021): a label prior the model shows on content-free inputs is
divided out, in dev selection and on test alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from methods.evaluate import predict, predict_raw_and_calibrated, score_prompts
from methods.lm import TextPrompt
from methods.manual import Manual
from pipelines.lm.budget import BudgetedLM, BudgetExhausted, Limits
from pipelines.lm.client import Meter
from tasks.core import Example, TaskError
from tests.fakes import planted_task

BIAS = 1.5  # the fake model's extra log-likelihood for " yes", whatever the input


class BiasedLM:
    """Reads the label an example states (+1 for the right word) but always leans to " yes"."""

    def __init__(self) -> None:
        self.contexts: list[str] = []
        self.usage = Meter()

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            self.contexts.append(r.context)
            line = r.context.rsplit("Input:", 1)[-1]
            stated = "yes" if line.strip().split("\n")[0].endswith("yes") else "no" if "is no" in line else None
            out.append((1.0 if stated == r.continuation.strip() else 0.0) + (BIAS if r.continuation == " yes" else 0.0))
        return np.array(out)


def calibrated_task(**kw):
    return dataclasses.replace(planted_task(**kw), calibration="contextual")


def test_calibration_divides_out_the_prior_the_model_shows_on_content_free_inputs():
    raw_task, cal_task, lm = planted_task(n_test=40), calibrated_task(n_test=40), BiasedLM()
    prompt = TextPrompt("decide")
    raw = predict(raw_task, prompt, raw_task.test, lm)
    assert set(raw) == {1}  # the bias wins every example
    cal = predict(cal_task, prompt, cal_task.test, lm)
    assert cal_task.score(cal, cal_task.test) == 1.0  # the prior divided out, the stated label wins
    assert any("Input: N/A\n" in c for c in lm.contexts) and any("Input: [MASK]\n" in c for c in lm.contexts)


def test_the_raw_and_calibrated_predictions_come_from_one_call_and_match_each_setting():
    task, lm = calibrated_task(n_test=20), BiasedLM()
    raw, cal = predict_raw_and_calibrated(task, TextPrompt("decide"), task.test, lm)
    assert raw == list(predict(planted_task(n_test=20), TextPrompt("decide"), task.test, BiasedLM()))
    assert cal == list(predict(task, TextPrompt("decide"), task.test, BiasedLM()))
    assert raw != cal


def test_dev_selection_uses_the_calibrated_score():
    task, lm = calibrated_task(n_dev=30), BiasedLM()
    (score,) = score_prompts(task, [TextPrompt("decide")], task.dev, lm)
    assert score == 1.0
    state = Manual().init(task, lm, lm, np.random.default_rng(0))
    _, report = Manual().step(state, task, lm, lm, np.random.default_rng(0))
    assert report.metrics["dev_score"] == 1.0


def test_content_free_inputs_count_against_the_budget():
    task = calibrated_task(n_dev=10)
    budgeted = BudgetedLM(BiasedLM(), Limits(examples=12))
    with pytest.raises(BudgetExhausted, match="needs 13"):  # 10 examples and 3 content-free inputs
        score_prompts(task, [TextPrompt("decide")], task.dev, budgeted)
    budgeted = BudgetedLM(BiasedLM(), Limits(examples=13))
    score_prompts(task, [TextPrompt("decide")], task.dev, budgeted)
    assert budgeted.usage.examples == 13


def test_bad_calibration_settings_are_one_line_task_errors():
    with pytest.raises(TaskError, match="calibration='platt'"):
        dataclasses.replace(planted_task(), calibration="platt")
    cloze = dataclasses.replace(planted_task(), test=(Example({"sentence": "x"}, 0, choices=(" a", " b")),))
    with pytest.raises(TaskError, match="one label set"):
        dataclasses.replace(cloze, calibration="contextual")
    with pytest.raises(TaskError, match="content_free"):
        dataclasses.replace(planted_task(), calibration="contextual", content_free=())
    # a task with per-example options cannot be calibrated: test scoring reports raw only
    raw, cal = predict_raw_and_calibrated(cloze, TextPrompt("x"), cloze.test, BiasedLM())
    assert cal is None and len(raw) == 1


def test_the_calibration_option_reaches_every_label_loader(data_dir):
    from tasks.loaders import cr, mr, sst2

    for load in (sst2, mr, cr):
        assert load(str(data_dir), n_train=4, n_dev=4, n_test=4, calibration="contextual").calibration == "contextual"
