"""AutoPrompt's label-word search: a probe on the answer state picks the words the model reads.

``ProbeLM`` is a fake whose answer state carries the example's label along one direction of a
planted pair of output embeddings (" awful" / " great"), and whose scores are exactly
``log_softmax(state @ output_embeddings.T)``: the task's own words (" no" / " yes") sit at
random, so only a search that reads the probe's weights against the output embeddings finds
the words that classify.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import replace

import numpy as np
import pytest

from methods.autoprompt import AutoPrompt
from methods.base import final_task
from methods.evaluate import score_prompts
from methods.label_search import LabelSearch, pick_words, relabel, word_scores
from methods.lm import ANSWER_STATES, TextPrompt, TokenPrompt
from pipelines.lm.client import forward_to_inner
from tests.fakes import planted_task
from tests.tiny import tiny_backend

WORDS = ("<s>", "no", "yes", "the", "great", "awful", "film", "Great", "##ing", "banana", "input", "label")


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


class ProbeLM:
    """Answer states that encode the label along ``E_out[great] - E_out[awful]``; scores read them."""

    capabilities = frozenset({ANSWER_STATES})

    def __init__(self, d: int = 6, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        # The label lives on axis 0, which only the planted pair's output embeddings use.
        self.out = rng.standard_normal((len(WORDS), d)).astype(np.float32)
        self.out[:, 0] = 0.0
        self.out[WORDS.index("great"), 0], self.out[WORDS.index("awful"), 0] = 3.0, -3.0
        self.direction = np.eye(d, dtype=np.float32)[0]
        self.common = rng.standard_normal(d).astype(np.float32)
        self.common[0] = 0.0
        self.state_calls, self.states_read, self.ll_calls = 0, 0, 0
        self.prompts: list = []

    def _state(self, context: str) -> np.ndarray:
        sign = 1.0 if "is yes" in context else -1.0
        noise = np.array([_unit(f"{context}|{i}") - 0.5 for i in range(len(self.common))], dtype=np.float32)
        return (self.common + sign * self.direction + noise).astype(np.float32)

    def answer_states(self, contexts, prompt=None) -> np.ndarray:
        self.state_calls += 1
        self.states_read += len(contexts)
        self.prompts.append(prompt)
        return np.stack([self._state(c) for c in contexts])

    def output_embeddings(self) -> np.ndarray:
        return self.out

    def loglikelihood(self, requests) -> np.ndarray:
        self.ll_calls += 1
        out = []
        for r in requests:
            logits = self.out.astype(np.float64) @ self._state(r.context)
            logp = logits - np.logaddexp.reduce(logits)
            out.append(sum(logp[i] for i in self.tokenize(r.continuation)))
        return np.array(out)

    def tokenize(self, text: str) -> list[int]:
        return [WORDS.index(w) if w in WORDS else 0 for w in text.split()]

    def decode(self, ids) -> str:
        return "".join(WORDS[i] if WORDS[i].startswith(("#", "<")) else " " + WORDS[i] for i in ids)


def run(method, task, lm, steps: int = 50):
    state, rng, reports = method.init(task, lm, lm, np.random.default_rng(0)), np.random.default_rng(1), []
    while not method.done(state) and len(reports) < steps:
        state, report = method.step(state, task, lm, lm, rng)
        reports.append(report)
    return state, reports


def test_the_search_finds_the_planted_label_words_and_they_beat_the_tasks_own():
    task, lm = planted_task(n_train=40, n_dev=40), ProbeLM()
    method = LabelSearch(n_train=0, epochs=30, epochs_per_step=10, batch_size=8, lr=0.05, n_eval=0)
    state, reports = run(method, task, lm)
    found = method.task_for(state, task)
    assert found.verbalizer == (" awful", " great")
    (own,) = score_prompts(task, [TextPrompt(task.instruction)], task.dev, lm)
    assert state.best_dev == pytest.approx(score_prompts(found, [TextPrompt(task.instruction)], task.dev, lm)[0])
    assert state.best_dev > own + 0.2
    assert reports[0].evaluated[0].kind == "original labels"  # the task's words competed, and lost
    assert [r.metrics["epoch"] for r in reports] == [0.0, 10.0, 20.0, 30.0]
    assert method.best(state) == TextPrompt(task.instruction)  # the instruction is the task's: only words change


def test_the_states_are_read_once_and_training_calls_no_model():
    # The model and the prompt are frozen, so the pool's states are read in one call; each later
    # step scores one word set on dev (one call) and reads no state again.
    task, lm = planted_task(n_train=40, n_dev=16), ProbeLM()
    method = LabelSearch(n_train=24, epochs=3, epochs_per_step=1, n_eval=8, keep_original=False)
    state, reports = run(method, task, lm)
    assert (lm.state_calls, lm.states_read) == (1, 24)
    assert lm.ll_calls == 3 and len(reports) == 4 == method.planned_steps()
    assert len(state.features) == 24 and state.t == 3  # one minibatch of 32 per epoch of 24


def test_word_scores_are_a_softmax_over_classes_so_a_word_both_classes_like_loses():
    # The paper scores s(y, w) = p(y | w_out): a word whose output embedding is large along what
    # both classes share ("common") says nothing about either; raw weight . E_out would pick it.
    weight = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]], dtype=np.float32)
    out = np.array([[0.0, 0.0, 10.0], [2.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)  # common, a, b
    scores = word_scores(weight, out)
    np.testing.assert_allclose(scores.sum(axis=0), 1.0, rtol=1e-6)
    names = {0: " common", 1: " a", 2: " b"}
    assert pick_words(scores, names.__getitem__, 10) == (" a", " b")


def test_pick_words_skips_refused_tokens_and_words_an_earlier_class_took():
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.9, 0.7, 0.6, 0.0]])
    names = {0: " good", 1: "", 2: " fine", 3: " bad"}  # token 1 is refused by the filters
    assert pick_words(scores, names.__getitem__, 10) == (" good", " fine")
    with pytest.raises(ValueError, match="no allowed label word for class 1"):
        pick_words(scores, {0: " good", 1: "", 2: "", 3: ""}.__getitem__, 10)


def test_the_state_pickles_and_a_resumed_search_ends_where_an_unbroken_one_does():
    task = planted_task(n_train=40, n_dev=16)
    method = LabelSearch(n_train=0, epochs=4, epochs_per_step=1, batch_size=8, lr=0.05, n_eval=8)
    lm, rng = ProbeLM(), np.random.default_rng(3)
    state = method.init(task, lm, lm, rng)
    for _ in range(2):
        state, _ = method.step(state, task, lm, lm, rng)
    saved, saved_rng = pickle.dumps(state), pickle.dumps(rng)
    while not method.done(state):
        state, _ = method.step(state, task, lm, lm, rng)
    resumed, rng2 = pickle.loads(saved), pickle.loads(saved_rng)
    while not method.done(resumed):
        resumed, _ = method.step(resumed, task, lm, lm, rng2)
    np.testing.assert_array_equal(resumed.weight, state.weight)
    assert resumed.best_words == state.best_words and resumed.t == state.t


def test_label_search_refuses_tasks_without_one_label_set_and_needs_answer_states():
    task = planted_task()
    cloze = replace(task, train=tuple(replace(ex, choices=(" a", " b")) for ex in task.train))
    with pytest.raises(ValueError, match="one label set"):
        LabelSearch().check_task(cloze)
    assert LabelSearch().needs().scorer == {ANSWER_STATES}
    assert ANSWER_STATES in AutoPrompt(search_labels=True).needs().scorer
    assert ANSWER_STATES not in AutoPrompt().needs().scorer
    with pytest.raises(ValueError, match="one label set"):
        AutoPrompt(search_labels=True).check_task(cloze)


class Recording:
    """Passes calls to a backend and keeps the continuations each scoring call asked for."""

    def __init__(self, inner) -> None:
        self.inner, self.continuations, self.prompts_read = inner, [], []

    __getattr__ = forward_to_inner

    def loglikelihood(self, requests):
        requests = list(requests)
        self.continuations.append({r.continuation for r in requests})
        return self.inner.loglikelihood(requests)

    def answer_states(self, contexts, prompt=None):
        self.prompts_read.append(prompt)
        return self.inner.answer_states(contexts, prompt)


def test_autoprompt_searches_labels_first_then_its_triggers_and_the_test_score_read_them():
    # On a real (tiny, random) causal backend: the label steps read states under the initial
    # triggers, then every trigger step scores with the words found, and the pipeline's test
    # scoring (final_task) reads the best triggers with them.
    task = planted_task(n_train=24, n_dev=8)
    lm = Recording(tiny_backend())
    method = AutoPrompt(n_triggers=2, n_candidates=2, batch_size=4, eval_every=1, n_eval=8,
                        search_labels=True, label_pool=16, label_epochs=2, label_keep_original=False)
    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    reports = []
    for _ in range(5):
        state, report = method.step(state, task, lm, lm, rng)
        reports.append(report)
    assert [r.metrics.get("label_search", 0.0) for r in reports] == [1.0, 1.0, 0.0, 0.0, 0.0]  # read; train all
    words = state.labels.best_words
    assert len(words) == 2 and state.labels.epoch == 2 and words != task.verbalizer
    assert lm.prompts_read == [TokenPrompt(state.labels.prompt.ids, state.labels.prompt.text)]
    assert state.best_dev == state.labels.best_dev  # the trigger search starts from the label search's score
    trigger_calls = lm.continuations[-6:]  # the three trigger steps: candidates, then dev
    assert all(c <= set(words) for c in trigger_calls), (words, trigger_calls)
    assert final_task(method, state, task).verbalizer == words
    assert final_task(method, replace(state, labels=None), task) is task  # no search: the task's own words
    assert final_task(LabelSearch(), LabelSearch().start(TextPrompt("x")), task) is task  # nothing found yet


def test_relabel_validates_the_words_like_any_task():
    with pytest.raises(ValueError, match="repeat a word"):
        relabel(planted_task(), (" good", "good"))
    task = planted_task()
    moved = relabel(task, (" a", " b"))
    assert moved.verbalizer == (" a", " b") and (moved.train, moved.template) == (task.train, task.template)
