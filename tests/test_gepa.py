"""GEPA against the planted fake LM: Pareto selection, reflective mutation, strict acceptance, merge,
batching, budgets and resuming."""

import pickle
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from methods import evaluate
from methods.gepa import (
    GEPA, Candidate, GEPAState, epoch_order, example_fronts, extract_instruction, find_merge, next_minibatch,
    run_many, select_parent, undominated,
)
from methods.lm import TextPrompt
from methods.racing import fixed_dev
from tests.fakes import (
    PlantedGenLM, PlantedLM, assert_outcomes, planted_gen_task, planted_task, quality, resumed_and_uninterrupted,
    run_steps,
)

ROOT = Path(__file__).resolve().parents[1]
# A meta-prompt with none of the planted words: the fake proposer copies words it reads, and the
# reference's prompt holds "carefully" (a good word) and many "the" (a bad one).
NEUTRAL = "Current instruction:\n<curr_param>\n\nExamples with feedback:\n<side_info>\nNew instruction:"


class Recording(PlantedLM):
    """Records every generate call's contexts and every scored context; proposes a fixed text or as
    :class:`PlantedLM` does."""

    def __init__(self, proposal: str | None = None) -> None:
        super().__init__()
        self.proposal, self.asked, self.scored, self.log = proposal, [], [], []

    def loglikelihood(self, requests):
        self.log.append(("loglikelihood", len({r.context for r in requests})))
        self.scored += [r.context for r in requests]
        return super().loglikelihood(requests)

    def generate(self, contexts, **kw):
        self.log.append(("generate", len(contexts)))
        self.asked.append(list(contexts))
        if self.proposal is None:
            return super().generate(contexts, **kw)
        self.calls += 1
        return [[self.proposal] for _ in contexts]


def test_gepa_climbs_the_planted_objective():
    gains, curves = [], []
    for seed in range(6):
        task, lm = planted_task(n_dev=40), PlantedLM()
        method = GEPA(n_val=0, reflection_prompt=NEUTRAL)
        state, reports = run_steps(method, task, lm, steps=20, seed=seed)
        gains.append(quality(method.best(state).text) - quality(task.instruction))
        curves.append([r.metrics["dev_score"] for r in reports])
    assert np.mean(gains) > 0.12, gains
    assert all(c == sorted(c) for c in curves)  # best-so-far never falls
    assert np.mean([c[-1] - c[0] for c in curves]) > 0.1


def test_gepa_runs_on_the_planted_generative_task_and_improves():
    gains = []
    for seed in range(4):
        task, lm = planted_gen_task(n_dev=20), PlantedGenLM()
        method = GEPA(n_val=0, reflection_prompt=NEUTRAL)
        state, reports = run_steps(method, task, lm, steps=20, seed=seed)
        assert all(c.text for c in state.pool) and len(state.pool[0].scores) == 20
        gains.append(reports[-1].metrics["dev_score"] - reports[0].metrics["dev_score"])
    assert np.mean(gains) > 0.1, gains
    assert min(gains) >= 0


def test_the_pareto_front_keeps_a_specialist_and_drops_dominated_candidates():
    # M is best on 4 of 5 examples; S on the fifth only (a far lower mean); D ties M on two
    # examples and is best nowhere else: dominated, so never drawn.
    scores = [(1, 1, 1, 1, 0), (0, 0, 0, 0, 1), (1, 1, 0, 0, 0)]
    pool = tuple(Candidate(t, (), s, float(np.mean(s))) for t, s in zip(("M", "S", "D"), scores))
    fronts = example_fronts([c.scores for c in pool])
    assert fronts == [{0, 2}, {0, 2}, {0}, {0}, {1}]
    assert undominated(fronts, [c.score for c in pool]) == [{0}, {0}, {0}, {0}, {1}]
    rng = np.random.default_rng(0)
    drawn = Counter(select_parent(pool, rng) for _ in range(2000))
    assert set(drawn) == {0, 1}  # greedy selection would never draw S; without the dominance rule D is drawn
    assert abs(drawn[1] / 2000 - 1 / 5) < 0.03  # in proportion to the fronts it is on


