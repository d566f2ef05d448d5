"""ProTeGi and the racing helpers against the planted fake LM and scripted bandits."""

import pickle
import re
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from methods.protegi import ProTeGi, error_block, first_usable, sample_errors
from methods.racing import fixed_dev, predict_many, successive_rejects, ucb_race
from methods.text import clean_one
from tests.fakes import PlantedLM, WritingLog, assert_outcomes, planted_task, quality, run_steps

ROOT = Path(__file__).resolve().parents[1]


class RecordingLM(PlantedLM):
    """Keeps every generate context and the request count of every scorer call."""

    def __init__(self):
        super().__init__()
        self.contexts, self.batches = [], []

    def loglikelihood(self, requests):
        self.batches.append(len(requests))
        return super().loglikelihood(requests)

    def generate(self, contexts, **kw):
        self.contexts += list(contexts)
        return super().generate(contexts, **kw)


run = run_steps


@pytest.mark.parametrize("selector", ["ucb", "successive_rejects"])
def test_protegi_climbs_with_a_bounded_beam(selector):
    task, lm = planted_task(n_dev=60), RecordingLM()
    method = ProTeGi(beam_size=3, selector=selector, budget=40, pull_size=10, n_eval=0)
    rng = np.random.default_rng(0)
    state, reports, beam_quality = method.init(task, lm, lm, rng), [], []
    for _ in range(8):
        state, report = method.step(state, task, lm, lm, rng)
        reports.append(report)
        assert 1 <= len(state.beam) <= 3 and len(set(state.beam)) == len(state.beam)
        beam_quality.append(np.mean([quality(b) for b in state.beam]))
    assert quality(method.best(state).text) > quality(task.instruction) + 0.15
    curve = [r.metrics["dev_score"] for r in reports]
    assert curve == sorted(curve)
    assert beam_quality[-1] > beam_quality[0] + 0.1  # the whole beam climbs, not one lucky draw
    assert all(r.metrics["pulls"] <= 40 for r in reports) and reports[-1].metrics["arms"] > 3


