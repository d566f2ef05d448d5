"""Promptbreeder against the planted fake LM: tournaments, elitism, each mutation operator."""

import re
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from methods.promptbreeder import (
    MUTATION_PROMPTS, OPERATORS, THINKING_STYLES, Promptbreeder, eda_context, elite, tournaments,
)
from methods.racing import predict_many
from tests.fakes import GOOD_WORDS, PlantedLM, planted_task, quality, resumed_and_uninterrupted

ROOT = Path(__file__).resolve().parents[1]


class RecordingLM(PlantedLM):
    def __init__(self):
        super().__init__()
        self.rounds = []

    def generate(self, contexts, **kw):
        self.rounds.append(list(contexts))
        return super().generate(contexts, **kw)


def run(method, task, lm, steps, seed=0, check=None):
    rng = np.random.default_rng(seed)
    state = method.init(task, lm, lm, rng)
    reports = []
    for _ in range(steps):
        new, report = method.step(state, task, lm, lm, rng)
        if check and state.units:
            check(state, new)
        state = new
        reports.append(report)
    return state, reports


def keeps_elite(old, new):
    i = elite(old.units)
    assert new.units[i] == old.units[i]


def test_promptbreeder_climbs_and_never_loses_its_elite():
    task, lm = planted_task(n_dev=60), PlantedLM()
    method = Promptbreeder(pop_size=8, n_eval=0)
    state, reports = run(method, task, lm, steps=8, check=keeps_elite)
    assert quality(method.best(state).text) > quality(task.instruction) + 0.15
    curve = [r.metrics["dev_score"] for r in reports]
    assert curve == sorted(curve) and curve[-1] > curve[0]
    assert reports[-1].metrics["population_mean"] > reports[0].metrics["population_mean"]
    assert len(state.units) == 8


@pytest.mark.parametrize("op", OPERATORS)
def test_each_operator_yields_scored_mutants_that_replace_only_losers(op):
    task, lm = planted_task(), RecordingLM()
    method = Promptbreeder(pop_size=6, operators=(op,))
    state, _ = run(method, task, lm, steps=1, seed=1)
    rng = np.random.default_rng(2)
    new, report = method.step(state, task, lm, lm, rng)
    assert report.evaluated and all(e.kind == "mutant" for e in report.evaluated)
    changed = [i for i, (a, b) in enumerate(zip(state.units, new.units)) if a != b]
    pairs = tournaments(state.units, np.random.default_rng(2))
    assert set(changed) <= {loser for _, loser in pairs}
    assert len(lm.rounds) == 1 + (2 if op.startswith("hyper") else 1)


def test_hypermutation_rewrites_a_mutation_prompt_and_then_applies_it():
    task, lm = planted_task(), RecordingLM()
    method = Promptbreeder(pop_size=6, operators=("hyper_first",))
    state, reports = run(method, task, lm, steps=2)
    evolved = [u[1] for u in state.units if u[1] not in MUTATION_PROMPTS]
    assert evolved and reports[-1].metrics["evolved_mutation_prompts"] == len(evolved)
    assert all(c.startswith("Please summarize and improve the following instruction:") for c in lm.rounds[1])
    # the second call applies each new mutation prompt to its winner's task prompt
    assert any(c.startswith(evolved[0] + "\nINSTRUCTION: ") for c in lm.rounds[2])


def test_tournament_winner_is_fitter_and_ties_go_to_the_elite():
    units = (("a b", "m", 0.5), ("c d", "m", 0.9), ("e f", "m", 0.9), ("g h", "m", 0.1))
    assert elite(units) == 1
    for seed in range(20):
        pairs = tournaments(units, np.random.default_rng(seed))
        assert sorted(i for p in pairs for i in p) == [0, 1, 2, 3]
        for w, loser in pairs:
            assert units[w][2] >= units[loser][2] and loser != 1


