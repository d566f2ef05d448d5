"""AutoPrompt's label-token search (Shin et al. 2020, section 2.2): choose the label words.

The paper's two steps, as ucinlp/autoprompt's ``label_search.py`` runs them:

1. A logistic classifier is trained on the state the LM head reads where the answer is
   predicted (the ``[MASK]`` of a masked LM; the last context position of a causal LM),
   ``p(y | h) ∝ exp(h · w_y + b_y)``, with Adam on minibatches of train examples under the
   prompt (the task's instruction, or AutoPrompt's triggers).
2. Each vocabulary word ``v`` is scored by putting its *output* embedding in place of ``h``:
   ``s(y, v) = softmax_y(w_y · E_out[v])``; the words that score highest for a class are its
   label words.

Because the model and the prompt are frozen, an example's state never changes during the
search: the states of a pool of train examples are read once, in the first step (one
``answer_states`` call, charged one example-evaluation each), and every later step trains
``epochs_per_step`` epochs on them with no model call, then scores the class's best word on
the dev subset (one ``loglikelihood`` call). The reference re-runs the frozen model on every
batch of every epoch for the same numbers.

Departures, stated: one label word per class (the paper allows a set of ``k`` words whose
probabilities are summed; a task here has one continuation per label), chosen automatically
as the top-scoring word that passes the filters and no other class took, where the reference
prints the top ``k`` for a person to choose from; the classifier reads a pool of ``n_train``
examples (0: all of train) rather than every train example each epoch; the word sets found
after each epoch are compared on dev and the best is kept (``keep_original`` lets the task's
own words compete), where the reference keeps the last.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report
from methods.evaluate import score_prompts, slot_text, spliced_prompt, subsample
from methods.lm import ANSWER_STATES, LM, Needs, Prompt, TextPrompt, TokenPrompt
from methods.racing import fixed_dev
from methods.optim import adam
from tasks.core import Task
from tasks.generative import is_generative


@dataclass(frozen=True, eq=False)
class LabelSearchState:
    """The probe's features, weights and Adam moments, and the label words found: the checkpoint.

    Attributes:
        prompt: what fills the instruction slot while the states are read (text or triggers).
        features, targets: the pool's answer states ``[n, d]`` (float32) and their labels.
        weight, bias: the linear probe, ``[classes, d]`` and ``[classes]``.
        m, v, t: Adam's moments (for weight and bias) and its step count.
        epoch: epochs trained.
        words: the label words chosen after the last epoch.
        best_words, best_dev: the label words with the highest dev score so far.
        loss, train_acc: the probe's mean loss and accuracy over its last epoch.
    """

    prompt: Prompt
    features: np.ndarray | None = None
    targets: np.ndarray | None = None
    weight: np.ndarray | None = None
    bias: np.ndarray | None = None
    m: tuple[np.ndarray, ...] = ()
    v: tuple[np.ndarray, ...] = ()
    t: int = 0
    epoch: int = 0
    words: tuple[str, ...] = ()
    best_words: tuple[str, ...] = ()
    best_dev: float = float("-inf")
    loss: float = float("nan")
    train_acc: float = float("nan")


@dataclass(frozen=True)
class LabelSearch:
    """Label-word search with a linear probe on the answer state (``method=label_search``).

    On its own it keeps the task's instruction and finds the label words for it; AutoPrompt
    runs it first when ``search_labels=true``, under its initial triggers.

    Args:
        n_train: train examples whose states the probe learns from (0: all of train).
        epochs: passes over them (the reference's ``--iters``).
        epochs_per_step: passes per step; dev is scored after each step.
        batch_size: probe minibatch (the reference's ``--bsz``).
        lr: the probe's Adam learning rate (the reference's ``--lr``).
        filter_words: only lowercase alphabetic tokens that start a word can be label words
            (readable, and a label word then scores as exactly that one token).
        keep_original: the task's own label words compete on dev with the ones found.
        n_eval: dev examples (a fixed subset) each word set is scored on; 0 is the whole dev split.
        max_checks: ranked tokens inspected per class to find one that passes the filters.
        beta1, beta2, eps: Adam constants (torch.optim.Adam's defaults, as the reference uses).
    """

    n_train: int = 256
    epochs: int = 10
    epochs_per_step: int = 1
    batch_size: int = 32
    lr: float = 3e-4
    filter_words: bool = True
    keep_original: bool = True
    n_eval: int = 64
    max_checks: int = 2000
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if min(self.epochs, self.epochs_per_step, self.batch_size) < 1:
            raise ValueError("epochs, epochs_per_step and batch_size must be >= 1")
        if self.n_train < 0 or self.n_eval < 0 or self.lr <= 0:
            raise ValueError("n_train and n_eval must be >= 0 and lr > 0")

    def needs(self) -> Needs:
        return Needs(scorer=frozenset({ANSWER_STATES}))

    def check_task(self, task) -> None:
        """Label words exist only where a task scores one label set: not generative, not cloze."""
        if is_generative(task) or any(ex.choices is not None for ex in task.train + task.dev + task.test):
            raise ValueError("label search needs a task with one label set (its verbalizer); this task has none")

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> LabelSearchState:
        return self.start(TextPrompt(task.instruction))

    def start(self, prompt: Prompt) -> LabelSearchState:
        """A search under ``prompt`` (AutoPrompt passes its triggers)."""
        return LabelSearchState(prompt=prompt)

    def step(self, state: LabelSearchState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if state.features is None:
            return self._read(state, task, scorer, rng)
        state = self._train(state, rng)
        words = pick_words(word_scores(state.weight, scorer.output_embeddings()), self._word_of(scorer), self.max_checks)
        (score,) = score_prompts(relabel(task, words), [state.prompt], fixed_dev(task, self.n_eval), scorer)
        state = replace(state, words=words)
        if score > state.best_dev:
            state = replace(state, best_words=words, best_dev=score)
        evaluated = (Evaluated(f"labels: {'/'.join(w.strip() for w in words)}", score, self._n_dev(task), "labels"),)
        return state, Report(self._metrics(state), evaluated)

    def _read(self, state: LabelSearchState, task: Task, scorer: LM, rng: np.random.Generator):
        """Read the pool's answer states (one call) and, with ``keep_original``, score the task's words."""
        pool = subsample(task.train, self.n_train, rng)
        contexts = [task.render(slot_text(state.prompt), ex) for ex in pool]
        features = np.asarray(scorer.answer_states(contexts, spliced_prompt(state.prompt)), dtype=np.float32)
        k, d = len(task.verbalizer), features.shape[1]
        # torch.nn.Linear's default init, as the reference's projection starts.
        bound = 1 / np.sqrt(d)
        weight = rng.uniform(-bound, bound, (k, d)).astype(np.float32)
        bias = rng.uniform(-bound, bound, k).astype(np.float32)
        zeros = (np.zeros_like(weight), np.zeros_like(bias))
        state = replace(state, features=features, targets=np.array([ex.label for ex in pool]),
                        weight=weight, bias=bias, m=zeros, v=zeros)
        evaluated = ()
        if self.keep_original:
            (score,) = score_prompts(task, [state.prompt], fixed_dev(task, self.n_eval), scorer)
            state = replace(state, best_words=tuple(task.verbalizer), best_dev=score)
            words = "/".join(w.strip() for w in task.verbalizer)
            evaluated = (Evaluated(f"labels: {words}", score, self._n_dev(task), "original labels"),)
        return state, Report(self._metrics(state), evaluated)

    def _train(self, state: LabelSearchState, rng: np.random.Generator) -> LabelSearchState:
        """``epochs_per_step`` epochs of minibatch Adam on the probe's cross-entropy."""
        params, m, v, t = (state.weight, state.bias), state.m, state.v, state.t
        losses, hits = [], []
        n = len(state.targets)
        for _ in range(self.epochs_per_step):
            order = rng.permutation(n)
            for s in range(0, n, self.batch_size):
                idx = order[s : s + self.batch_size]
                loss, grads, right = probe_grads(*params, state.features[idx], state.targets[idx])
                t += 1
                params, m, v = adam(params, grads, m, v, t, self)
                losses.append(loss * len(idx))
                hits.append(right)
        epochs = state.epoch + self.epochs_per_step
        return replace(state, weight=params[0], bias=params[1], m=m, v=v, t=t, epoch=epochs,
                       loss=float(np.sum(losses) / (n * self.epochs_per_step)),
                       train_acc=float(np.sum(hits) / (n * self.epochs_per_step)))

    def _word_of(self, scorer: LM) -> Callable[[int], str]:
        """A token's label continuation (``" word"``), or ``""`` when the filters refuse it."""
        from methods.autoprompt import is_special, is_word_start  # one set of token filters for both searches

        def word_of(v: int) -> str:
            text = scorer.decode([v])
            if is_special(text) or (self.filter_words and not is_word_start(v, text, scorer)):
                return ""
            return " " + text.strip()

        return word_of

    def _n_dev(self, task: Task) -> int:
        return len(fixed_dev(task, self.n_eval))

    def _metrics(self, state: LabelSearchState) -> dict[str, float]:
        return {"dev_score": state.best_dev, "probe_loss": state.loss, "probe_train_acc": state.train_acc,
                "epoch": float(state.epoch)}

    def best(self, state: LabelSearchState) -> Prompt:
        return state.prompt

    def task_for(self, state: LabelSearchState, task: Task) -> Task:
        """``task`` with the best label words found (itself until a word set has been scored)."""
        return relabel(task, state.best_words) if state.best_words else task

    def done(self, state: LabelSearchState) -> bool:
        return state.epoch >= self.epochs

    def planned_steps(self) -> int:
        return 1 + -(-self.epochs // self.epochs_per_step)


def probe_grads(weight: np.ndarray, bias: np.ndarray, x: np.ndarray, y: np.ndarray):
    """Mean cross-entropy of a linear probe on ``x`` ``[n, d]`` with labels ``y``, its gradients,
    and how many it gets right: ``(loss, (d_weight, d_bias), n_right)``."""
    logits = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    rows = np.arange(len(y))
    delta = np.exp(logp)
    delta[rows, y] -= 1.0
    delta /= len(y)
    grads = ((delta.T @ x).astype(np.float32), delta.sum(axis=0).astype(np.float32))
    return float(-logp[rows, y].mean()), grads, int(np.sum(logits.argmax(axis=1) == y))


def word_scores(weight: np.ndarray, output_embeddings: np.ndarray) -> np.ndarray:
    """``[classes, vocab]``: each word's class distribution with its output embedding as the state
    (softmax over classes, as the reference takes it; the bias is left out, as there)."""
    logits = weight.astype(np.float32) @ np.asarray(output_embeddings, dtype=np.float32).T
    logits = logits - logits.max(axis=0, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=0, keepdims=True)


def pick_words(scores: np.ndarray, word_of: Callable[[int], str], max_checks: int) -> tuple[str, ...]:
    """One label word per class: the continuation ``word_of`` gives for its highest-scoring token
    (``""`` for a token the filters refuse) that no class before it took, classes in order.

    Raises:
        ValueError: a class has no allowed token among its ``max_checks`` best.
    """
    words: list[str] = []
    for c, row in enumerate(scores):
        ranked = np.argsort(-row, kind="stable")[:max_checks]
        word = next((w for w in map(word_of, map(int, ranked)) if w and w.strip() not in {x.strip() for x in words}), None)
        if word is None:
            raise ValueError(f"no allowed label word for class {c} among its {max_checks} best tokens")
        words.append(word)
    return tuple(words)


def relabel(task: Task, words: Sequence[str]) -> Task:
    """``task`` with ``words`` as its verbalizer (validated like any task's label words)."""
    return replace(task, verbalizer=tuple(words))