def test_a_step_evolves_the_specialist_parent_too():
    task = planted_task()
    val = fixed_dev(task, 5)
    scores = [(1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0, 1.0)]
    pool = tuple(Candidate(t, (), s, float(np.mean(s))) for t, s in zip(("Mean parent", "Specialist parent"), scores))
    method, parents = GEPA(n_val=len(val), skip_perfect_score=False), []
    for seed in range(40):
        lm = Recording("```\nBanana purple.\n```")
        state, report = method.step(GEPAState(pool=pool), task, lm, lm, np.random.default_rng(seed))
        (context,), = lm.asked
        parents.append(re.search(r"```\n(.*)\n```", context).group(1))
        assert report.metrics["pareto_front_size"] == 2
    assert 0 < parents.count("Specialist parent") < 20  # about 1 in 5


def test_a_child_no_better_than_its_parent_is_rejected_and_never_scored_on_validation():
    task = planted_task(n_dev=20)
    task = replace(task, instruction="Decide the label carefully.")  # planted quality 0.8
    val_inputs = {ex.inputs["sentence"] for ex in fixed_dev(task, 0)}
    for child in ("Banana the purple.", "Review the sentiment label."):  # worse; as good (a tie is not better)
        lm = Recording(child)
        method = GEPA(n_val=0, skip_perfect_score=False)
        state, reports = run_steps(method, task, lm, steps=6)
        assert [c.text for c in state.pool] == [task.instruction]
        assert all(r.metrics["rejected"] == i for i, r in enumerate(reports))
        assert all(r.metrics["minibatch_child"] <= r.metrics["minibatch_parent"] for r in reports[1:])
        child_inputs = [c.split("Input: ")[1].split("\n")[0] for c in lm.scored if c.startswith(child)]
        scored_on_val = [x for x in child_inputs if x in val_inputs]
        assert child_inputs and not scored_on_val
        assert [e.kind for r in reports for e in r.evaluated] == ["seed"]


def test_a_better_child_joins_the_pool_with_its_parent_and_validation_scores():
    task = planted_task(n_dev=20)
    lm = Recording("```\nDecide the sentiment label carefully, review it.\n```")
    state, reports = run_steps(GEPA(n_val=10), task, lm, steps=2)
    assert [(c.text, c.parents) for c in state.pool] == [
        ("the banana", ()), ("Decide the sentiment label carefully, review it.", (0,))]
    child = state.pool[1]
    val = fixed_dev(task, 10)
    assert len(child.scores) == 10 and child.score == evaluate.score_prompts(task, [TextPrompt(child.text)], val, lm)[0]
    assert reports[1].evaluated[0].kind == "child" and reports[1].metrics["dev_score"] == child.score == 1.0


def test_the_reflection_prompt_shows_the_instruction_inputs_answers_gold_and_probabilities():
    task, lm = planted_task(), Recording("Banana.")
    method = GEPA(n_val=8, minibatch_size=4, skip_perfect_score=False)
    run_steps(method, task, lm, steps=2)
    (context,), = lm.asked
    assert "```\nthe banana\n```" in context and context.endswith("Provide the new instructions within ``` blocks.")
    record = r"## Inputs\n(case (\d+) is (\w+))\n\n## Generated Outputs\n(\w+)\n\n## Feedback\n(.*)\n"
    examples = re.findall(record, context)
    assert len(examples) == 4 and all(int(n) < 10_000 for _, n, _, _, _ in examples)  # training examples
    for sentence, _, gold, said, feedback in examples:
        (ex,) = [e for e in task.train if e.inputs["sentence"] == sentence]
        (pred,) = evaluate.predict(task, TextPrompt("the banana"), [ex], PlantedLM())
        assert said == task.shown(pred, ex)  # the model's own answer
        verdict = "correct" if said == gold else "incorrect"
        assert feedback.startswith(f"The generated response is {verdict}. The correct answer is '{gold}'.")
        probs = dict(re.findall(r"(no|yes) (\d\.\d+)", feedback.split("answers:")[1]))
        assert abs(sum(map(float, probs.values())) - 1) < 0.02 and max(probs, key=lambda w: float(probs[w])) == said


