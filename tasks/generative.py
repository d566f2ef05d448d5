"""Generative tasks: the model writes its answer, an extractor reads it, a metric scores it.

Beside :class:`tasks.core.Task` (scored by label log-likelihood) this is the second task kind.
Both offer the same small surface to methods (``render``, ``score``, ``is_correct``,
``answer_text``, ``shown``, ``fields``, the splits), so a text method never asks which
kind it optimizes; only :mod:`methods.evaluate` does, to choose between scoring
continuations and generating.

Nothing here knows about models, Ray or configs.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from tasks import answers
from tasks.core import TaskError, check_inputs, template_fields


@dataclass(frozen=True)
class GenExample:
    """One example whose answer is written, not chosen.

    Attributes:
        inputs: template fields, e.g. ``{"question": "..."}``.
        answers: every acceptable gold answer (a translation task lists several); the first is
            the one shown in demonstrations.
        target: the text a gradient method teacher-forces after the prompt (a worked solution
            for chain-of-thought tasks); empty means ``answers[0]``.
        group: a sub-population to report separately (a BBH task in a mixture); empty for none.
    """

    inputs: Mapping[str, str]
    answers: tuple[str, ...]
    target: str = ""
    group: str = ""


@dataclass(frozen=True)
class AnswerMetric:
    """How one output is judged: read the answer out, then compare it with each gold answer.

    Attributes:
        extract: output -> answer (``None`` when there is none: a wrong answer, not an error).
        compare: (answer, gold) -> score in [0, 1]; the example scores the best over its golds.
        source: where the rule comes from, for the report.
    """

    extract: Callable[[str], str | None]
    compare: Callable[[str | None, str], float]
    source: str


def _whole(output: str) -> str:
    return output


ANSWER_METRICS: Mapping[str, AnswerMetric] = {
    "gsm8k": AnswerMetric(answers.last_number, answers.numeric_match, "GSM8K: last number, or the one after 'the answer is'"),
    "bbh": AnswerMetric(answers.after_answer_is, answers.exact_match, "BBH: exact match after 'the answer is'"),
    "ii_em": AnswerMetric(_whole, answers.ape_em, "APE instruction induction: exact match"),
    "ii_f1": AnswerMetric(_whole, answers.ape_f1, "APE instruction induction: token F1"),
    "ii_set": AnswerMetric(_whole, answers.ape_set, "APE instruction induction: exact word set"),
    "ii_contains": AnswerMetric(_whole, answers.ape_contains, "APE instruction induction: contains"),
    "exact_match": AnswerMetric(answers.after_answer_is, answers.exact_match, "exact match of the first line"),
    "contains": AnswerMetric(_whole, answers.contains, "gold occurs in the output"),
    "f1": AnswerMetric(answers.after_answer_is, answers.token_f1, "SQuAD token F1 of the first line"),
    "numeric": AnswerMetric(answers.last_number, answers.numeric_match, "last number, by value"),
}

# A multi-line output shown in a report or to a proposer is cut to this many characters.
SHOWN_CHARS = 400


@dataclass(frozen=True)
class GenTask:
    """A task whose answers the model generates, greedily, then an extractor and metric judge.

    Attributes:
        name: short id used in results, e.g. ``"gsm8k"``.
        template: ``str.format`` template; ``{instruction}`` is the optimized slot, wherever it
            sits (before the question, after it, or opening the answer: "A: {instruction}").
        instruction: the hand-written baseline.
        train, dev, test: splits, as for :class:`tasks.core.Task`.
        metric: name in :data:`ANSWER_METRICS`.
        max_new_tokens: generation cap per answer.
        stop: strings that end an answer (cut before the first one).
    """

    kind: ClassVar[str] = "generate"

    name: str
    template: str
    instruction: str
    train: tuple[GenExample, ...]
    dev: tuple[GenExample, ...]
    test: tuple[GenExample, ...]
    metric: str = "exact_match"
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n\n",)
    fields: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        fields = template_fields(self.name, self.template, self.metric, ANSWER_METRICS)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise TaskError(f"task {self.name!r}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "fields", fields)
        for split_name in ("train", "dev", "test"):
            for i, ex in enumerate(getattr(self, split_name)):
                check_inputs(self, split_name, i, ex)
                if not ex.answers or not all(isinstance(a, str) and a.strip() for a in ex.answers):
                    raise TaskError(f"task {self.name!r}: {split_name}[{i}] has no non-empty gold answer")

    # ---------------------------------------------------------------- what methods use

    def render(self, instruction: str, example: GenExample) -> str:
        """The prompt for ``example`` with ``instruction`` in the slot.

        An empty instruction leaves no stray whitespace: no leading blank line, no blank line
        where it had a line of its own, no space after an ``A:`` it would have opened.
        """
        text = self.template.format(instruction=instruction, **example.inputs)
        if instruction:
            return text
        return re.sub(r"\n{3,}", "\n\n", text).lstrip().rstrip(" ")

    def extract(self, output: str) -> str | None:
        """The answer in ``output`` (``None``: it gave none)."""
        try:
            return ANSWER_METRICS[self.metric].extract(output)
        except Exception:  # noqa: BLE001 - a malformed output is a wrong answer, never a crash
            return None

    def example_score(self, output: str, example: GenExample) -> float:
        """The metric of one output: the best over the example's gold answers."""
        metric, answer = ANSWER_METRICS[self.metric], self.extract(output)
        return max(float(metric.compare(answer, gold)) for gold in example.answers)

    def score(self, outputs: Sequence[str], examples: Sequence[GenExample]) -> float:
        """Mean metric of ``outputs`` against ``examples`` (0.0 for an empty split)."""
        if len(outputs) != len(examples):
            raise TaskError(f"{len(outputs)} outputs for {len(examples)} examples")
        return float(np.mean([self.example_score(o, ex) for o, ex in zip(outputs, examples)])) if examples else 0.0

    def is_correct(self, output: str, example: GenExample) -> bool:
        """Full marks (an F1 below 1 counts as an error worth showing a proposer)."""
        return self.example_score(output, example) >= 1.0

    def answer_text(self, example: GenExample) -> str:
        """The gold answer demonstrations show."""
        return example.answers[0]

    def target_text(self, example: GenExample) -> str:
        """What a gradient method teacher-forces after the prompt: the worked solution or the answer,
        after a space (templates end at "A:" or "Output:")."""
        return " " + (example.target or example.answers[0]).lstrip()

    def shown(self, output: str, example: GenExample) -> str:
        """An output as a report or a proposer sees it: trimmed, long ones cut."""
        text = output.strip()
        return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


def is_generative(task) -> bool:
    """Whether ``task`` is scored on written answers (else on label log-likelihood)."""
    return getattr(task, "kind", "label") == "generate"


# ------------------------------------------------------------------------- templates

POSITIONS = ("before", "after", "answer")


def qa_template(position: str, question: str = "question", shots: bool = False) -> str:
    """A ``Q:``/``A:`` template with the instruction where OPRO places it.

    Args:
        position: ``before`` the question (OPRO's "Q_begin"), ``after`` it ("Q_end"), or opening
            the ``answer`` ("A_begin", e.g. "A: Let's think step by step.").
        question: the input field's name.
        shots: start with a ``{shots}`` field (few-shot demonstrations, shared by every example,
            so a backend runs them once per batch).
    """
    if position not in POSITIONS:
        raise TaskError(f"unknown instruction position {position!r}; expected one of {list(POSITIONS)}")
    head = "{shots}" if shots else ""
    q = f"Q: {{{question}}}"
    if position == "before":
        return f"{{instruction}}\n\n{head}{q}\nA:"
    if position == "after":
        return f"{head}{q}\n{{instruction}}\nA:"
    return f"{head}{q}\nA: {{instruction}}"

