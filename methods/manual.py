"""``manual`` and ``empty``: the baselines every method is compared to.

``manual`` scores a hand-written instruction (the task's own by default). ``empty`` scores
the same template with nothing in the instruction slot: with small models that is often
the stronger baseline, and a method that beats ``manual`` but not ``empty`` has only undone
a bad instruction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report
from methods.evaluate import scored_prompts, subsample
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
        no_instruction: score the template with an empty slot instead (the ``empty`` baseline).
    """

    instruction: str = ""
    n_eval: int = 0
    no_instruction: bool = False

    def __post_init__(self) -> None:
        if self.no_instruction and self.instruction:
            raise ValueError("manual: no_instruction=true leaves the slot empty; drop instruction="
                             f"{self.instruction!r} or set no_instruction=false")

    def needs(self) -> Needs:
        return Needs()

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> ManualState:
        return ManualState(instruction="" if self.no_instruction else self.instruction or task.instruction)

    def step(self, state: ManualState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        dev = subsample(task.dev, self.n_eval, rng)
        ((score, seen),) = scored_prompts(task, [TextPrompt(state.instruction)], dev, scorer)
        report = Report({"dev_score": score}, (Evaluated(state.instruction, score, len(dev), "manual", **seen),))
        return replace(state, dev_score=score), report

    def best(self, state: ManualState) -> TextPrompt:
        return TextPrompt(state.instruction)

    def planned_steps(self) -> int:
        return 1

    def done(self, state: ManualState) -> bool:
        return state.dev_score is not None