def test_the_reflection_prompt_of_a_generative_task_shows_the_written_output_and_gold():
    task, lm = planted_gen_task(), PlantedGenLM()
    recorded = []
    generate = lm.generate

    def spy(contexts, **kw):
        if len(contexts) == 1 and "Your task is to write a new instruction" in contexts[0]:
            recorded.append(contexts[0])
        return generate(contexts, **kw)

    lm.generate = spy
    run_steps(GEPA(n_val=8, skip_perfect_score=False), task, lm, steps=2)
    (context,) = recorded
    found = re.findall(r"## Inputs\ncase \d+ is (\w+)\n\n## Generated Outputs\n(\w+)\n\n## Feedback\n(.*)\n", context)
    assert len(found) == 3
    for gold, said, feedback in found:
        verdict = "correct" if said == gold else "incorrect"
        assert feedback == f"The generated response is {verdict}. The correct answer is '{gold}'."


def test_one_proposer_call_per_reflective_step_and_batched_scoring():
    task, lm = planted_task(n_dev=20), Recording()
    method = GEPA(n_val=12, reflection_prompt=NEUTRAL, skip_perfect_score=False)
    rng = np.random.default_rng(3)
    state, before = method.init(task, lm, lm, rng), 0
    for i in range(12):
        state, report = method.step(state, task, lm, lm, rng)
        calls, before = lm.log[before:], len(lm.log)
        kinds = [k for k, _ in calls]
        m = report.metrics
        if i == 0:
            assert calls == [("loglikelihood", 12)]
            continue
        assert kinds.count("generate") == 1 and calls[kinds.index("generate")] == ("generate", 1)
        scored = [n for k, n in calls if k == "loglikelihood"]
        child_scored = not np.isnan(m["minibatch_child"])
        accepted = bool(report.evaluated)
        assert scored == [3] + [3] * child_scored + [12] * accepted
    # the rollouts metric is the scorer's example-evaluations (two label words per example)
    assert report.metrics["rollouts"] == lm.requests / 2


def test_a_parent_perfect_on_its_minibatch_is_skipped_without_a_proposer_call():
    task = planted_task()
    task = replace(task, instruction="Decide the sentiment label carefully, review.")
    lm = Recording()
    state, reports = run_steps(GEPA(n_val=8), task, lm, steps=4)
    assert not lm.asked and reports[-1].metrics["skipped"] == 3 and len(state.pool) == 1
    _, reports = run_steps(GEPA(n_val=8, skip_perfect_score=False), task, Recording(), steps=4)
    assert reports[-1].metrics["proposed"] == 3


class Specialist(Recording):
    """A label scorer whose instruction words decide which examples it gets right: "even" on even
    case numbers, "odd" on odd ones."""

    def _ll(self, context, continuation, prompt):
        instruction, _, rest = context.partition("\nInput: ")
        number = int(re.match(r"case (\d+)", rest).group(1))
        right = ("even" if number % 2 == 0 else "odd") in instruction.lower().split()
        truth = " yes" if rest.split("\n")[0].endswith("yes") else " no"
        return 0.0 if (continuation == truth) == right else -1.0


def merge_ready(task, lm):
    """A pool where the reference's single-component merge rule fires: A -> B -> C, where C came back
    to A's text, and A -> D; C and D are the undominated pair, A their common ancestor."""
    val = fixed_dev(task, 5)
    evens = sum(int(ex.inputs["sentence"].split()[1]) % 2 == 0 for ex in val)
    a_word, d_word = ("even", "odd") if evens <= 5 - evens else ("odd", "even")  # D no worse than A
    texts = (f"Answer {a_word}", "Answer none", f"Answer {a_word}", f"Answer {d_word}")
    parents = ((), (0,), (1,), (0,))
    runs = run_many(task, texts, val, lm)
    pool = tuple(Candidate(t, p, tuple(r.scores), float(task.score(r.predictions, val)))
                 for t, p, r in zip(texts, parents, runs))
    return GEPAState(pool=pool, iteration=3, merges_due=1, found_new=True), val


