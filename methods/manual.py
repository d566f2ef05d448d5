"""``manual``: evaluate a hand-written instruction. The baseline every method is compared to."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report
from methods.evaluate import score_prompts, subsample
from methods.lm import LM, Needs, TextPrompt
from tasks.core import Task


@dataclass(frozen=True)
class ManualState:
    instruction: str
    dev_score: float | None = None


@dataclass(frozen=True)
class Manual:
    """Scores one instruction on dev; one step, then done.

    Args:
        instruction: the prompt to evaluate; empty means the task's own baseline instruction.
        n_eval: dev examples to score on (0 = the whole dev split).
    """

    instruction: str = ""
    n_eval: int = 0

    def needs(self) -> Needs:
        return Needs()

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> ManualState:
        return ManualState(instruction=self.instruction or task.instruction)

    def step(self, state: ManualState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        dev = subsample(task.dev, self.n_eval, rng)
        (score,) = score_prompts(task, [TextPrompt(state.instruction)], dev, scorer)
        report = Report({"dev_score": score}, (Evaluated(state.instruction, score, len(dev), "manual"),))
        return replace(state, dev_score=score), report

    def best(self, state: ManualState) -> TextPrompt:
        return TextPrompt(state.instruction)

    def done(self, state: ManualState) -> bool:
        return state.dev_score is not None