def test_protegi_race_spends_at_most_its_budget_in_few_scorer_calls():
    task, lm = planted_task(), RecordingLM()
    method = ProTeGi(beam_size=2, budget=12, pull_size=5, per_round=4, n_eval=20)
    state, _ = run(method, task, lm, steps=1)
    lm.batches.clear()
    state, report = method.step(state, task, lm, lm, np.random.default_rng(1))
    race = [e for e in report.evaluated if e.kind == "race"]
    beam = [e for e in report.evaluated if e.kind == "beam"]
    pulls = sum(e.n for e in race) // 5
    assert pulls == report.metrics["pulls"] <= 12 and len(state.beam) == 2
    # requests: errors (beam x minibatch x 2 labels) + race (pulls x pull_size x 2) + new beam members
    assert sum(lm.batches) == 2 * 16 * 2 + pulls * 5 * 2 + len(beam) * 20 * 2
    assert len(lm.batches) == 1 + report.metrics["race_rounds"] + (1 if beam else 0)
    assert report.metrics["race_rounds"] == 1 + -(-(12 - report.metrics["arms"]) // 4)


def test_gradient_and_edit_prompts_show_the_members_real_errors():
    task, lm = planted_task(), RecordingLM()
    run(ProTeGi(beam_size=1, n_gradients=2, edits_per_gradient=1, mc_samples=1), task, lm, steps=1)
    head = "I'm trying to write a zero-shot classifier prompt."
    grads = [c for c in lm.contexts if c.startswith(head)]
    edits = [c for c in lm.contexts if "the problem with this prompt is that" in c]
    # Fails on the old behaviour (every reason from one error sample): one error sample per
    # gradient meta-prompt, each reason edited with the errors it came from
    assert len(grads) == 2 and 1 <= len(edits) <= 2
    blocks = [g.split("But this prompt gets the following examples wrong:\n")[1].split("\n\ngive")[0] for g in grads]
    for g in grads:
        shown = re.findall(r'Text: "case (\d+) is (\w+)"\nLabel: (\w+)\nPrediction: (\w+)', g)
        assert 1 <= len(shown) <= 4
        assert all(word == label != pred for _, word, label, pred in shown)
    assert all(any(b in e for b in blocks) for e in edits)
    assert '"the banana"' in grads[0] and '"the banana"' in edits[0]
    # the member itself is paraphrased too, as the reference does
    assert any(c.startswith("Generate a variation") and "Input: the banana" in c for c in lm.contexts)


def test_a_members_successors_are_cut_to_max_expansion():
    """Fails on the old behaviour (no expansion cap): the reference keeps a random
    max_expansion_factor of a member's new prompts."""
    task, lm = planted_task(), RecordingLM()
    method = ProTeGi(beam_size=1, n_gradients=4, edits_per_gradient=3, mc_samples=3, max_expansion=3, budget=8)
    state, _ = run(method, task, lm, steps=1)
    _, report = method.step(state, task, lm, lm, np.random.default_rng(0))
    assert report.metrics["arms"] <= 1 + 3
    uncapped = ProTeGi(beam_size=1, n_gradients=4, edits_per_gradient=3, mc_samples=3, max_expansion=0, budget=8)
    state, _ = run(uncapped, task, lm, steps=1)
    _, report = uncapped.step(state, task, lm, lm, np.random.default_rng(0))
    assert report.metrics["arms"] > 1 + 3


def test_sample_errors_and_error_block():
    task = planted_task()
    batch = task.train[:10]
    preds = np.array([ex.label for ex in batch])
    preds[[1, 4, 7]] = 1 - preds[[1, 4, 7]]
    errors = sample_errors(task, batch, preds, 2, np.random.default_rng(0))
    assert len(errors) == 2 and all(ex in (batch[1], batch[4], batch[7]) for ex, _ in errors)
    assert error_block(task, errors).count("## Example") == 2
    lm = PlantedLM()
    grid = predict_many(task, ["the banana", "decide label review sentiment carefully"], batch, lm)
    assert np.shape(grid) == (2, 10) and lm.calls == 1
    assert (grid[1] == [ex.label for ex in batch]).all()


def bernoulli_pull(means, rng, log):
    def pull(arms, reps):
        log.append((list(arms), reps))
        return [rng.binomial(8 * reps, means[a]) / (8 * reps) for a in arms]

    return pull


def test_ucb_race_respects_budget_and_round_size_and_finds_the_best_arm():
    means = [0.3, 0.5, 0.85, 0.45, 0.2, 0.6]
    log = []
    race = ucb_race(6, bernoulli_pull(means, np.random.default_rng(0), log), budget=40, per_round=3,
                    rng=np.random.default_rng(1))
    assert race.pulls == sum(race.counts) == 40 and race.rounds == len(log)
    assert log[0][0] == list(range(6)) and all(len(arms) <= 3 for arms, _ in log[1:])
    assert race.top(1) == [2] and race.counts[2] == max(race.counts)
    small = ucb_race(6, bernoulli_pull(means, np.random.default_rng(0), []), budget=4, per_round=3,
                     rng=np.random.default_rng(1))
    assert small.pulls == 4 and sum(c > 0 for c in small.counts) == 4 and len(small.top(2)) == 2


def test_successive_rejects_respects_budget_and_keeps_the_best():
    means = [0.3, 0.5, 0.9, 0.45, 0.2, 0.6]
    log = []
    race = successive_rejects(6, bernoulli_pull(means, np.random.default_rng(0), log), budget=60, keep=2)
    assert race.pulls == sum(race.counts) <= 60 and race.rounds == len(log) == 4
    assert [len(arms) for arms, _ in log] == [6, 5, 4, 3]
    assert 2 in race.top(2) and sorted(race.counts)[-2:] == sorted(race.counts[i] for i in race.top(2))


def test_protegi_state_pickles_and_resumes_identically():
    task, method = planted_task(), ProTeGi(beam_size=2, budget=16)
    full, _ = run(method, task, PlantedLM(), steps=3, seed=7)
    lm, rng = PlantedLM(), np.random.default_rng(7)
    state = method.init(task, lm, lm, rng)
    state, _ = method.step(state, task, lm, lm, rng)
    state, rng = pickle.loads(pickle.dumps((state, rng)))
    for _ in range(2):
        state, _ = method.step(state, task, lm, lm, rng)
    assert state == full


def test_protegi_yaml_instantiates():
    method = hydra.utils.instantiate(OmegaConf.load(ROOT / "conf/method/protegi.yaml"), _convert_="all")
    assert isinstance(method, ProTeGi) and method.selector in ("ucb", "successive_rejects")
    with pytest.raises(ValueError, match="selector"):
        ProTeGi(selector="greedy")


def test_first_usable_skips_what_small_models_write_before_the_item():
    raw = '\n```\n# Prompt\n"Classify the tone of the text, even when sarcastic.\nText: <p> "\n```'
    assert first_usable(raw) == "Classify the tone of the text, even when sarcastic."
    assert first_usable("x <START> Reason one here <END> <START> two") == "Reason one here"
    assert first_usable("one<END>\n<START>The second item.<END>") == "The second item."
    assert first_usable("Because it lacks examples.<END>more") == "Because it lacks examples."
    assert first_usable(" and ") == "" and first_usable("") == ""
    echo = '\nThe 1 new prompt is:\nText: "a review"\n= "Judge the tone of each text."'
    assert first_usable(echo) == "Judge the tone of each text."


def _members_behind(lm: WritingLog, text: str, beam) -> set[str]:
    """The beam members ``text`` could have been written from: through the edit meta-prompt that
    wrote it, or the paraphrase of a member or of such an edit."""
    found = set()
    for context in lm.contexts_for(text, read=lambda s: clean_one(first_usable(s))):
        found |= set(re.findall(r'My current prompt is:\n"(.*)"', context)) & set(beam)
    for context in lm.contexts_for(text):
        for source in re.findall(r"^Input: (.*)\n\nOutput:", context, re.MULTILINE):
            found |= {source} if source in beam else _members_behind(lm, source, beam)
    return found


def test_protegi_records_the_member_each_new_prompt_was_expanded_from():
    task, lm = planted_task(), WritingLog()
    method = ProTeGi(beam_size=2, budget=16, pull_size=4, n_eval=16)
    rng = np.random.default_rng(0)
    state, children_of = method.init(task, lm, lm, rng), set()
    for _ in range(3):
        beam = state.beam
        state, report = method.step(state, task, lm, lm, rng)
        for e in report.evaluated:
            if e.kind == "beam":
                assert_outcomes(task, e, fixed_dev(task, 16))
            else:  # the race's minibatches are not kept
                assert e.examples == e.outcomes == ()
            if e.prompt in beam:
                assert e.parent == ""  # the seed (or a member carried over): not written this step
            else:
                assert e.parent in _members_behind(lm, e.prompt, beam)
                children_of.add(beam.index(e.parent))
    assert children_of == {0, 1}  # children of the second member too, not only of the first
