"""A task is data: examples, a prompt template with an instruction slot, label words, a metric.

Nothing here knows about models, Ray or configs. Methods render prompts with
:meth:`Task.render` and read label continuations with :meth:`Task.choices`.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np


class TaskError(ValueError):
    """Bad task input: the message is one line a user can act on."""


@dataclass(frozen=True)
class Example:
    """One labelled example.

    Attributes:
        inputs: template fields, e.g. ``{"sentence": "..."}``.
        label: index into the task's verbalizer (or into ``choices``).
        choices: per-example continuations (MMLU cloze form); ``None`` means the task's verbalizer.
        group: a sub-population to report separately (an MMLU subject); empty for none.
    """

    inputs: Mapping[str, str]
    label: int
    choices: tuple[str, ...] | None = None
    group: str = ""


def example_key(example) -> str:
    """A short stable id of an example's inputs: the same sentence has the same key in every run
    and split, so logs can say which examples a prompt was scored on (and a test example is
    recognised wherever it appears)."""
    blob = json.dumps(dict(example.inputs), sort_keys=True, ensure_ascii=False)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to labels (0.0 for an empty split)."""
    if len(labels) == 0:
        return 0.0
    return float(np.mean(np.asarray(predictions) == np.asarray(labels)))


def macro_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes present in labels or predictions."""
    p, y = np.asarray(predictions), np.asarray(labels)
    scores = []
    for c in np.union1d(p, y):
        tp = np.sum((p == c) & (y == c))
        denom = np.sum(p == c) + np.sum(y == c)
        scores.append(0.0 if denom == 0 else 2.0 * tp / denom)
    return float(np.mean(scores)) if scores else 0.0


METRICS: Mapping[str, Callable[[Sequence[int], Sequence[int]], float]] = {
    "accuracy": accuracy,
    "macro_f1": macro_f1,
}


@dataclass(frozen=True)
class Task:
    """A classification or multiple-choice task scored by label log-likelihood.

    Attributes:
        name: short id used in results, e.g. ``"sst2"``.
        template: ``str.format`` template; ``{instruction}`` is the slot text methods optimize,
            the other fields come from ``Example.inputs``.
        verbalizer: label id -> continuation, e.g. ``(" negative", " positive")``.
        instruction: the hand-written baseline instruction (what ``manual`` evaluates).
        train, dev, test: splits. Methods select on ``dev`` (or ``train``); ``test`` is for
            the final report only.
        metric: name in :data:`METRICS`.
        length_normalize: divide each choice's log-likelihood by its length in characters
            before the argmax (the cloze form of multiple choice, where options differ in length).
        calibration: ``"none"``, or ``"contextual"`` (Zhao et al. 2021, "Calibrate before use"):
            each prompt's label probabilities are divided by those it gives content-free inputs
            before the argmax, in dev selection and on test alike (see :meth:`content_free_examples`).
        content_free: the content-free strings; every template field is filled with each in
            turn and their label probabilities averaged (the paper's "N/A", "" and "[MASK]").
            Every field means every one: for MMLU that blanks its subject header and shots
            too, where the paper keeps the demonstrations and blanks only the test input.
    """

    kind: ClassVar[str] = "label"

    name: str
    template: str
    verbalizer: tuple[str, ...]
    instruction: str
    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    test: tuple[Example, ...]
    metric: str = "accuracy"
    length_normalize: bool = False
    calibration: str = "none"
    content_free: tuple[str, ...] = ("N/A", "", "[MASK]")
    fields: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", template_fields(self.name, self.template, self.metric, METRICS))
        check_label_words(self.verbalizer, f"task {self.name!r}")
        for split_name in ("train", "dev", "test"):
            self._check_split(split_name, getattr(self, split_name))
        check_calibration(self)

    def calibratable(self) -> bool:
        """Contextual calibration needs one label set for all examples (not per-example options)."""
        return all(ex.choices is None for ex in self.train + self.dev + self.test)

    def content_free_examples(self) -> tuple[Example, ...]:
        """One example per content-free string, with that string in every template field."""
        return tuple(Example(inputs={f: s for f in self.fields}, label=0) for s in self.content_free)

    def _check_split(self, split_name: str, examples: Sequence[Example]) -> None:
        for i, ex in enumerate(examples):
            check_inputs(self, split_name, i, ex)
            n = len(self.choices(ex))
            if not 0 <= ex.label < n:
                raise TaskError(f"task {self.name!r}: {split_name}[{i}] label {ex.label} outside 0..{n - 1}")

    def render(self, instruction: str, example: Example) -> str:
        """The context string for ``example`` with ``instruction`` in the slot.

        An empty instruction leaves no leading blank line (templates start "{instruction}\n\n").
        """
        text = self.template.format(instruction=instruction, **example.inputs)
        return text if instruction else text.lstrip()

    def choices(self, example: Example) -> tuple[str, ...]:
        """Continuations to score for ``example``; the correct one is ``choices[label]``."""
        return example.choices if example.choices is not None else self.verbalizer

    def score(self, predictions: Sequence[int], examples: Sequence[Example]) -> float:
        """The task metric of ``predictions`` against the examples' labels."""
        return METRICS[self.metric](predictions, [ex.label for ex in examples])

    # The surface methods share with generative tasks (:class:`tasks.generative.GenTask`), where
    # a prediction is the written output instead of a label id.

    def is_correct(self, prediction: int, example: Example) -> bool:
        return int(prediction) == example.label

    def answer_text(self, example: Example) -> str:
        """The gold label word, as demonstrations show it."""
        return self.choices(example)[example.label].strip()

    def target_text(self, example: Example) -> str:
        """The continuation a gradient method teacher-forces: the gold label word as scored."""
        return self.choices(example)[example.label]

    def shown(self, prediction: int, example: Example) -> str:
        """A prediction as a report or a proposer sees it: its label word."""
        return self.choices(example)[int(prediction)].strip()

    def split(self, name: str) -> tuple[Example, ...]:
        """A split by name, with a clear error for a typo."""
        if name not in ("train", "dev", "test"):
            raise TaskError(f"unknown split {name!r}; expected train, dev or test")
        return getattr(self, name)


CALIBRATIONS = ("none", "contextual")


def check_calibration(task: Task) -> None:
    if task.calibration not in CALIBRATIONS:
        raise TaskError(f"task {task.name!r}: calibration={task.calibration!r}; expected one of {list(CALIBRATIONS)}")
    if task.calibration == "contextual" and not task.calibratable():
        raise TaskError(f"task {task.name!r}: contextual calibration needs one label set for every example; "
                        "this task's examples bring their own options (cloze form)")
    if task.calibration == "contextual" and not task.content_free:
        raise TaskError(f"task {task.name!r}: contextual calibration needs at least one content_free string")


def template_fields(name: str, template: str, metric: str, known: Mapping) -> tuple[str, ...]:
    """A task template's fields other than ``{instruction}``, in template order (demos shown to
    proposers then read like the prompt does); the slot and the metric name are checked."""
    names = list(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))
    if "instruction" not in names:
        raise TaskError(f"task {name!r}: template has no {{instruction}} slot")
    if metric not in known:
        raise TaskError(f"task {name!r}: unknown metric {metric!r}; known: {sorted(known)}")
    return tuple(n for n in names if n != "instruction")


