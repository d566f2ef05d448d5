"""Promptbreeder against the planted fake LM: tournaments, elitism, each mutation operator, two task
prompts, prompt crossover, context shuffling, lineage mutation, the unusable-mutant rule, the
paper's seed lists and presets."""

import pickle
import re
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from methods.evaluate import score_prompts
from methods.promptbreeder import (
    LINEAGE_HEAD, MUTATION_PROMPTS, OPERATORS, THINKING_STYLES, BreederState, Promptbreeder, Unit, eda_context,
    elite, fitness_proportionate, instruction_text, lineage_context, shuffle_context, tournaments,
)
from methods.lm import TextPrompt
from methods.racing import fixed_dev, predict_many
from tests.fakes import (
    GOOD_WORDS, FewShotPlantedLM, PlantedLM, assert_outcomes, planted_task, quality, resumed_and_uninterrupted,
)

ROOT = Path(__file__).resolve().parents[1]


def neutral(options):
    """Seed entries without the planted good words: the paper's lists hold "carefully" and "review",
    which the fake proposer would copy, so a climbing test would not show selection at work."""
    return tuple(o for o in options if not set(re.findall(r"[a-z]+", o.lower())) & set(GOOD_WORDS))


NEUTRAL = {"mutation_prompts": neutral(MUTATION_PROMPTS), "thinking_styles": neutral(THINKING_STYLES)}


class RecordingLM(PlantedLM):
    def __init__(self):
        super().__init__()
        self.rounds = []

    def generate(self, contexts, **kw):
        self.rounds.append(list(contexts))
        return super().generate(contexts, **kw)


