"""manual and APE against the planted fake LM: the algorithm, not a model, is under test."""

import pickle

import numpy as np
import pytest

from methods.ape import APE
from methods.manual import Manual
from methods.text import clean_candidates, clean_one
from tests.fakes import PlantedLM, WritingLog, assert_outcomes, planted_task, quality


def run(method, task, lm, steps=10, seed=0):
    rng = np.random.default_rng(seed)
    state = method.init(task, lm, lm, rng)
    reports = []
    while not method.done(state) and len(reports) < steps:
        state, report = method.step(state, task, lm, lm, rng)
        reports.append(report)
    return state, reports


def test_manual_scores_the_task_instruction_once():
    task, lm = planted_task(), PlantedLM()
    state, reports = run(Manual(), task, lm)
    assert len(reports) == 1 and lm.calls == 1
    assert Manual().best(state).text == "the banana"
    assert reports[0].metrics["dev_score"] == pytest.approx(reports[0].evaluated[0].score)
    assert lm.requests == 2 * len(task.dev)


def test_ape_picks_the_best_scoring_candidate_and_beats_the_seed():
    task, lm = planted_task(n_dev=60), PlantedLM()
    method = APE(n_prompts=12, n_eval=0, rounds=2)
    state, reports = run(method, task, lm)
    assert len(reports) == 3
    best = method.best(state).text
    assert best == max(state.scored, key=lambda s: s[1])[0]
    assert quality(best) > quality(task.instruction)
    assert reports[-1].metrics["dev_score"] >= reports[0].metrics["dev_score"]
    # every round scores all of its candidates in one scorer call
    assert lm.calls == 3 + 3


def test_ape_state_survives_pickle_and_resume_gives_same_result():
    task = planted_task()
    method = APE(n_prompts=6, rounds=2)
    full, _ = run(method, task, PlantedLM(), seed=3)
    rng = np.random.default_rng(3)
    lm = PlantedLM()
    state = method.init(task, lm, lm, rng)
    state, _ = method.step(state, task, lm, lm, rng)
    state, rng = pickle.loads(pickle.dumps((state, rng)))
    while not method.done(state):
        state, _ = method.step(state, task, lm, lm, rng)
    assert state == full


def test_clean_candidates_drops_empty_duplicates_and_copies():
    demos = ["a gripping, funny and moving film about love"]
    raws = ["", "1. Classify the review.", "classify the review", demos[0], "ok", '"Decide the label"']
    assert clean_candidates(raws, banned=demos) == ["Classify the review.", "Decide the label"]
    assert clean_one("\n\n  - write the sentiment\nmore") == "Write the sentiment"


def test_clean_one_skips_fences_and_headings_small_models_open_with():
    assert clean_one("```\n## Instruction\nClassify each review by its sentiment.\n```") == "Classify each review by its sentiment."
    assert clean_one("```\n```") == ""


def test_successive_halving_drops_weak_candidates_early_and_keeps_the_best():
    from methods.racing import predict_many, successive_halving

    task, lm = planted_task(n_dev=64), PlantedLM()
    # planted qualities 0.5 to 1.0: only the last is right on every example, so it wins every rung
    texts = ["the banana", "review", "x y", "review label", "review label decide", "the",
             "review label decide sentiment", "carefully decide the sentiment label of the review"]
    race = successive_halving(task, texts, task.dev, lm, min_examples=8, eta=2)
    # rungs of 8, 16 and 32 examples, then the lone survivor goes straight to all 64
    assert lm.calls == race.calls == 4
    assert sorted(race.seen) == [8, 8, 8, 8, 16, 16, 32, 64]
    assert lm.requests == 2 * (8 * 8 + 4 * 8 + 2 * 16 + 32)  # only new examples are run at each rung
    assert race.finalists() == [7] and race.scores[7] == 1.0
    full = [task.score(p, task.dev) for p in predict_many(task, texts, task.dev, lm)]
    # whoever got further scored better where it was dropped: the race keeps the better half
    for a, b in [(a, b) for a in range(8) for b in range(8) if race.seen[a] > race.seen[b]]:
        n = race.seen[b]
        assert task.score(predict_many(task, [texts[a]], task.dev[:n], lm)[0], task.dev[:n]) >= race.scores[b]
    assert race.scores[7] == pytest.approx(full[7])  # the finalist's score is on the whole subset
    with pytest.raises(ValueError, match="halving"):
        successive_halving(task, texts, task.dev, lm, min_examples=0)


def test_ape_with_halving_scores_fewer_examples_and_never_returns_a_dropped_candidate():
    task = planted_task(n_dev=64)
    plain_lm, race_lm = PlantedLM(), PlantedLM()
    plain, _ = run(APE(n_prompts=12, n_eval=0), task, plain_lm)
    raced, reports = run(APE(n_prompts=12, n_eval=0, halving_min=8), task, race_lm)
    assert race_lm.requests < 0.5 * plain_lm.requests
    dropped = {t for t, _, _ in raced.dropped}
    assert dropped and APE().best(raced).text not in dropped
    kinds = {e.kind for e in reports[0].evaluated}
    assert kinds == {"candidate", "dropped"}
    assert all(e.n == 64 for e in reports[0].evaluated if e.kind == "candidate")
    # the baseline ("the banana") has the lowest planted quality: the race must find better
    assert quality(APE().best(raced).text) > quality(task.instruction)
    finalists = [e for e in reports[0].evaluated if e.kind == "candidate"]
    assert APE().best(raced).text == max(finalists, key=lambda e: e.score).prompt