def test_merge_with_one_instruction_re_enters_the_other_lineages_text_and_counts():
    task, lm = planted_task(), Specialist()
    state, val = merge_ready(task, lm)
    fronts = undominated(example_fronts([c.scores for c in state.pool]), [c.score for c in state.pool])
    assert set().union(*fronts) == {2, 3}  # C and D; A ties C everywhere and is dropped, B is best nowhere
    method = GEPA(n_val=5, use_merge=True, reflection_prompt=NEUTRAL)
    lm = Specialist()
    new, report = method.step(state, task, lm, lm, np.random.default_rng(0))
    assert not lm.asked  # a merge step writes nothing
    assert [k for k, _ in lm.log] == ["loglikelihood"]  # all 5 validation examples in one call, none again
    merged = new.pool[-1]
    assert merged.text == state.pool[3].text and merged.parents == (2, 3) and merged.scores == state.pool[3].scores
    assert report.metrics["merges_tried"] == report.metrics["merges_accepted"] == 1
    assert new.merges_due == 0 and new.merge_triplets == ((2, 3, 0),) and report.evaluated[0].kind == "merge"
    assert find_merge(state.pool, new.merge_triplets, (), np.random.default_rng(1)) is None  # never retried
    # without a new accepted mutation no merge is tried: the next step mutates
    later, report = method.step(new, task, lm, lm, np.random.default_rng(0))
    assert len(lm.asked) == 1 and report.metrics["merges_tried"] == 1


def test_merge_is_off_unless_asked_and_needs_five_validation_examples():
    task, lm = planted_task(), Specialist()
    state, _ = merge_ready(task, lm)
    lm = Specialist("Banana.")
    method = GEPA(n_val=5, use_merge=False, skip_perfect_score=False)
    _, report = method.step(state, task, lm, lm, np.random.default_rng(0))
    assert report.metrics["merges_tried"] == 0 and len(lm.asked) == 1
    short = GEPAState(pool=tuple(Candidate(c.text, c.parents, c.scores[:4], c.score) for c in state.pool),
                      merges_due=1, found_new=True)
    method = GEPA(n_val=4, use_merge=True, skip_perfect_score=False)
    _, report = method.step(short, task, lm, lm, np.random.default_rng(0))
    assert report.metrics["merges_tried"] == 0 and len(lm.asked) == 2


def test_an_accepted_mutation_schedules_a_merge_up_to_the_cap():
    task = planted_task(n_dev=20)
    lm = Recording("```\nDecide the sentiment label carefully, review it.\n```")
    state, _ = run_steps(GEPA(n_val=10, use_merge=True), task, lm, steps=2)
    assert state.merges_due == 1 and state.found_new
    state, _ = run_steps(GEPA(n_val=10, use_merge=True, max_merge_invocations=0), task, lm, steps=2)
    assert state.merges_due == 0


@pytest.mark.parametrize("use_merge", [False, True])
def test_gepa_state_pickles_and_resumes_to_the_same_state(use_merge):
    method = GEPA(n_val=10, use_merge=use_merge, reflection_prompt=NEUTRAL)
    state, full = resumed_and_uninterrupted(method, planted_task(), PlantedLM, steps=8, split=3, seed=2)
    assert isinstance(state, GEPAState) and state == full and len(state.pool) > 1
    assert pickle.loads(pickle.dumps(state)) == state
    snap = method.snapshot(state)
    assert snap.population[0] == (method.best(state).text, max(c.score for c in state.pool))
    assert len(snap.population) == len(state.pool)


def test_best_is_the_best_aggregate_and_the_snapshot_lists_the_pool_best_first():
    pool = tuple(Candidate(t, (), (s,), s) for t, s in (("seed", 0.5), ("good", 0.8), ("tie", 0.8), ("newest", 0.6)))
    method, state = GEPA(), GEPAState(pool=pool)
    assert method.best(state).text == "good"  # the earliest of the best, as the reference's idxmax
    assert method.snapshot(state).population == (("good", 0.8), ("tie", 0.8), ("newest", 0.6), ("seed", 0.5))
    with pytest.raises(ValueError, match="run at least one step"):
        method.best(GEPAState())


def test_minibatches_walk_through_shuffled_epochs_padded_to_full_batches():
    rng, order, epoch, seen = np.random.default_rng(0), (), -1, []
    for i in range(8):  # 10 examples, batches of 3: 12 per epoch, the two least used padded in
        ids, order, epoch = next_minibatch(order, epoch, i, 3, 10, rng)
        seen.append(ids)
    first = [x for b in seen[:4] for x in b]
    assert sorted(set(first)) == list(range(10)) and len(first) == 12
    assert first[10:] == first[9:7:-1]  # padding: the latest shuffled first
    assert epoch == 1 and [x for b in seen[4:8] for x in b] != first
    assert len(epoch_order(2, 3, np.random.default_rng(0))) == 3


