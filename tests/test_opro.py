"""OPRO against the planted fake LM: the scored history must steer the search."""

import re
from pathlib import Path

import hydra.utils
import numpy as np
from omegaconf import OmegaConf

from methods.opro import OPRO, OPROState, meta_prompt
from methods.racing import fixed_dev
from tests.fakes import (PlantedLM, WritingLog, assert_outcomes, planted_task, quality, resumed_and_uninterrupted,
                         run_steps)

ROOT = Path(__file__).resolve().parents[1]


run = run_steps


def test_opro_climbs_the_planted_objective_with_one_scorer_call_per_step():
    task, lm = planted_task(n_dev=60), PlantedLM()
    method = OPRO(n_proposals=6, n_eval=0)
    state, reports = run(method, task, lm, steps=6)
    best = method.best(state).text
    assert quality(best) > quality(task.instruction) + 0.15
    curve = [r.metrics["dev_score"] for r in reports]
    assert curve == sorted(curve) and curve[-1] > curve[0]
    # step 0 scores the seed only; later steps: one generate call + one scorer call
    assert lm.calls == 1 + 5 * 2
    assert reports[0].evaluated[0].prompt == task.instruction and reports[0].evaluated[0].kind == "seed"
    logged = [e.prompt for r in reports for e in r.evaluated]
    assert len(logged) == len(state.scored) == len(set(logged))
    assert reports[-1].metrics["usable"] <= reports[-1].metrics["proposed"] == 5 * 6


def test_opro_proposals_improve_as_the_history_improves():
    # The fake proposer recombines words it is shown: only a history showing the *best* past
    # instructions makes later proposals better than the first ones (averaged over seeds).
    gains = []
    for seed in range(6):
        task, lm = planted_task(n_dev=60), PlantedLM()
        _, reports = run(OPRO(n_proposals=6, n_eval=0, top_k=3), task, lm, steps=8, seed=seed)
        first = np.mean([quality(e.prompt) for e in reports[1].evaluated])
        late = np.mean([quality(e.prompt) for r in reports[-3:] for e in r.evaluated])
        gains.append(late - first)
    assert np.mean(gains) > 0.01


def test_meta_prompt_lists_top_k_ascending_with_integer_scores_and_ins_exemplars():
    task = planted_task()
    history = [("Alpha beta", 0.7), ("Gamma delta", 0.55), ("Epsilon zeta", 0.9), ("Eta theta", 0.6)]
    text = meta_prompt(task, history, task.train[:2], top_k=3)
    shown = re.findall(r"text:\n(.*)\nscore:\n(\d+)", text)
    assert shown == [("Eta theta", "60"), ("Alpha beta", "70"), ("Epsilon zeta", "90")]
    assert text.count("<INS>\nInput: case") == 2
    assert text.endswith("text:\n")


class EchoLM(PlantedLM):
    """Proposes the best instruction already in its context (a copy) or a fixed new one."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.calls += 1
        shown = [re.findall(r"text:\n(.*)\nscore", c) for c in contexts]
        return [[s[-1] if j % 2 == 0 else "Decide the label carefully." for j in range(n)] for s in shown]


def test_opro_drops_duplicates_of_scored_and_of_each_other():
    task, lm = planted_task(), EchoLM()
    method = OPRO(n_proposals=4)
    state, reports = run(method, task, lm, steps=2)
    assert [t for t, _ in state.scored] == [task.instruction, "Decide the label carefully."]
    assert reports[1].metrics["proposed"] == 4 and reports[1].metrics["usable"] == 1


def test_opro_state_pickles_and_resumes_to_the_same_state():
    task, method = planted_task(), OPRO(n_proposals=3)
    state, full = resumed_and_uninterrupted(method, task, PlantedLM, seed=5)
    assert isinstance(state, OPROState) and state == full


def test_opro_yaml_instantiates():
    cfg = OmegaConf.load(ROOT / "conf/method/opro.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, OPRO) and method.n_proposals >= 1


class RecordingProposer(PlantedLM):
    def __init__(self) -> None:
        super().__init__()
        self.asked = []

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.asked.append((list(contexts), n))
        k = len(self.asked)
        return [[f"Decide the label, take {k}.{i}.{j}" for j in range(n)] for i in range(len(contexts))]


def test_one_meta_prompt_per_step_is_sampled_for_every_proposal_as_the_paper_does():
    """Fails on the old behaviour (one meta-prompt per proposal, each with its own exemplars)."""
    task = planted_task()
    lm = RecordingProposer()
    state, _ = run(OPRO(n_proposals=5, n_exemplars=3), task, lm, steps=3)
    assert [(len(contexts), n) for contexts, n in lm.asked] == [(1, 5), (1, 5)]  # step 1 scores the seed only
    assert len(state.scored) == 1 + 5 + 5
    lm = RecordingProposer()
    run(OPRO(n_proposals=5, shared_meta_prompt=False), task, lm, steps=2)
    (contexts, n), = lm.asked
    assert len(contexts) == 5 and n == 1 and len(set(contexts)) > 1  # each its own exemplar draw


def test_opro_records_the_best_shown_instruction_as_each_proposals_parent_and_its_outcomes():
    task, lm = planted_task(), WritingLog()
    _, reports = run(OPRO(n_proposals=4, n_eval=16, top_k=3), task, lm, steps=4)
    assert reports[0].evaluated[0].parent == ""  # the seed
    history = []
    for report in reports:
        for e in report.evaluated:
            assert_outcomes(task, e, fixed_dev(task, 16))
            if e.kind == "candidate":
                best_shown = sorted(history, key=lambda p: p[1])[-1][0]
                assert e.parent == best_shown
                (context, *_) = lm.contexts_for(e.prompt)
                assert re.findall(r"text:\n(.*)\nscore", context)[-1] == e.parent  # right before the cue
        history += [(e.prompt, e.score) for e in report.evaluated]
    assert len({e.parent for r in reports[1:] for e in r.evaluated}) > 1  # the parent moved as the search climbed