class Blank(PlantedLM):
    """A proposer that writes nothing usable: every mutant is unusable."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        return [["x"] * n for _ in contexts]


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


def unit(p1, p2="", fitness=0.5, mutation="m", **kw):
    return Unit((p1, p2) if p2 else (p1,), mutation, fitness, **kw)


def planted_state(units):
    best = units[elite(units)]
    return BreederState(units=tuple(units), step=1, best_text=best.text, best_score=best.fitness)


def test_promptbreeder_climbs_and_never_loses_its_elite():
    task, lm = planted_task(n_dev=60), PlantedLM()
    method = Promptbreeder(pop_size=8, n_eval=0, **NEUTRAL)
    state, reports = run(method, task, lm, steps=14, check=keeps_elite)
    assert quality(method.best(state).text) > quality(task.instruction) + 0.15
    curve = [r.metrics["dev_score"] for r in reports]
    assert curve == sorted(curve) and curve[-1] > curve[0]
    assert reports[-1].metrics["population_mean"] > reports[0].metrics["population_mean"]
    assert len(state.units) == 8
    assert state.best_score == max(u.fitness for u in state.units)  # fixed dev: the elite holds the best score


@pytest.mark.parametrize("op", OPERATORS)
def test_each_operator_yields_scored_mutants_that_replace_only_losers(op):
    task, lm = planted_task(), RecordingLM()
    method = Promptbreeder(pop_size=6, operators=(op,), crossover_p=0.0)
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
    evolved = [u.mutation for u in state.units if u.mutation not in MUTATION_PROMPTS]
    assert evolved and reports[-1].metrics["evolved_mutation_prompts"] == len(evolved)
    assert all(c.startswith("Please summarize and improve the following instruction:") for c in lm.rounds[1])
    # the second call applies each new mutation prompt to its winner's task prompt
    assert any(c.startswith(evolved[0] + "\nINSTRUCTION: ") for c in lm.rounds[2])


def test_tournament_winner_is_fitter_and_ties_go_to_the_elite():
    units = (unit("a b", fitness=0.5), unit("c d", fitness=0.9), unit("e f", fitness=0.9), unit("g h", fitness=0.1))
    assert elite(units) == 1
    for seed in range(20):
        pairs = tournaments(units, np.random.default_rng(seed))
        assert sorted(i for p in pairs for i in p) == [0, 1, 2, 3]
        for w, loser in pairs:
            assert units[w].fitness >= units[loser].fitness and loser != 1


def test_eda_lists_distinct_prompts_and_rank_variant_is_ascending():
    scored = (("Low one", 0.2), ("High one", 0.9), ("low ONE", 0.2), ("Mid one", 0.5))
    plain = eda_context(scored, "Make a variant.", ranked=False, rng=np.random.default_rng(0))
    assert sorted(re.findall(r"\d\. (\w+) one", plain)) == ["High", "Low", "Mid"] and plain.endswith("\n4.")
    ranked = eda_context(scored, "Make a variant.", ranked=True, rng=np.random.default_rng(0))
    assert re.findall(r"\d\. (\w+) one", ranked) == ["Low", "Mid", "High"]
    assert ranked.startswith("INSTRUCTION: Make a variant.") and ranked.endswith("\n4.")


def test_eda_list_leaves_out_prompts_too_similar_to_an_earlier_entry():
    """The paper filters the EDA list (0.95 similarity); an exact-copy filter keeps the near copy."""
    scored = (("Decide whether the review is positive.", 0.5), ("Decide whether the review is positive!", 0.6),
              ("Name the sentiment of the text.", 0.4))
    filtered = eda_context(scored, "m", ranked=False, rng=np.random.default_rng(0), threshold=0.95)
    assert filtered.count("Decide whether") == 1 and filtered.endswith("\n3.")
    assert eda_context(scored, "m", ranked=False, rng=np.random.default_rng(0), threshold=1.0).count("Decide") == 2


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
            grid = predict_many(task, [u.text for u in state.units], shown, PlantedLM())
            # some unit (the winner) answers every shown example correctly
            assert any((row == [ex.label for ex in shown]).all() for row in grid)


def test_lamarckian_uses_the_winners_context_without_a_scorer_call():
    task = planted_task()
    work = ("Input: case 1 is yes\nOutput: yes",)
    state = planted_state([unit("a b", "c d", 0.9, context=work), unit("e f", "g h", 0.1, context=work)])
    method = Promptbreeder(pop_size=2, operators=("lamarckian",), fitness_split="train", max_context=2)
    scorer, proposer = PlantedLM(), RecordingLM()
    method.step(state, task, scorer, proposer, np.random.default_rng(0))
    assert proposer.rounds[0] == ["I gave a friend an instruction and some advice. Here are the correct examples "
                                  f"of his workings out:\n\n{work[0]}\n\nThe instruction was:"]
    assert scorer.calls == 1  # only the generation's fitness batch


# ----------------------------------------------------------------------------- the paper's seed lists


def test_seed_lists_are_the_papers_appendix_c_and_d():
    """Fails on the old partial lists (24 and 24 entries, some not in the paper)."""
    assert len(MUTATION_PROMPTS) == 56 and len(set(MUTATION_PROMPTS)) == 56  # Appendix C, Table 2
    assert len(THINKING_STYLES) == 39 and len(set(THINKING_STYLES)) == 39  # Appendix D
    assert MUTATION_PROMPTS[0] == "Modify the following instruction creatively, giving some advice on how to solve it:"
    assert MUTATION_PROMPTS[9] == "How would someone with derailment follow this instruction?"
    assert MUTATION_PROMPTS[13].endswith("DON'T use any of the words in the original instruction there is a good chap.")
    assert MUTATION_PROMPTS[30].startswith("Go beyond the expected") and "Increase Specificity:" in MUTATION_PROMPTS[30]
    assert MUTATION_PROMPTS[53] == "CORRECTION ="
    assert MUTATION_PROMPTS[55] == "The above working out has some errors, here is a version with the errors fixed."
    assert THINKING_STYLES[0] == "How could I devise an experiment to help solve that problem?"
    assert THINKING_STYLES[23] == "What indicators or metrics can be used?"
    assert THINKING_STYLES[37:] == ("Let's think step by step.",
                                    "Let's make a step by step plan and implement it with good notion and explanation.")
    assert "Make a variant of the prompt." not in MUTATION_PROMPTS  # the paper's §3.1 example, not in its table
    method = Promptbreeder()
    assert method.mutation_prompts == MUTATION_PROMPTS and method.thinking_styles == THINKING_STYLES


def test_initial_task_prompts_come_from_seed_mutation_prompts_and_thinking_styles():
    task, lm = planted_task(), RecordingLM()
    method = Promptbreeder(pop_size=3, n_task_prompts=2)
    state, _ = run(method, task, lm, steps=1)
    cues = lm.rounds[0]
    assert len(cues) == 6  # two task prompts per unit
    for i, cue in enumerate(cues):
        head, _, rest = cue.partition("\nINSTRUCTION: ")
        assert rest == f"{task.instruction}\nINSTRUCTION MUTANT:"
        mutation = state.units[i // 2].mutation
        assert head.startswith(mutation + " ") and head[len(mutation) + 1 :] in THINKING_STYLES


# ----------------------------------------------------------------------------- two task prompts


def test_both_task_prompts_are_scored_in_order_and_both_evolve():
    """Fails if P2 is left out of the rendered instruction, or never mutated."""
    assert instruction_text(("First do this.", "Then that.")) == "First do this.\nThen that."
    assert instruction_text(("P one", "P two"), ("Input: a\nOutput: b",)) == "Input: a\nOutput: b\n\nP one\nP two"
    task, lm = planted_task(), PlantedLM()
    method = Promptbreeder(pop_size=6, n_task_prompts=2, operators=("first_order",), crossover_p=0.0, **NEUTRAL)
    state, reports = run(method, task, lm, steps=6)
    dev = fixed_dev(task, method.n_eval)
    differs = 0
    for u in state.units:
        assert len(u.prompts) == 2
        joined = score_prompts(task, [TextPrompt(f"{u.prompts[0]}\n{u.prompts[1]}")], dev, PlantedLM())[0]
        assert u.fitness == joined
        differs += joined != score_prompts(task, [TextPrompt(u.prompts[0])], dev, PlantedLM())[0]
    assert differs  # P2 changes some unit's score, so the check above can tell it is there
    assert all("\n" in e.prompt for r in reports for e in r.evaluated)
    initial = {p[1] for r in reports[:1] for p in [e.prompt.split("\n") for e in r.evaluated]}
    assert {u.prompts[1] for u in state.units} - initial  # some P2 was rewritten by a mutation
    assert {u.prompts[0] for u in state.units} - {e.prompt.split("\n")[0] for e in reports[0].evaluated}


def test_one_task_prompt_is_the_simplified_form():
    task, lm = planted_task(), RecordingLM()
    state, _ = run(Promptbreeder(pop_size=4, n_task_prompts=1), task, lm, steps=2)
    assert len(lm.rounds[0]) == 4 and all(len(u.prompts) == 1 and "\n" not in u.text for u in state.units)


# ----------------------------------------------------------------------------- prompt crossover


def test_fitness_proportionate_draw_follows_fitness_and_skips_excluded_units():
    units = [unit("a", fitness=0.9), unit("b", fitness=0.0), unit("c", fitness=0.25), unit("d", fitness=0.75)]
    rng = np.random.default_rng(0)
    draws = [fitness_proportionate(units, {0}, rng) for _ in range(4000)]
    assert 1 not in draws and 0 not in draws
    assert abs(draws.count(3) / len(draws) - 0.75) < 0.03
    assert fitness_proportionate(units[:2], {0, 1}, rng) is None
    zeros = [unit(s, fitness=0.0) for s in "xyz"]
    assert {fitness_proportionate(zeros, set(), rng) for _ in range(200)} == {0, 1, 2}  # all zero: uniform


def test_crossover_gives_a_child_a_task_prompt_of_another_unit():
    """Fails on the old behaviour (no crossover): with unusable mutants every child is its winner's copy."""
    task = planted_task()
    units = [unit(f"first {c}", f"second {c}", fitness=f) for c, f in zip("abcdef", (0.9, 0.8, 0.7, 0.6, 0.55, 0.5))]
    state = planted_state(units)
    method = Promptbreeder(pop_size=6, crossover_p=1.0, operators=("first_order",))
    rng = np.random.default_rng(3)
    new, report = method.step(state, task, PlantedLM(), Blank(), rng)
    pairs = tournaments(state.units, np.random.default_rng(3))
    assert new.crossovers == len(pairs) and report.metrics["crossovers"] == len(pairs)
    for w, loser in pairs:
        child, parent = new.units[loser], state.units[w]
        foreign = [k for k in range(2) if child.prompts[k] != parent.prompts[k]]
        assert len(foreign) == 1  # one task prompt crossed in, in its own position
        k = foreign[0]
        donors = [i for i, u in enumerate(state.units) if u.prompts[k] == child.prompts[k]]
        assert donors and not set(donors) & {w, loser}
        assert child.mutation == parent.mutation  # mutation prompts never cross
    assert {e.prompt for e in report.evaluated} == {new.units[loser].text for _, loser in pairs}
    never = Promptbreeder(pop_size=6, crossover_p=0.0)
    none, _ = never.step(state, task, PlantedLM(), Blank(), np.random.default_rng(3))
    assert none.crossovers == 0 and all(none.units[loser].prompts == state.units[w].prompts for w, loser in pairs)


