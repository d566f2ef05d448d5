"""Intent-based prompt calibration (Levi et al. 2024): refine a prompt on synthetic boundary cases.

Each step (after the first, which scores the seed instruction):

1. The proposer writes ``n_synthetic`` challenging inputs, each for a *chosen* target label:
   real train examples are shown answer-first ("Answer: X / Input: ...") and the context
   ends with "Answer: <target>\nInput:", so the label is the condition, never a guess made
   by the prompt under test.
2. They join a calibration set together with ``n_real`` fixed train examples.
3. The current best instruction is run on the calibration set; its errors, with the history
   of instructions and scores, go into a refinement meta-prompt.
4. The refinements are scored on a fixed dev subset; the best instruction so far is current.

Simplified from the paper: labels come from the target-label conditioning instead of a human
or LLM annotator, and the error analysis is shown to the refiner directly rather than
summarized by a separate LLM call. Synthetic inputs are only written for single-field tasks
scored with the task's verbalizer; otherwise (multi-field, multiple-choice and generative
tasks, where there is no label to condition on) the calibration set is the real examples alone.
Per step: two generate calls and two scorer calls.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import score_prompts, subsample
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev, predict_many
from methods.text import clean_candidates
from tasks.core import Example, Task
from tasks.generative import is_generative

SYNTHETIC_TEMPLATE = (
    "Task instruction: {instruction}\n\n"
    "Below are inputs for this task, each after its correct answer. Write new inputs that are "
    "challenging boundary cases for the instruction: hard, ambiguous-looking or unusual, yet "
    "with the given answer clearly correct.\n\n{shots}\n\nAnswer: {target}\nInput:"
)
REFINE_TEMPLATE = (
    "We are improving the instruction of a classification task. Below are earlier instructions "
    "with their scores (0-100), in ascending order of score.\n\n{history}\n\n"
    "The current instruction is: {current}\n"
    "It gets these examples wrong, some of them hard boundary cases:\n\n{errors}\n\n"
    "Write a new instruction that handles such cases correctly and scores higher than all "
    "earlier ones.\nNew instruction:"
)
_NO_FEWSHOT = ("shots", "header")
# A refinement that starts like a line of the meta-prompt's own error list is an echo.
_ECHO = re.compile(r"^\s*(?:input|correct answer|predicted answer|answer|score)\s*:", re.IGNORECASE)


@dataclass(frozen=True)
class CalibrationState:
    """History of (instruction, dev score), the calibration set, and counters.

    ``real`` holds train indices; ``synthetic`` holds (input text, target label) pairs.
    """

    scored: tuple[tuple[str, float], ...] = ()
    real: tuple[int, ...] = ()
    synthetic: tuple[tuple[str, int], ...] = ()
    step: int = 0
    proposed: int = 0
    usable: int = 0
    synthesized: int = 0


def input_field(task: Task) -> str | None:
    """The one text field synthetic inputs can fill, or ``None`` for multi-field/choice tasks."""
    fields = [f for f in task.fields if f not in _NO_FEWSHOT]
    if is_generative(task) or len(fields) != 1 or any(ex.choices is not None for ex in task.train):
        return None
    return fields[0]


def clean_input(raw: str, max_words: int = 80) -> str:
    """The first non-empty line of a synthetic input, or '' when too short or runaway."""
    line = next((ln.strip() for ln in raw.splitlines() if ln.strip()), "")
    return line if 2 <= len(line.split()) <= max_words else ""


@dataclass(frozen=True)
class Calibration:
    """Intent-based prompt calibration with label-conditioned synthetic boundary cases.

    Args:
        n_real: train examples in the calibration set (fixed at the first step).
        n_synthetic: boundary cases asked per step.
        max_synthetic: synthetic cases kept (the most recent).
        n_shots: real examples shown per synthetic-input context.
        n_errors: errors shown per refinement context.
        n_proposals: refined instructions asked per step.
        history_k: best past instructions shown to the refiner.
        n_eval: dev examples each instruction is scored on (0 = whole dev split).
        temperature: proposer temperature.
        max_new_tokens: length cap of an input or an instruction.
    """

    n_real: int = 8
    n_synthetic: int = 4
    max_synthetic: int = 16
    n_shots: int = 3
    n_errors: int = 4
    n_proposals: int = 4
    history_k: int = 5
    n_eval: int = 32
    temperature: float = 0.9
    max_new_tokens: int = 48

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> CalibrationState:
        return CalibrationState()

    def step(
        self, state: CalibrationState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator
    ):
        if not state.scored:
            return self._start(task, scorer, rng)
        synthetic = self._synthesize(state, task, proposer, rng)
        state = replace(state, synthetic=(state.synthetic + synthetic)[-self.max_synthetic :])
        errors = self._errors(state, task, scorer)
        proposals, banned = self._refine(state, errors, task, proposer, rng)
        fresh = clean_candidates(proposals, banned, [t for t, _ in state.scored])
        scored, evaluated = self._score(fresh, task, scorer, "refinement")
        new = replace(
            state, scored=state.scored + scored, step=state.step + 1,
            proposed=state.proposed + len(proposals), usable=state.usable + len(fresh),
            synthesized=state.synthesized + len(synthetic),
        )
        return new, Report(self._metrics(new, len(errors)), evaluated)

    def _start(self, task: Task, scorer: LM, rng: np.random.Generator):
        """Score the seed instruction and fix the real part of the calibration set."""
        picked = rng.choice(len(task.train), min(self.n_real, len(task.train)), replace=False)
        scored, evaluated = self._score([task.instruction], task, scorer, "seed")
        new = CalibrationState(scored=scored, real=tuple(sorted(picked.tolist())), step=1)
        return new, Report(self._metrics(new, 0), evaluated)

    def current(self, state: CalibrationState) -> str:
        return max(state.scored, key=lambda p: p[1])[0]

    def calibration_set(self, state: CalibrationState, task: Task) -> list[Example]:
        """The real examples followed by the synthetic ones."""
        field = input_field(task)
        real = [task.train[i] for i in state.real]
        synthetic = [Example({field: text}, label) for text, label in state.synthetic] if field else []
        return real + synthetic

    def _synthesize(self, state: CalibrationState, task: Task, proposer: LM, rng: np.random.Generator):
        """Label-conditioned boundary cases (one generate call); targets cycle through the labels."""
        field = input_field(task)
        if field is None or self.n_synthetic < 1:
            return ()
        offset = state.synthesized
        targets = [(offset + j) % len(task.verbalizer) for j in range(self.n_synthetic)]
        shots = [subsample(task.train, self.n_shots, rng) for _ in targets]
        current = self.current(state)
        contexts = [self._synthetic_context(task, field, current, s, y) for s, y in zip(shots, targets)]
        outs = proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=int(rng.integers(2**31)), stop=("\n\n", "\nAnswer:"),
        )
        known = {ex.inputs[field].lower() for ex in task.train} | {t.lower() for t, _ in state.synthetic}
        made = []
        for out, y in zip(outs, targets):
            text = clean_input(out[0])
            if text and text.lower() not in known:
                known.add(text.lower())
                made.append((text, y))
        return tuple(made)

    def _synthetic_context(self, task: Task, field: str, instruction: str, shots, target: int) -> str:
        verbal = [v.strip() for v in task.verbalizer]
        blocks = [f"Answer: {verbal[ex.label]}\nInput: {ex.inputs[field]}" for ex in shots]
        return SYNTHETIC_TEMPLATE.format(
            instruction=instruction, shots="\n\n".join(blocks), target=verbal[target]
        )

    def _errors(self, state: CalibrationState, task: Task, scorer: LM) -> list[tuple[Example, int]]:
        """Every calibration example the current instruction gets wrong (one scorer call)."""
        examples = self.calibration_set(state, task)
        (preds,) = predict_many(task, [self.current(state)], examples, scorer)
        return [(ex, p) for ex, p in zip(examples, preds) if not task.is_correct(p, ex)]

    def _refine(
        self, state: CalibrationState, errors, task: Task, proposer: LM, rng: np.random.Generator
    ):
        """Refinements from the history and each context's own draw of errors (one generate call)."""
        top = sorted(state.scored, key=lambda p: p[1])[-self.history_k :]
        history = "\n\n".join(f"Instruction: {t}\nScore: {round(100 * s)}" for t, s in top)
        contexts, banned = [], []
        for _ in range(self.n_proposals):
            shown = [errors[i] for i in sorted(rng.permutation(len(errors))[: self.n_errors])]
            banned += [" ".join(ex.inputs.values()) for ex, _ in shown]
            contexts.append(REFINE_TEMPLATE.format(
                history=history, current=self.current(state), errors=self._error_text(task, shown)
            ))
        outs = proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=int(rng.integers(2**31)), stop=("\n\n",),
        )
        return ["" if _ECHO.match(o[0].strip()) else o[0] for o in outs], banned

    def _error_text(self, task: Task, errors: Sequence[tuple[Example, int]]) -> str:
        if not errors:
            return "(none found: make the instruction robust to unusual inputs)"
        lines = []
        for ex, pred in errors:
            text = " ".join(ex.inputs[f] for f in task.fields if f not in _NO_FEWSHOT)
            lines.append(f"Input: {text}\nCorrect answer: {task.answer_text(ex)}\n"
                         f"Predicted answer: {task.shown(pred, ex)}")
        return "\n\n".join(lines)

    def _score(self, texts: Sequence[str], task: Task, scorer: LM, kind: str):
        dev = fixed_dev(task, self.n_eval)
        scores = score_prompts(task, [TextPrompt(t) for t in texts], dev, scorer)
        evaluated = tuple(Evaluated(t, s, len(dev), kind) for t, s in zip(texts, scores))
        return tuple(zip(texts, scores)), evaluated

    def _metrics(self, state: CalibrationState, n_errors: int) -> dict[str, float]:
        scores = [s for _, s in state.scored]
        return {
            "dev_score": max(scores),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "synthetic": float(len(state.synthetic)),
            "synthesized": float(state.synthesized),
            "calibration_errors": float(n_errors),
            "population_mean": float(np.mean(sorted(scores)[-self.history_k :])),
        }

    def best(self, state: CalibrationState) -> TextPrompt:
        if not state.scored:
            raise ValueError("Calibration has scored nothing yet; run at least one step")
        return TextPrompt(self.current(state))

    def snapshot(self, state: CalibrationState) -> Snapshot:
        return Snapshot(population=ranked(state.scored))

    def done(self, state: CalibrationState) -> bool:
        return False
