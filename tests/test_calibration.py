"""Intent-based prompt calibration against the planted fake LM."""

import dataclasses
import pickle
import re
from pathlib import Path

import hydra.utils
import numpy as np
from omegaconf import OmegaConf

from methods.calibration import Calibration, clean_input, input_field
from tasks.core import Example, Task
from tests.fakes import PlantedLM, planted_task, quality, run_steps

ROOT = Path(__file__).resolve().parents[1]


class RecordingLM(PlantedLM):
    def __init__(self):
        super().__init__()
        self.rounds, self.scored_contexts = [], []

    def generate(self, contexts, **kw):
        self.rounds.append(list(contexts))
        return super().generate(contexts, **kw)

    def loglikelihood(self, requests):
        self.scored_contexts += [r.context for r in requests]
        return super().loglikelihood(requests)


run = run_steps


def test_calibration_climbs_the_planted_objective():
    task, lm = planted_task(n_dev=60), PlantedLM()
    method = Calibration(n_proposals=6, n_eval=0)
    state, reports = run(method, task, lm, steps=6)
    assert quality(method.best(state).text) > quality(task.instruction) + 0.15
    curve = [r.metrics["dev_score"] for r in reports]
    assert curve == sorted(curve) and curve[-1] > curve[0]
    assert reports[0].evaluated[0].kind == "seed" and lm.calls == 1 + 5 * 4


def test_calibration_adds_label_conditioned_synthetic_cases_and_tests_the_prompt_on_them():
    task, lm = planted_task(), RecordingLM()
    method = Calibration(n_synthetic=4, max_synthetic=6)
    state, reports = run(method, task, lm, steps=3)
    assert 0 < len(state.synthetic) <= 6 and reports[-1].metrics["synthesized"] >= len(state.synthetic)
    # the first generate call of step 1 asks for one input per target label, cycling through labels
    first = lm.rounds[0]
    targets = [re.search(r"Answer: (\w+)\nInput:$", c).group(1) for c in first]
    assert targets == ["no", "yes", "no", "yes"]
    assert all("Task instruction: the banana" in c for c in first)
    for text, label in state.synthetic:
        assert label in (0, 1)
        assert any(f"\nInput: {text}\nLabel:" in c for c in lm.scored_contexts)
    errors_shown = [c for c in lm.rounds[-1] if "It gets these examples wrong" in c]
    assert len(errors_shown) == method.n_proposals


class TargetEcho(PlantedLM):
    """Writes each synthetic input so that it names the answer its context asked for."""

    def generate(self, contexts, **kw):
        outs = super().generate(contexts, **kw)
        for k, c in enumerate(contexts):
            target = re.search(r"Answer: (\w+)\nInput:$", c)
            if target:
                outs[k] = [f"a tricky case {len(self.generated)}-{k} meant as {target.group(1)}"]
        return outs


def test_each_synthetic_case_keeps_the_label_its_context_asked_for():
    task, lm = planted_task(), TargetEcho()
    state, _ = run(Calibration(n_synthetic=3, max_synthetic=20), task, lm, steps=4)
    assert len(state.synthetic) == 9
    for text, label in state.synthetic:
        assert text.endswith(task.verbalizer[label].strip())
    assert [label for _, label in state.synthetic] == [0, 1, 0, 1, 0, 1, 0, 1, 0]


def test_calibration_with_a_two_field_task_uses_real_examples_only():
    base = planted_task()

    def two(split):
        return tuple(Example({**ex.inputs, "topic": "x"}, ex.label) for ex in split)

    task = Task(
        name="two", template="{instruction}\nInput: {topic} {sentence}\nLabel:",
        verbalizer=base.verbalizer, instruction=base.instruction,
        train=two(base.train), dev=two(base.dev), test=two(base.test),
    )
    assert input_field(task) is None and input_field(base) == "sentence"
    lm = RecordingLM()
    state, _ = run(Calibration(), task, lm, steps=3)
    assert state.synthetic == () and len(lm.rounds) == 2  # only the refinement call each step


class Echoer(PlantedLM):
    def generate(self, contexts, **kw):
        outs = super().generate(contexts, **kw)
        return [["Correct answer: yes"] if "New instruction:" in c else o for c, o in zip(contexts, outs)]


def test_refinements_that_echo_the_error_list_are_dropped():
    state, reports = run(Calibration(n_proposals=3), planted_task(), Echoer(), steps=2)
    assert reports[1].evaluated == () and reports[1].metrics["proposed"] == 3
    assert reports[1].metrics["usable"] == 0 and len(state.scored) == 1


def test_clean_input_keeps_one_reasonable_line():
    assert clean_input("\n  a tricky borderline case \nAnswer: no") == "a tricky borderline case"
    assert clean_input("one") == "" and clean_input(" ".join(["w"] * 100)) == ""


def test_calibration_state_pickles_and_resumes_identically():
    task, method = planted_task(), Calibration()
    full, _ = run(method, task, PlantedLM(), steps=4, seed=4)
    lm, rng = PlantedLM(), np.random.default_rng(4)
    state = method.init(task, lm, lm, rng)
    for _ in range(2):
        state, _ = method.step(state, task, lm, lm, rng)
    state, rng = pickle.loads(pickle.dumps((state, rng)))
    for _ in range(2):
        state, _ = method.step(state, task, lm, lm, rng)
    assert state == full and dataclasses.is_dataclass(state)


def test_calibration_yaml_instantiates():
    cfg = OmegaConf.load(ROOT / "conf/method/calibration.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, Calibration) and method.n_synthetic >= 1