def test_crossover_happens_at_about_its_rate():
    task, lm = planted_task(), PlantedLM()
    state, _ = run(Promptbreeder(pop_size=10, crossover_p=0.1), task, lm, steps=21)
    expected = 0.1 * 20 * 5  # 20 generations of 5 tournaments
    assert expected / 4 <= state.crossovers <= expected * 2.5, state.crossovers


# ----------------------------------------------------------------------------- context shuffling


def test_shuffle_context_fills_up_then_replaces_one_and_sometimes_resamples_all():
    rng = np.random.default_rng(0)
    correct = ["w1", "w2", "w3", "w4", "w5"]
    filled = shuffle_context((), correct, 3, 0.0, rng)
    assert len(filled) == 3 and set(filled) <= set(correct)
    grown = shuffle_context(("old",), ["w1", "w2", "w3"], 3, 0.0, rng)
    assert grown[0] == "old" and len(grown) == 3  # room: filled up with new ones
    full = ("a", "b", "c")
    for _ in range(20):
        after = shuffle_context(full, ["new1", "new2"], 3, 0.0, rng)
        assert len(after) == 3 and len(set(after) & set(full)) == 2 and set(after) - set(full) <= {"new1", "new2"}
    assert shuffle_context(full, [], 3, 1.0, rng) == full  # nothing right: nothing to show
    assert shuffle_context(full, ["a", "b", "c"], 3, 0.0, rng) == full  # nothing new
    resampled = shuffle_context(full, correct, 3, 1.0, rng)
    assert len(resampled) == 3 and set(resampled) <= set(correct)
    draws = [shuffle_context(full, correct, 3, 0.1, rng) for _ in range(2000)]
    whole = sum(not set(d) & set(full) for d in draws) / len(draws)
    assert 0.07 < whole < 0.13  # the paper's 10% chance of a whole new list


