"""Evaluation helpers shared by the LLM-driven search methods: batched predictions and racing.

Racing spends a fixed budget of *pulls* (one pull = one candidate scored on one small random
dev minibatch) to find the best few of many candidates without scoring all of them on the
full dev set. Both races here batch every pull of a round into one scorer call: the caller
passes a ``pull`` function that scores a list of arms on one fresh minibatch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from methods import evaluate
from methods.evaluate import score_prompts, subsample
from methods.lm import LM, TextPrompt
from tasks.core import Example, Task
from tasks.generative import is_generative

# ``pull(arms, reps)`` -> the score of each arm on one fresh minibatch of ``reps`` pulls' worth
# of examples, all arms in one scorer call.
Pull = Callable[[Sequence[int], int], Sequence[float]]


def fixed_dev(task: Task, n_eval: int) -> tuple[Example, ...]:
    """The dev subset every candidate of a run is scored on.

    Drawn with its own fixed seed (not the method's rng) so scores stay comparable across
    steps and across a resumed run.
    """
    return subsample(task.dev, n_eval, np.random.default_rng(0))


def predict_many(task, instructions: Sequence[str], examples: Sequence, scorer: LM) -> list[np.ndarray]:
    """Every instruction's predictions on every example, in one scorer call.

    Returns:
        one array ``[len(examples)]`` per instruction: label ids (int64), or a generative
        task's outputs (object).
    """
    rows = evaluate.predict_many(task, [TextPrompt(t) for t in instructions], examples, scorer)
    return [np.array(row, dtype=prediction_dtype(task)) for row in rows]


def prediction_dtype(task) -> type:
    """Label ids are int64; a generative task's predictions are its output strings."""
    return object if is_generative(task) else np.int64


@dataclass(frozen=True)
class Race:
    """Outcome of a race over ``n`` arms.

    Attributes:
        means: mean minibatch score per arm (``-inf`` for an arm never pulled), ``[n]``.
        counts: pulls per arm, ``[n]``.
        pulls: total pulls spent (never more than the budget).
        rounds: scorer calls made.
    """

    means: tuple[float, ...]
    counts: tuple[int, ...]
    pulls: int
    rounds: int

    def top(self, k: int) -> list[int]:
        """Indices of the ``k`` arms with the highest mean (ties: more pulls, then lower index)."""
        order = sorted(range(len(self.means)), key=lambda i: (-self.means[i], -self.counts[i], i))
        return order[:k]


class _Tally:
    """Running sums of a race (local to one race call, never stored in a state)."""

    def __init__(self, n: int) -> None:
        self.sums, self.counts, self.pulls, self.rounds = np.zeros(n), np.zeros(n, dtype=np.int64), 0, 0

    def add(self, arms: Sequence[int], scores: Sequence[float], reps: int) -> None:
        for a, s in zip(arms, scores):
            self.sums[a] += s * reps
            self.counts[a] += reps
        self.pulls += len(arms) * reps
        self.rounds += 1

    def means(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.counts > 0, self.sums / np.maximum(self.counts, 1), -np.inf)

    def result(self) -> Race:
        means, counts = tuple(float(m) for m in self.means()), tuple(int(c) for c in self.counts)
        return Race(means, counts, self.pulls, self.rounds)


def ucb_race(
    n_arms: int, pull: Pull, budget: int, per_round: int, rng: np.random.Generator, c: float = 1.0
) -> Race:
    """UCB1 best-arm identification (ProTeGi's Algorithm 2), batched.

    Round one pulls every arm once (a random subset if the budget is smaller); each later
    round pulls the ``per_round`` arms with the highest ``mean + c * sqrt(ln t / n_i)``, where
    ``t`` is the pulls spent so far, until ``budget`` pulls are spent.
    """
    tally = _Tally(n_arms)
    if budget >= n_arms:
        first = list(range(n_arms))
    else:  # too small a budget to try every arm: a random subset, the rest stay unpulled
        first = sorted(rng.choice(n_arms, budget, replace=False).tolist())
    if first:
        tally.add(first, pull(first, 1), 1)
    while tally.pulls < budget:
        k = min(per_round, budget - tally.pulls, n_arms)
        bonus = c * np.sqrt(math.log(max(tally.pulls, 2)) / np.maximum(tally.counts, 1))
        ucb = np.where(tally.counts > 0, tally.means() + bonus, np.inf)
        arms = sorted(np.argsort(-ucb, kind="stable")[:k].tolist())
        tally.add(arms, pull(arms, 1), 1)
    return tally.result()


def successive_rejects(n_arms: int, pull: Pull, budget: int, keep: int) -> Race:
    """Successive Rejects (Audibert & Bubeck 2010; ProTeGi's Algorithm 3) down to ``keep`` arms.

    Phase ``k`` tops every surviving arm up to ``n_k`` pulls, with
    ``n_k = ceil((budget - K) / (logbar(K) * (K + 1 - k)))``, in one scorer call, then rejects
    the arm with the lowest mean. Arms still alive at the end have the most pulls.
    """
    tally, alive = _Tally(n_arms), list(range(n_arms))
    logbar = 0.5 + sum(1.0 / i for i in range(2, n_arms + 1))
    done_per_arm = 0
    for k in range(1, n_arms - keep + 1):
        target = max(1, math.ceil((budget - n_arms) / (logbar * (n_arms + 1 - k))))
        reps = min(target - done_per_arm, (budget - tally.pulls) // len(alive))
        if reps > 0:
            tally.add(alive, pull(alive, reps), reps)
            done_per_arm += reps
        means = tally.means()
        alive.remove(min(alive, key=lambda a: (means[a], -a)))
    return tally.result()


@dataclass(frozen=True)
class Halving:
    """Outcome of :func:`successive_halving`.

    Attributes:
        scores: each arm's metric on the examples it was scored on, ``[n]``.
        seen: how many examples (a prefix of the dev subset) each arm was scored on, ``[n]``.
        calls: scorer calls made (one per rung).
        outcomes: each arm's per-example score on those examples (``evaluate.example_scores``),
            so a log can say what each arm got right without running it again.
    """

    scores: tuple[float, ...]
    seen: tuple[int, ...]
    calls: int
    outcomes: tuple[tuple[float, ...], ...] = ()

    def finalists(self) -> list[int]:
        """Arms scored on every example: the only scores comparable with each other."""
        full = max(self.seen, default=0)
        return [i for i, n in enumerate(self.seen) if n == full]


def successive_halving(
    task: Task, texts: Sequence[str], dev: Sequence[Example], scorer: LM, min_examples: int, eta: int = 2
) -> Halving:
    """Score instructions on growing prefixes of ``dev``, keeping the best ``1/eta`` at each rung.

    Rung ``r`` scores the survivors on ``dev[:min_examples * eta**r]`` (only the examples
    new to the rung are run: predictions are kept), so a weak candidate is dropped after a
    fraction of the dev set and the finalists end with scores on all of it. With ``n`` arms
    this runs about ``n * min_examples * log_eta(len(dev) / min_examples)`` examples instead
    of ``n * len(dev)``. One scorer call per rung.
    """
    if min_examples < 1 or eta < 2:
        raise ValueError(f"successive halving needs min_examples >= 1 and eta >= 2, got {min_examples}, {eta}")
    n = len(texts)
    preds = [np.zeros(0, dtype=prediction_dtype(task)) for _ in range(n)]
    alive, done, calls = list(range(n)), 0, 0
    while alive and done < len(dev):
        # a lone survivor has nothing left to race: it goes straight to the full subset
        upto = len(dev) if len(alive) == 1 else min(len(dev), min_examples * eta**calls)
        new = predict_many(task, [texts[a] for a in alive], dev[done:upto], scorer)
        for row, a in zip(new, alive):
            preds[a] = np.concatenate([preds[a], row])
        done, calls = upto, calls + 1
        if done < len(dev):
            score = {a: task.score(preds[a], dev[:done]) for a in alive}
            keep = max(1, math.ceil(len(alive) / eta))
            alive = sorted(sorted(alive, key=lambda a: (-score[a], a))[:keep])
    scores = tuple(float(task.score(p, dev[: len(p)])) if len(p) else float("-inf") for p in preds)
    outcomes = tuple(evaluate.example_scores(task, p, dev[: len(p)]) for p in preds)
    return Halving(scores, tuple(len(p) for p in preds), calls, outcomes)


def minibatch_pull(
    task: Task, arms_text: Sequence[str], pull_size: int, rng: np.random.Generator, scorer: LM
) -> Pull:
    """A :data:`Pull` that scores arms (instruction texts) on fresh random dev minibatches."""
    def pull(arms: Sequence[int], reps: int) -> list[float]:
        batch = subsample(task.dev, pull_size * reps, rng)
        return score_prompts(task, [TextPrompt(arms_text[a]) for a in arms], batch, scorer)

    return pull
