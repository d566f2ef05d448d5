"""The step-shaped optimizer protocol.

A method never loops to convergence by itself: the trial (or a test) calls ``step``
repeatedly, so the pipeline can report, checkpoint, early-stop and resume between steps.
State is a small frozen, picklable dataclass: it *is* the checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import numpy as np

from methods.lm import LM, Needs, Prompt
from tasks.core import Task

State = TypeVar("State")


@dataclass(frozen=True)
class Evaluated:
    """One candidate prompt scored on (part of) the dev data: a row of the run's evaluation log.

    Attributes:
        prompt: human-readable prompt (instruction text, trigger text, or soft-prompt summary).
        score: the task metric on ``n`` dev examples.
        n: examples it was scored on (racing scores some candidates on fewer).
        kind: free-form role, e.g. "candidate", "offspring", "edit".
        parent: the prompt this one was written from (a mutation's or edit's source, the
            prompt a proposer was shown as the one to improve); empty for a seed or a prompt
            written from demonstrations alone. What ``pipelines.distill`` pairs children with.
        examples: :func:`tasks.core.example_key` of each example it was scored on, and
        outcomes: its score on each (1/0 on a label task, the metric on a generative one),
            in the same order. Both empty where a method does not record them; a parent and
            child are compared on the examples both were scored on.
    """

    prompt: str
    score: float
    n: int
    kind: str = "candidate"
    parent: str = ""
    examples: tuple[str, ...] = ()
    outcomes: tuple[float, ...] = ()


@dataclass(frozen=True)
class Report:
    """What one step tells the pipeline: scalar metrics plus every candidate it scored.

    ``metrics`` always holds ``dev_score`` (best-so-far dev metric) so every method can be
    compared, reported and early-stopped on the same key.
    """

    metrics: Mapping[str, float]
    evaluated: tuple[Evaluated, ...] = field(default=())


@dataclass(frozen=True)
class Snapshot:
    """What a method holds after a step, for people watching a sweep; the search never reads it.

    Attributes:
        current: where the search is now, when that differs from :meth:`Method.best`
            (AutoPrompt's current triggers, a soft prompt's current vectors).
        population: the candidates the method keeps, ``(text, dev score)``, best first
            (EvoPrompt's population, ProTeGi's beam, OPRO's trajectory).
    """

    current: Prompt | None = None
    population: tuple[tuple[str, float], ...] = ()


class Watchable(Protocol[State]):
    """Optional: a method that can show its current search state (see :class:`Snapshot`)."""

    def snapshot(self, state: State) -> Snapshot:
        ...


class Planned(Protocol):
    """Optional: a method that knows how many steps it takes (``manual``: 1; APE: its rounds + 1).

    Only the progress view reads it, to estimate the time left of a trial that is not bounded
    by a budget.
    """

    def planned_steps(self) -> int:
        ...


class Relabels(Protocol[State]):
    """Optional: a method that also chooses the task's label words (AutoPrompt's label search).

    Its best prompt is meant to be read with them: the pipeline scores it on test with
    ``task_for(state, task)`` instead of ``task``.
    """

    def task_for(self, state: State, task: Task) -> Task:
        ...


def final_task(method, state, task: Task) -> Task:
    """The task ``method``'s best prompt is scored with: ``task``, relabeled if the method chose label words."""
    return method.task_for(state, task) if hasattr(method, "task_for") else task


def ranked(scored, limit: int = 0) -> tuple[tuple[str, float], ...]:
    """``(text, score)`` pairs best first (a stable sort: earlier first on a tie), at most ``limit`` (0: all)."""
    out = tuple(sorted(((str(t), float(s)) for t, s, *_ in scored), key=lambda p: -p[1]))
    return out[:limit] if limit else out


class Method(Protocol, Generic[State]):
    """A prompt optimizer. Implementations are plain classes built from flat typed arguments."""

    def needs(self) -> Needs:
        """The optional LM capabilities this configuration calls, per role (checked before a sweep)."""
        ...

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> State:
        """The starting state (may already score the seed prompt)."""
        ...

    def step(
        self, state: State, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator
    ) -> tuple[State, Report]:
        """One unit of search: returns the next state and what it measured."""
        ...

    def best(self, state: State) -> Prompt:
        """The best prompt found so far (what the pipeline scores on test)."""
        ...

    def done(self, state: State) -> bool:
        """True when the method has nothing more to do (the pipeline also caps steps)."""
        ...