def test_eda_lists_distinct_prompts_and_rank_variant_is_ascending():
    units = (("Low one", "m", 0.2), ("High one", "m", 0.9), ("low ONE", "m", 0.2), ("Mid one", "m", 0.5))
    plain = eda_context(units, "Make a variant.", ranked=False, rng=np.random.default_rng(0))
    assert sorted(re.findall(r"\d\. (\w+) one", plain)) == ["High", "Low", "Mid"] and plain.endswith("\n4.")
    ranked = eda_context(units, "Make a variant.", ranked=True, rng=np.random.default_rng(0))
    assert re.findall(r"\d\. (\w+) one", ranked) == ["Low", "Mid", "High"]
    assert ranked.startswith("INSTRUCTION: Make a variant.") and ranked.endswith("\n4.")


def test_lamarckian_shows_only_examples_the_winner_got_right():
    task, lm = planted_task(), RecordingLM()
    method = Promptbreeder(pop_size=4, operators=("lamarckian",), lamarck_batch=12, n_workings=3)
    state, _ = run(method, task, lm, steps=1)
    for seed in range(3):
        method.step(state, task, lm, lm, np.random.default_rng(seed))
        prompts = [c for c in lm.rounds[-1] if c.startswith("I gave a friend")]
        assert prompts
        by_text = {ex.inputs["sentence"]: ex for ex in task.train}
        for prompt in prompts:
            shown = [by_text[s] for s in re.findall(r"Input: (case \d+ is \w+)", prompt)]
            assert 1 <= len(shown) <= 3
            grid = predict_many(task, [u[0] for u in state.units], shown, PlantedLM())
            # some unit (the winner) answers every shown example correctly
            assert any((row == [ex.label for ex in shown]).all() for row in grid)


def test_seed_lists_are_the_papers_size_and_free_of_planted_words():
    assert len(MUTATION_PROMPTS) >= 12 and len(THINKING_STYLES) >= 12
    words = set(re.findall(r"[a-z]+", " ".join(MUTATION_PROMPTS + THINKING_STYLES).lower()))
    assert not words & set(GOOD_WORDS)  # else the fake proposer would be handed the answer


def test_promptbreeder_state_pickles_and_resumes_identically():
    task, method = planted_task(), Promptbreeder(pop_size=4)
    state, full = resumed_and_uninterrupted(method, task, PlantedLM, seed=9)
    assert state == full


def test_promptbreeder_yaml_instantiates_and_bad_operator_is_rejected():
    cfg = OmegaConf.load(ROOT / "conf/method/promptbreeder.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, Promptbreeder) and isinstance(method.operators, tuple)
    assert hydra.utils.instantiate(cfg).operators == method.operators  # ListConfig becomes a tuple too
    with pytest.raises(ValueError, match="operators"):
        Promptbreeder(operators=("crossover",))


def test_a_mutant_nearly_the_same_as_a_population_prompt_is_dropped():
    """Fails on the old behaviour (exact copies only): the paper filters mutants by similarity."""
    from methods.promptbreeder import near_duplicate

    population = ["Decide whether the review is positive or negative."]
    assert near_duplicate("Decide whether the review is positive or negative!", population, 0.95)
    assert near_duplicate("DECIDE whether the review is positive or negative.", population, 0.95)
    assert not near_duplicate("Read the text and name its sentiment.", population, 0.95)
    assert not near_duplicate("Decide whether the review is positive or negative!", population, 1.0)
    assert near_duplicate("Decide whether the review is positive or negative.", population, 1.0)


class Echo(PlantedLM):
    """Mutates by copying the winner's prompt from the context with a "!" at the end."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        outs = []
        for c in contexts:
            found = re.findall(r"INSTRUCTION: (.+)", c) or re.findall(r"\n([^\n]+)\n*$", c)
            outs.append([(found[-1].strip() + "!") if found else "x"] * n)
        return outs


def test_tournaments_drop_mutants_that_barely_change_the_winner():
    """The step-level half of the similarity filter: with max_similarity 1.0 (the old exact-match
    rule) the "!" copies enter the population; with the default they are all dropped."""
    task = planted_task()
    start, _ = run(Promptbreeder(pop_size=4, operators=("first_order",)), task, PlantedLM(), steps=1)
    for threshold, expect_new in ((1.0, True), (0.95, False)):
        method = Promptbreeder(pop_size=4, operators=("first_order",), max_similarity=threshold)
        new, report = method.step(start, task, Echo(), Echo(), np.random.default_rng(0))
        assert bool(report.evaluated) == expect_new, threshold