def test_context_holds_correct_training_workings_and_is_scored_with_the_prompts():
    """Fails if the context list is never updated (the old behaviour: no contexts at all)."""
    task, lm = planted_task(n_train=60), FewShotPlantedLM()
    method = Promptbreeder(pop_size=6, fitness_split="train", max_context=2, n_eval=16)
    state, reports = run(method, task, lm, steps=6)
    train = {ex.inputs["sentence"]: ex for ex in task.train}
    seen = set()
    for u in state.units:
        assert 1 <= len(u.context) <= 2
        for w in u.context:
            case, answer = re.fullmatch(r"Input: (case \d+ is \w+)\nOutput: (\w+)", w).groups()
            assert case in train and case.endswith(" " + answer)  # a training example, answered right
        seen.add(u.context)
    assert len(seen) > 1
    # every generation scores every unit on a fresh training batch, with its context before its prompts
    for r in reports:
        assert len(r.evaluated) == 6 and all(e.n == 16 for e in r.evaluated)
    scored_later = {e.prompt for e in reports[-1].evaluated}
    assert any(p.startswith("Input: case ") for p in scored_later)
    initial = {u.context for u in run(method, task, FewShotPlantedLM(), steps=1)[0].units}
    assert seen != initial  # contexts moved on after later evaluations


def test_train_fitness_draws_a_new_batch_each_generation():
    task = planted_task(n_train=60)

    class Seen(PlantedLM):
        def __init__(self):
            super().__init__()
            self.batches = []

        def loglikelihood(self, requests):
            self.batches.append({re.search(r"Input: (case \d+)", r.context).group(1) for r in requests})
            return super().loglikelihood(requests)

    lm = Seen()
    run(Promptbreeder(pop_size=4, fitness_split="train", n_eval=10, operators=("first_order",)), task, lm, steps=3)
    train = {ex.inputs["sentence"].rsplit(" is", 1)[0] for ex in task.train}
    assert all(b <= train and len(b) == 10 for b in lm.batches)
    assert len({frozenset(b) for b in lm.batches}) == 3


def test_contexts_need_train_fitness_and_probabilities_are_checked():
    with pytest.raises(ValueError, match="fitness_split=train"):
        Promptbreeder(max_context=2)
    with pytest.raises(ValueError, match="probabilities"):
        Promptbreeder(crossover_p=1.5)
    with pytest.raises(ValueError, match="on_unusable"):
        Promptbreeder(on_unusable="drop")