def test_the_instruction_is_read_from_its_block():
    assert extract_instruction("Sure!\n```\nClassify the review.\n```\nDone") == "Classify the review."
    assert extract_instruction("```text\nClassify the review.\n```") == "Classify the review."
    assert extract_instruction("```\nClassify the review.") == "Classify the review."
    assert extract_instruction("  Classify the review.  ") == "Classify the review."


class LeansYes(PlantedLM):
    """:class:`PlantedLM` with " yes" favoured on every input, content-free ones included: raw
    predictions say yes far more often than calibrated ones."""

    def _ll(self, context, continuation, prompt):
        return super()._ll(context, continuation, prompt) + (1.5 if continuation == " yes" else 0.0)


def test_label_runs_predict_as_the_evaluator_does_calibrated_or_not():
    task = planted_task(n_dev=12)
    texts = ["the banana", "Decide the label."]
    raw = run_many(task, texts, task.dev, LeansYes())
    cal = run_many(replace(task, calibration="contextual"), texts, task.dev, LeansYes())
    assert raw[0].predictions != cal[0].predictions  # the content-free prior matters here
    for calibration, runs in (("none", raw), ("contextual", cal)):
        expected = evaluate.predict_many(replace(task, calibration=calibration), [TextPrompt(t) for t in texts],
                                         task.dev, LeansYes())
        assert [r.predictions for r in runs] == [list(map(int, e)) for e in expected]


def test_bad_arguments_are_one_clear_error():
    for bad in ({"minibatch_size": 0}, {"n_val": -1}, {"max_merge_invocations": -1}, {"temperature": -1.0},
                {"reflection_prompt": "no slots"}):
        with pytest.raises(ValueError, match=f"^{next(iter(bad))} "):  # one line naming the setting
            GEPA(**bad)
    task = planted_task()
    with pytest.raises(ValueError, match="no training examples"):
        GEPA().init(replace(task, train=()), PlantedLM(), PlantedLM(), np.random.default_rng(0))


def test_gepa_yamls_instantiate():
    for name in ("gepa", "gepa_paper"):
        method = hydra.utils.instantiate(OmegaConf.load(ROOT / f"conf/method/{name}.yaml"), _convert_="all")
        assert isinstance(method, GEPA) and method.minibatch_size == 3


def test_a_child_records_the_parent_it_was_reflected_from_and_its_validation_outcomes():
    task = planted_task()
    val = fixed_dev(task, 5)
    scores = [(1.0, 1.0, 1.0, 1.0, 0.0), (0.0, 0.0, 0.0, 0.0, 1.0)]  # both on the front: either can be the parent
    pool = tuple(Candidate(t, (), s, float(np.mean(s))) for t, s in zip(("Mean parent", "Specialist parent"), scores))
    method, shown = GEPA(n_val=len(val), skip_perfect_score=False), set()
    for seed in range(30):
        lm = Recording("```\nDecide the sentiment label carefully, review it.\n```")
        _, report = method.step(GEPAState(pool=pool), task, lm, lm, np.random.default_rng(seed))
        (context,), = lm.asked
        for e in report.evaluated:
            assert e.kind == "child" and e.parent == re.search(r"```\n(.*)\n```", context).group(1)
            assert_outcomes(task, e, val)
            shown.add(e.parent)
    assert shown == {"Mean parent", "Specialist parent"}  # accepted children of either parent
    _, (seed,) = run_steps(method, task, PlantedLM(), steps=1)
    assert seed.evaluated[0].parent == "" and seed.evaluated[0].kind == "seed"
    assert_outcomes(task, seed.evaluated[0], val)


def test_a_merge_records_its_first_parent_and_its_validation_outcomes():
    from tasks.core import example_key

    task, lm = planted_task(), Specialist()
    state, val = merge_ready(task, lm)
    new, report = GEPA(n_val=5, use_merge=True).step(state, task, lm, lm, np.random.default_rng(0))
    (e,) = report.evaluated
    assert e.kind == "merge" and e.parent == state.pool[2].text  # parents (2, 3): the first
    assert e.examples == tuple(example_key(ex) for ex in val) and e.outcomes == new.pool[-1].scores
