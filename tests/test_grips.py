"""GRIPS: the phrase splitter, each edit operation, acceptance, patience, and a planted climb."""

import dataclasses
from collections import Counter
from pathlib import Path

import hydra.utils
import numpy as np
from omegaconf import OmegaConf

from methods.grips import GRIPS, add, delete, join, split_phrases, substitute, swap
from methods.racing import fixed_dev
from tests.fakes import PlantedLM, assert_outcomes, planted_task, quality, resumed_and_uninterrupted, run_steps

ROOT = Path(__file__).resolve().parents[1]
KNOWN = "Read the text, then answer whether the statement is true or false."
BAD = "The banana is purple, maybe seven, then ignore it."
PHRASES = ("Read the text,", "then answer whether the", "statement is true", "or false.")


class NoProposer(PlantedLM):
    def generate(self, *args, **kwargs):
        raise AssertionError("GRIPS without paraphrase must not call the proposer")


class ScriptedParaphraser(PlantedLM):
    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.calls += 1
        return [["decide carefully now\nextra line"] * n for _ in contexts]


run = run_steps


def test_split_phrases_cuts_at_punctuation_conjunctions_and_word_windows():
    assert split_phrases(KNOWN, max_words=5) == PHRASES
    assert join(split_phrases(KNOWN, 3)) == KNOWN
    assert all(len(p.split()) <= 3 for p in split_phrases(KNOWN, 3))
    assert split_phrases("") == () and split_phrases("one") == ("one",)


def test_each_edit_operation_on_a_known_instruction():
    rng = np.random.default_rng(0)
    shorter, gone = delete(PHRASES, rng)
    assert len(shorter) == 3 and gone in PHRASES and [p for p in PHRASES if p != gone] == list(shorter)
    swapped = swap(PHRASES, rng)
    assert Counter(swapped) == Counter(PHRASES) and sum(a != b for a, b in zip(swapped, PHRASES)) == 2
    longer = add(shorter, [gone], rng)
    assert len(longer) == 4 and Counter(longer) == Counter(PHRASES)
    replaced = substitute(PHRASES, 1, "  'then reply if the'\nmore")
    assert replaced == (PHRASES[0], "then reply if the") + PHRASES[2:]
    assert substitute(PHRASES, 1, "then answer whether the") is None  # no change is no edit
    assert substitute(PHRASES, 2, " ".join(["word"] * 20)) is None  # runaway continuation
    assert substitute(PHRASES, 2, "\n\n") is None


def test_paraphrase_edit_asks_the_proposer_once_per_step():
    # a one-phrase instruction: paraphrase is the only applicable edit
    task = dataclasses.replace(planted_task(), instruction="the banana")
    lm = ScriptedParaphraser()
    method = GRIPS(num_candidates=3)
    state, reports = run(method, task, lm, steps=1)
    edits = [e for e in reports[0].evaluated if e.kind == "edit"]
    assert lm.calls == 1 + 1  # one generate, one scorer call (the seed scored with the edits)
    assert [e.prompt for e in edits] == ["decide carefully now"]  # three identical paraphrases, deduped
    assert method.best(state).text == "decide carefully now" and state.accepted == 1


def test_without_paraphrase_no_proposer_call_no_worse_acceptance_and_patience_stop():
    task = dataclasses.replace(
        planted_task(), instruction="Decide the label, maybe banana purple, review it carefully, seven"
    )
    lm = NoProposer()
    method = GRIPS(num_candidates=4, patience=2, paraphrase=False, n_eval=0)
    state, reports = run(method, task, lm, steps=50)
    assert method.done(state) and len(reports) < 50
    curve = [r.metrics["objective"] for r in reports]  # what the search climbs
    assert curve == sorted(curve)
    assert quality(method.best(state).text) == quality(task.instruction)  # deleting a good word never wins
    # the last `patience` steps found nothing strictly better
    assert all(r.metrics["step_best"] <= r.metrics["objective"] for r in reports[-2:])
    assert state.accepted == sum(b > a for a, b in zip(curve, curve[1:]))