class ConfidenceLM(PlantedLM):
    """Two proposals: "sharp" is right on every example by a hair (gold log-prob -0.6); "bold"
    is right on 7 of 8 with near certainty and wrong on the 8th (gold -1.0)."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        texts = ["Answer sharply now.", "Answer boldly now."]
        return [[texts[i % 2]] * n for i in range(len(contexts))]

    def loglikelihood(self, requests):
        out = []
        for r in requests:
            instruction, sentence = r.context.split("\n")[0], r.context.split("\n")[1]
            gold = " yes" if sentence.endswith("yes") else " no"
            if "sharply" in instruction:
                out.append(-0.6 if r.continuation == gold else -0.8)
            elif "boldly" in instruction:
                missed = int(sentence.split()[2]) % 8 == 0
                out.append((-1.0 if missed else -0.01) if r.continuation == gold else (-0.1 if missed else -5.0))
            else:
                out.append(-1.0)
        return np.asarray(out, dtype=np.float64)


def test_ape_likelihood_score_ranks_by_the_gold_outputs_log_probability():
    """Fails on the old behaviour (APE ranked only by accuracy): APE's default evaluator ranks by the
    mean log-probability of the gold output, and prefers the confident instruction."""
    from methods.ape import gold_likelihood

    task, lm = planted_task(n_dev=64), ConfidenceLM()
    by_metric, _ = run(APE(n_prompts=2, n_eval=0), task, lm, steps=1)
    by_likelihood, reports = run(APE(n_prompts=2, n_eval=0, score="likelihood"), task, lm, steps=1)
    assert APE().best(by_metric).text == "Answer sharply now."
    assert APE(score="likelihood").best(by_likelihood).text == "Answer boldly now."
    liks = dict(by_likelihood.likelihood)
    assert liks["Answer sharply now."] == pytest.approx(-0.6)
    missed = sum(int(ex.inputs["sentence"].split()[1]) % 8 == 0 for ex in task.dev) / len(task.dev)
    assert liks["Answer boldly now."] == pytest.approx(-1.0 * missed - 0.01 * (1 - missed))
    # the reported dev score is the chosen prompt's accuracy, comparable with every method's
    bold_accuracy = dict(by_likelihood.scored)["Answer boldly now."]
    assert reports[-1].metrics["dev_score"] == pytest.approx(bold_accuracy) and bold_accuracy < 1.0
    assert gold_likelihood(task, [], task.dev, lm) == []
    with pytest.raises(ValueError, match="halving_min=0"):
        APE(score="likelihood", halving_min=8)


def test_ape_ucb_race_spends_its_pulls_and_scores_only_its_finalists_in_full():
    """The reference's bandit evaluation (configs/bandits.yaml): UCB over dev minibatches, here
    with the finalists scored on the fixed dev subset; the old APE had no such race."""
    task = planted_task(n_dev=64)
    lm = PlantedLM()
    method = APE(n_prompts=12, n_eval=0, ucb_pulls=30, ucb_pull_size=4, ucb_per_round=6, ucb_finalists=3)
    state, reports = run(method, task, lm, steps=1)
    assert len(state.scored) == 3 and len(state.scored) + len(state.dropped) == len(set(t for t, *_ in state.scored + state.dropped))
    assert all(n % 4 == 0 and n <= 30 * 4 for _, _, n in state.dropped)
    full, _ = run(APE(n_prompts=12, n_eval=0), task, PlantedLM(), steps=1)
    best_full = max(s for _, s in full.scored)
    assert max(s for _, s in state.scored) >= best_full - 0.1  # the race keeps a near-best candidate
    assert {e.kind for e in reports[0].evaluated} == {"candidate", "dropped"}
    for e in reports[0].evaluated:  # finalists: their dev outcomes; the race's minibatches are not kept
        assert len(e.outcomes) == (64 if e.kind == "candidate" else 0)
    with pytest.raises(ValueError, match="not both"):
        APE(ucb_pulls=10, halving_min=8)


def test_manual_records_what_its_instruction_got_right_on_each_dev_example():
    task = planted_task()
    _, reports = run(Manual(), task, PlantedLM())
    (record,) = reports[0].evaluated
    assert record.parent == ""
    assert_outcomes(task, record, task.dev)


def test_ape_records_each_variation_with_the_candidate_it_varies_and_its_outcomes():
    from methods.ape import RESAMPLE_TEMPLATE
    from methods.evaluate import subsample

    task, lm = planted_task(), WritingLog()
    method = APE(n_prompts=6, n_eval=16, rounds=1, top_k=2, per_top=3)
    _, (first, second) = run(method, task, lm)
    dev = subsample(task.dev, 16, np.random.default_rng(0))
    assert first.evaluated and all(e.parent == "" for e in first.evaluated)  # written from demos alone
    top = {e.prompt for e in sorted(first.evaluated, key=lambda e: -e.score)[:2]}
    assert {e.parent for e in second.evaluated} == top  # both top candidates have children here
    for e in first.evaluated + second.evaluated:
        assert_outcomes(task, e, dev)
    for e in second.evaluated:
        assert RESAMPLE_TEMPLATE.format(instruction=e.parent) in lm.contexts_for(e.prompt)


def test_ape_halving_records_the_prefix_each_candidate_was_scored_on():
    task = planted_task(n_dev=32)
    _, (report,) = run(APE(n_prompts=10, n_eval=0, halving_min=8), task, PlantedLM(), steps=1)
    assert {e.kind for e in report.evaluated} == {"candidate", "dropped"}
    for e in report.evaluated:
        seen = 32 if e.kind == "candidate" else e.n
        assert_outcomes(task, e, task.dev[:seen])