# ----------------------------------------------------------------------------- lineage mutation


def test_lineage_mutation_shows_the_winners_elites_oldest_first():
    """Fails if the lineage context lacks the elites (or shows them out of order)."""
    task, lm = planted_task(), RecordingLM()
    lineage = (("old first", "old second"), ("mid first", "mid second"), ("new first", "new second"))
    state = planted_state([unit("new first", "new second", 0.9, lineage=lineage), unit("low", "lower", 0.1)])
    method = Promptbreeder(pop_size=2, operators=("lineage",))
    method.step(state, task, lm, lm, np.random.default_rng(0))
    (context,) = lm.rounds[0]
    k = 0 if "old first" in context else 1
    expected = [g[k] for g in lineage]
    assert context == lineage_context(expected)
    assert context == f"{LINEAGE_HEAD}\n1. {expected[0]}\n2. {expected[1]}\n3. {expected[2]}\n4."


class Improver(PlantedLM):
    """Mutates by adding to the instruction it is shown one planted good word it lacks: on the
    planted task, a child is then never worse than its parent (usually better)."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        outs = []
        for c in contexts:
            text = re.findall(r"INSTRUCTION: (.+)", c)[-1].strip()
            missing = [w for w in GOOD_WORDS if w not in text.lower().split()]
            outs.append([f"{text} {missing[0]}" if missing else text] * n)
        return outs


def test_the_elites_lineage_records_each_new_elite_in_order():
    """Fails if lineages are never extended: the lineage operator would only see the winner itself."""
    task = planted_task(n_dev=60)
    start = unit("the banana", "seven purple", 0.0, lineage=(("the banana", "seven purple"),))
    state = planted_state([start, unit("maybe random", "quickly ignore", 0.0)])
    method = Promptbreeder(pop_size=2, n_eval=0, operators=("first_order",), max_similarity=1.0)
    rng, elites = np.random.default_rng(0), [start.prompts]
    for _ in range(4):
        state, _ = method.step(state, task, PlantedLM(), Improver(), rng)
        top = state.units[elite(state.units)]
        if top.prompts != elites[-1]:
            elites.append(top.prompts)
        assert top.lineage == tuple(elites)  # every elite so far, oldest first: each was its parent
    assert len(elites) >= 4
    assert method._context("lineage", top, 0, state.units, task, (), rng) == lineage_context([g[0] for g in elites])


# ----------------------------------------------------------------------------- unusable mutants


def test_an_unusable_mutant_leaves_the_winners_copy_in_the_losers_place():
    """Fails on the old behaviour, where the loser stayed in place."""
    task = planted_task()
    units = [unit(f"first {c}", f"second {c}", fitness=f) for c, f in zip("abcd", (0.9, 0.7, 0.6, 0.5))]
    state = planted_state(units)
    pairs = tournaments(state.units, np.random.default_rng(0))
    method = Promptbreeder(pop_size=4, crossover_p=0.0)
    scorer = PlantedLM()
    new, report = method.step(state, task, scorer, Blank(), np.random.default_rng(0))
    for w, loser in pairs:
        assert replace_lineage(new.units[loser]) == replace_lineage(state.units[w])
    assert not report.evaluated and scorer.calls == 0  # a copy keeps its winner's fitness
    assert new.copies == len(pairs) and new.usable == 0
    kept, _ = Promptbreeder(pop_size=4, crossover_p=0.0, on_unusable="keep").step(
        state, task, PlantedLM(), Blank(), np.random.default_rng(0))
    assert [replace_lineage(u) for u in kept.units] == [replace_lineage(u) for u in state.units]


def replace_lineage(u):
    return (u.prompts, u.mutation, u.fitness, u.context)


class Echo(PlantedLM):
    """Mutates by copying the winner's prompt from the context with a "!" at the end."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        outs = []
        for c in contexts:
            found = re.findall(r"INSTRUCTION: (.+)", c) or re.findall(r"\n([^\n]+)\n*$", c)
            outs.append([(found[-1].strip() + "!") if found else "x"] * n)
        return outs