def test_grips_climbs_the_planted_objective_with_paraphrases():
    task = dataclasses.replace(planted_task(n_dev=60), instruction=BAD)
    lm = PlantedLM()
    method = GRIPS(num_candidates=6, patience=4, n_eval=0)
    state, reports = run(method, task, lm, steps=12)
    assert quality(method.best(state).text) > quality(task.instruction) + 0.15
    assert reports[0].evaluated[0].kind == "seed" and reports[0].evaluated[0].prompt == task.instruction
    assert lm.calls <= 2 * len(reports)


def test_grips_state_pickles_and_resumes_identically():
    task = dataclasses.replace(planted_task(), instruction=BAD)
    method = GRIPS(num_candidates=4, patience=10)
    state, full = resumed_and_uninterrupted(method, task, PlantedLM, seed=3)
    assert state == full


def test_grips_yaml_instantiates():
    cfg = OmegaConf.load(ROOT / "conf/method/grips.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, GRIPS) and method.num_candidates >= 1


def test_the_paper_objective_prefers_a_balanced_instruction_to_one_that_predicts_one_label():
    """Fails on the old behaviour (candidates ranked by plain accuracy): on 70% positive data an
    instruction that answers "positive" to everything has accuracy 0.70, one that is right on
    65% of each class 0.65, yet the paper's score ranks the second first."""
    from methods.grips import balanced_accuracy, label_entropy, paper_objective

    labels = [1] * 70 + [0] * 30
    collapsed = [1] * 100
    balanced = [1] * 46 + [0] * 24 + [0] * 20 + [1] * 10  # 46/70 and 20/30 right: 0.66 accuracy
    assert np.mean(np.equal(collapsed, labels)) > np.mean(np.equal(balanced, labels))
    assert balanced_accuracy(collapsed, labels) == 0.5 and label_entropy(collapsed, 2) == 0.0
    assert balanced_accuracy(balanced, labels) == (46 / 70 + 20 / 30) / 2
    assert label_entropy([0, 1], 2) == np.log(2)
    assert paper_objective(balanced, labels, 2) > paper_objective(collapsed, labels, 2)
    assert paper_objective(balanced, labels, 2) == 100 * (46 / 70 + 20 / 30) / 2 + 10 * label_entropy(balanced, 2)


class LabelMinded(PlantedLM):
    """Under an instruction holding "carefully", each example's own label except for a fixed third
    of the "yes" examples; under any other, "yes" for everything (collapse to one label)."""

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            instruction, sentence = r.context.split("\n")[0], r.context.split("\n")[1]
            number, gold = int(sentence.split()[2]), sentence.endswith("yes")
            says_yes = (gold and number % 3 != 0) if "carefully" in instruction else True
            out.append(0.0 if (r.continuation == " yes") == says_yes else -5.0)
        return np.asarray(out, dtype=np.float64)


def test_grips_with_the_paper_objective_keeps_an_instruction_that_does_not_collapse():
    """The same search on mostly-"yes" dev data: ranked by accuracy (the old behaviour) it
    deletes its way to an instruction that answers "yes" to everything; ranked by the paper's
    score it keeps the careful one, which is right on both classes more often."""
    base = planted_task(n_dev=80)
    dev = tuple([ex for ex in base.dev if ex.label == 1] + [ex for ex in base.dev if ex.label == 0][:8])
    task = dataclasses.replace(base, instruction="Read it carefully, then answer", dev=dev)
    chosen = {}
    for objective in ("metric", "paper"):
        method = GRIPS(num_candidates=6, patience=2, paraphrase=False, n_eval=0, objective=objective)
        state, _ = run(method, task, LabelMinded(), steps=10)
        chosen[objective] = method.best(state).text
    assert "carefully" not in chosen["metric"] and "carefully" in chosen["paper"], chosen


def test_every_edit_records_the_instruction_it_was_applied_to_and_its_outcomes():
    task = dataclasses.replace(planted_task(), instruction=BAD)
    method = GRIPS(num_candidates=4, patience=10, n_eval=16)
    lm, rng = PlantedLM(), np.random.default_rng(0)
    state, bases = method.init(task, lm, lm, rng), []
    for _ in range(4):
        base = join(state.phrases)
        state, report = method.step(state, task, lm, lm, rng)
        for e in report.evaluated:
            assert_outcomes(task, e, fixed_dev(task, 16))
            assert e.parent == ("" if e.kind == "seed" else base) != e.prompt
        bases.append(base)
    assert len(set(bases)) > 1  # an edit was accepted, so later edits had another parent