def check_inputs(task, split_name: str, i: int, example) -> None:
    """An example must fill every field of its task's template."""
    missing = [f for f in task.fields if f not in example.inputs]
    if missing:
        raise TaskError(f"task {task.name!r}: {split_name}[{i}] lacks template field(s) {missing}")


def check_label_words(words: Sequence[str], where: str) -> None:
    """Label continuations must be non-empty and distinct: an empty one scores 0 for free, two equal
    ones can never be told apart."""
    for i, w in enumerate(words):
        if not isinstance(w, str) or not w.strip():
            raise TaskError(f"{where}: label word {i} is {w!r}; every label needs a non-empty continuation")
    if len({w.strip() for w in words}) != len(words):
        raise TaskError(f"{where}: label words {list(words)} repeat a word; each label needs its own")


def data_warnings(task: Task) -> list[str]:
    """What is wrong with a task's data but does not stop a sweep: printed once at start, kept in the summary.

    - inputs that occur in test and in train or dev (the report would reward memorized examples);
    - a label missing from dev or train (selection, or demos, never see that class).
    """
    def key(ex: Example) -> tuple:
        return tuple(sorted(ex.inputs.items()))

    out = []
    test = {key(ex) for ex in task.test}
    for name in ("train", "dev"):
        shared = sum(key(ex) in test for ex in getattr(task, name))
        if shared:
            out.append(f"task {task.name!r}: {shared} {name} example(s) have the same inputs as test examples")
    if not hasattr(task, "verbalizer"):  # a generative task: no labels to be missing
        return out
    labels = range(len(task.verbalizer))
    if all(ex.choices is None for ex in task.train + task.dev + task.test):
        for name in ("train", "dev"):
            missing = sorted(set(labels) - {ex.label for ex in getattr(task, name)})
            if missing and getattr(task, name):
                words = [task.verbalizer[i].strip() for i in missing]
                out.append(f"task {task.name!r}: no {name} example has label(s) {words}")
    return out