def test_a_mutant_nearly_the_same_as_a_population_prompt_is_dropped():
    """Fails on the old behaviour (exact copies only): the paper filters mutants by similarity."""
    from methods.promptbreeder import near_duplicate

    population = ["Decide whether the review is positive or negative."]
    assert near_duplicate("Decide whether the review is positive or negative!", population, 0.95)
    assert near_duplicate("DECIDE whether the review is positive or negative.", population, 0.95)
    assert not near_duplicate("Read the text and name its sentiment.", population, 0.95)
    assert not near_duplicate("Decide whether the review is positive or negative!", population, 1.0)
    assert near_duplicate("Decide whether the review is positive or negative.", population, 1.0)


def test_tournaments_drop_mutants_that_barely_change_the_winner():
    """The step-level half of the similarity filter: with max_similarity 1.0 (the old exact-match
    rule) the "!" copies enter the population; with the default they are all dropped."""
    task = planted_task()
    start, _ = run(Promptbreeder(pop_size=4, operators=("first_order",)), task, PlantedLM(), steps=1)
    for threshold, expect_new in ((1.0, True), (0.95, False)):
        method = Promptbreeder(pop_size=4, operators=("first_order",), max_similarity=threshold, crossover_p=0.0)
        new, report = method.step(start, task, Echo(), Echo(), np.random.default_rng(0))
        assert bool(report.evaluated) == expect_new, threshold


# ----------------------------------------------------------------------------- state, configs


def test_promptbreeder_state_pickles_and_resumes_identically():
    task, method = planted_task(), Promptbreeder(pop_size=4)
    state, full = resumed_and_uninterrupted(method, task, PlantedLM, seed=9)
    assert state == full


def test_few_shot_state_with_contexts_and_lineages_pickles_and_resumes_identically():
    task = planted_task(n_train=60)
    method = Promptbreeder(pop_size=4, fitness_split="train", max_context=3, n_eval=12)
    state, full = resumed_and_uninterrupted(method, task, FewShotPlantedLM, steps=5, seed=4)
    assert state == full and any(u.context for u in state.units) and any(u.lineage for u in state.units)
    assert pickle.loads(pickle.dumps(state)) == state
    with pytest.raises(Exception):
        state.step = 0  # frozen


def test_promptbreeder_yaml_instantiates_and_bad_operator_is_rejected():
    cfg = OmegaConf.load(ROOT / "conf/method/promptbreeder.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, Promptbreeder) and isinstance(method.operators, tuple)
    assert hydra.utils.instantiate(cfg).operators == method.operators  # ListConfig becomes a tuple too
    assert set(method.operators) == set(OPERATORS) and method.n_task_prompts == 2 and method.crossover_p == 0.1
    with pytest.raises(ValueError, match="operators"):
        Promptbreeder(operators=("crossover",))


def test_paper_preset_has_the_papers_settings():
    method = hydra.utils.instantiate(OmegaConf.load(ROOT / "conf/method/promptbreeder_paper.yaml"), _convert_="all")
    assert (method.pop_size, method.n_task_prompts, method.n_eval, method.fitness_split) == (50, 2, 100, "train")
    assert (method.crossover_p, method.context_refresh_p, method.max_context) == (0.1, 0.1, 3)
    assert method.operators == OPERATORS and method.on_unusable == "copy" and method.max_new_tokens == 50
    assert method.mutation_prompts == MUTATION_PROMPTS and method.thinking_styles == THINKING_STYLES


def test_a_mutant_records_the_winner_it_was_mutated_from_and_its_outcomes():
    task, lm = planted_task(), RecordingLM()
    method = Promptbreeder(pop_size=6, operators=("first_order",), crossover_p=0.0, n_eval=16)
    state, (first,) = run(method, task, lm, steps=1, seed=1)
    assert all(e.parent == "" for e in first.evaluated)  # the first units: from seed lists alone
    new, report = method.step(state, task, lm, lm, np.random.default_rng(2))
    winner_of = {loser: w for w, loser in tournaments(state.units, np.random.default_rng(2))}
    mutants = [(i, e) for e in report.evaluated for i, u in enumerate(new.units) if u.text == e.prompt]
    assert mutants and len(mutants) == len(report.evaluated)
    for i, e in mutants:
        parent = state.units[winner_of[i]]
        assert e.parent == parent.text != state.units[i].text
        # first order: the winner's task prompts with one of them rewritten
        assert sum(a != b for a, b in zip(e.prompt.split("\n"), parent.prompts)) == 1
        assert_outcomes(task, e, fixed_dev(task, 16))
