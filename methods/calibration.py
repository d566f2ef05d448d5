"""Intent-based prompt calibration (Levi et al. 2024, "Intent-based Prompt Calibration: Enhancing
prompt optimization with synthetic boundary cases"; reference code Eladlev/AutoPrompt).

The method builds its own benchmark: boundary cases it writes, labelled by an annotator that
stands for the user's intent, and it ranks prompts on that benchmark, not on dev. One ``step``
is one iteration of the paper's loop (``optimization_pipeline.py`` ``step`` in the reference):

1. **Boundary cases** (one batched ``generate`` call on the proposer): each context shows the
   task's intent (its original instruction), the prompt about to be scored, the cases the last
   ``history_k`` prompts got wrong (with their predicted and correct answers) and a few real
   train examples, and asks for one new hard case whose correct answer is a given label (the
   labels cycle, the reference's "balanced classes"). Up to ``max_cases`` are kept.
   Warm-up: with ``n_real`` real train examples, the first ``warmup`` iterations score on
   them alone and write no cases; with ``n_real=0`` (the paper's zero-shot setting) cases are
   written from the first iteration and ``warmup`` only delays the patience count.
2. **Annotation**. ``annotator=llm``: one batched ``loglikelihood`` call on the proposer scores
   the task's label words for every new case under ``annotator_instruction`` (default: the
   task's original instruction, the intent), and the argmax is the case's label.
   ``annotator=file``: new cases are appended to the CSV ``annotation_file`` (columns ``id``,
   ``step``, the input fields, ``intended``, ``label``) with the label empty; each step reads
   back the labels a person typed (label words, any case; rows matched by ``id`` and text) and
   unlabelled rows wait outside the benchmark. A step with nothing labelled yet only waits.
   Each case keeps the label its writer intended and the label it was given, and
   ``annotator_changed`` counts the cases where they differ.
3. **Scoring** (one scorer call): the best prompt so far and the suggestions of the previous
   step are scored on the whole accumulated benchmark (the real warm-up examples plus every
   labelled case). The best prompt is re-scored whenever the benchmark has grown, so every
   comparison is on the same cases (an unchanged benchmark keeps its score: no call when there
   is no suggestion to score, and the last analysis stands). New prompts are also scored on the fixed dev subset
   (``n_eval``) in the same call, so the evaluation log and the report can compare methods.
   Selection follows ``select_on``: ``synthetic`` (default, the paper) ranks on the benchmark;
   ``dev`` ranks on the dev subset. ``dev_score`` in every report is the dev score of the prompt
   the method has selected, not the best dev score it has seen, so with ``select_on=synthetic``
   it can fall when the benchmark prefers a prompt that dev likes less. The evaluation log's
   best-so-far dev curve takes the maximum over every logged candidate, so it can lie above it.
4. **Error analysis and suggestion**: one ``generate`` call summarises the selected prompt's
   errors on the benchmark (the reference's analyzer: failure cases and, for labels, the
   confusion counts), then one call samples ``n_proposals`` new prompts from the history of
   prompts with their scores (the last ``history_k``, or the best ``history_k`` every third
   iteration after the warm-up, as the reference does) and that analysis. They are scored at
   the next step, on a benchmark that has grown by cases written against them.
5. **Stop**: ``done`` once the selected score has not improved by ``min_delta`` for ``patience``
   counted iterations (iterations after the warm-up), or after ``max_iterations``.

**Generative tasks** (:class:`tasks.generative.GenTask`): the ranker route. First a ranker prompt
is calibrated with the same loop on a label task built here: "Input / Output / Rating" with the
ratings ``1..ranker_scale`` as label words. Its real examples are train inputs with their gold
answer (top rating) and with another example's gold answer (rating 1); its boundary cases are
outputs the proposer writes for real inputs, meant for the top two ratings (the reference's
ranking meta-prompts), rated by the annotator. After ``ranker_steps`` iterations (or its own
patience) the generation prompt is calibrated: boundary cases are new task inputs (no labels,
as in the reference's generation config), every candidate writes its answers greedily (one
``generate`` call, dev included), the calibrated ranker rates every (input, output) pair (one
``loglikelihood`` call on the scorer) and a prompt's benchmark score is its mean rating scaled
to [0, 1]; outputs rated below ``max(2, ranker_scale - 1)`` are its errors. ``dev_score`` stays
the task's own metric on the dev subset.

Per step, label route: proposer: ``generate`` (cases), ``loglikelihood`` (annotation, ``llm``),
``generate`` (analysis, skipped when the prompt made no error or nothing changed), ``generate``
(``n_proposals`` samples of one context); scorer: one ``loglikelihood``. Generation stage: scorer ``generate`` and
``loglikelihood`` (the ratings need the outputs), no annotation.

Where it departs from the paper and the reference:

- Each case is written in its own context with its target label named (a small proposer writes
  one line reliably, not a JSON list of ten); the reference asks for a balanced list at once.
- The reference scores each prompt once, on the dataset of its iteration, and picks the best of
  that history after the warm-up; here the best prompt is re-scored on the grown benchmark and
  several suggestions may be scored per step (``n_proposals``; the reference writes one).
- Generative tasks spend their first ``ranker_steps`` steps (and budget) on the ranker; their
  ``dev_score`` is the seed instruction's until the generation phase selects another prompt.
- The annotator is the proposer LM scoring label words (or a person, through a CSV file instead
  of the reference's Argilla UI); the reference's LLM annotator generates its label in text.
  Its label scores are raw, never contextually calibrated.
- The real examples shown to the case writer come from the task's train split; the reference
  shows samples of its own growing dataset.
- Generative tasks: the ranker's first prompt comes from a fixed template around the task's
  instruction, where the reference has an LLM rephrase the generation prompt; its real
  examples are gold and mismatched gold answers, not outputs rated by people; one set of
  hyper-parameters serves both phases (the reference's generation config changes
  ``max_samples`` and ``warmup``); a written output is cut to its first line.
- Boundary cases are written for single-field tasks and for the last field of multi-field ones
  (the other fields copied from a real example); tasks whose examples bring their own options
  (cloze multiple choice) get no written cases and calibrate on the ``n_real`` real examples.
"""

from __future__ import annotations

import csv
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import (
    calibrated, content_free_log_prior, predictions, provenance, requests_for, scored_prompts, subsample,
)
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev
from methods.text import clean_candidates
from tasks.core import Example, Task
from tasks.generative import GenExample, is_generative

# Template fields that are shared scaffolding (few-shot blocks, headers), never an input to write.
SCAFFOLD = ("shots", "header", "subject")
ANNOTATORS = ("llm", "file")
SELECT_ON = ("synthetic", "dev")
LABEL, RANKER, GENERATE = "label", "ranker", "generate"

CASE_TEMPLATE = (
    "Task: {intent}\n"
    "Prompt under test: {prompt}\n\n"
    "Cases that earlier prompts got wrong, each with the prompt's answer and the correct one:\n{errors}\n\n"
    "Realistic examples of the task:\n{samples}\n\n"
    "Write one new {field} that is a hard boundary case for the prompt under test: realistic, like the "
    "examples in style and length, likely to be answered wrongly by that prompt{target}.\n{fixed}{title}:"
)
ANALYSIS_TEMPLATE = (
    "Task: {intent}\n"
    "Prompt: {prompt}\n"
    "Score on {n} challenging cases: {score}\n{confusion}"
    "Cases the prompt got wrong (the correct answers are right; the prompt is what may need to change):\n"
    "{errors}\n\n"
    "In a few sentences, group these failures and say how the prompt should change to avoid them.\nAnalysis:"
)
SUGGEST_TEMPLATE = (
    "Task: {intent}\n\n"
    "Prompts tried so far, with their scores (0-100):\n{history}\n\n"
    "Analysis of the last prompt's failures:\n{analysis}\n\n"
    "Write a new prompt for this task that differs from every prompt above, fixes the failures the "
    "analysis describes, and would score higher than all of them.{answers}\nNew prompt:"
)
RANKER_TEMPLATE = "{instruction}\n\nInput: {input}\nOutput: {output}\nRating:"
RANKER_SEED = "Rate from 1 to {k} how well the output carries out this instruction for the input: {instruction}"
NO_ERRORS = "(no errors recorded yet)"
NO_ANALYSIS = "The prompt got every case right; make it robust to harder, unusual cases."
# A suggestion that starts like a line of the meta-prompts' own lists is an echo, not a prompt.
_ECHO = re.compile(
    r"^\s*(?:input|output|prediction|correct(?: answer| rating)?|answer|rating|score|analysis)\s*:", re.IGNORECASE
)


@dataclass(frozen=True)
class Case:
    """One benchmark item: a real train example or a written boundary case.

    Attributes:
        id: the case's number in the annotation file (-1 for real examples).
        inputs: the template fields, as ``(name, value)`` pairs.
        intended: the label the writer was asked for (the gold for a real example; ``None`` for a
            generation input, which is rated, not labelled).
        label: the label the annotator gave (``None`` while a person has not labelled it).
        choices: per-example options of a real cloze example, else ``None``.
        real: a real train example (its label is the gold, never annotated).
        step: the iteration that wrote it.
    """

    id: int
    inputs: tuple[tuple[str, str], ...]
    intended: int | None
    label: int | None
    choices: tuple[str, ...] | None = None
    real: bool = False
    step: int = 0

    def value(self, name: str) -> str:
        return dict(self.inputs)[name]


@dataclass(frozen=True)
class Round:
    """One iteration's record: the selected prompt, its benchmark score, some of its errors
    (``(input, predicted, correct)``, at most ``max(n_errors, n_error_samples)`` per correct
    answer) and the analysis of them."""

    prompt: str
    score: float
    n: int
    errors: tuple[tuple[str, str, str], ...]
    analysis: str


@dataclass(frozen=True)
class Loop:
    """The state of one calibration loop (a label prompt, a ranker prompt or a generation prompt).

    Attributes:
        cases: the real warm-up examples, then every written case in order.
        best: the selected prompt ('' before the first scoring); best_score its benchmark score
            on the latest benchmark; best_dev its dev score (``None`` for the ranker, which has no
            dev split). Unknown scores are ``None``, never nan, so that states compare equal after a
            pickle round trip.
        pending: suggestions to score at the next iteration.
        tried: every prompt scored, ``(text, latest benchmark score, dev score)``, in order.
        rounds: one :class:`Round` per iteration.
        best_n, best_errors, best_note: the benchmark size ``best_score`` was measured on, every
            error of the selected prompt there (``(input, predicted, correct)``) and its confusion
            line, so an unchanged benchmark needs no re-scoring.
        step: iterations done (a step that only waits for labels is not one).
        stale: counted iterations since the selected score last improved by ``min_delta``.
        next_id: the next case id.
    """

    cases: tuple[Case, ...] = ()
    best: str = ""
    best_score: float | None = None
    best_dev: float | None = None
    pending: tuple[str, ...] = ()
    tried: tuple[tuple[str, float | None, float | None], ...] = ()
    rounds: tuple[Round, ...] = ()
    best_n: int = 0
    best_errors: tuple[tuple[str, str, str], ...] = ()
    best_note: str = ""
    step: int = 0
    stale: int = 0
    next_id: int = 0
    proposed: int = 0
    usable: int = 0


@dataclass(frozen=True)
class CalibrationState:
    """Train indices of the real examples, the main loop and, for generative tasks, the ranker's.

    ``ranking`` is True while a generative task's ranker is being calibrated (phase 1).
    """

    real: tuple[int, ...] = ()
    main: Loop = field(default_factory=Loop)
    ranker: Loop | None = None
    ranking: bool = False
    steps: int = 0


@dataclass(frozen=True)
class Stage:
    """What one loop calibrates, rebuilt from the task at every step (never stored).

    Attributes:
        kind: ``label`` (a label task's prompt), ``ranker`` or ``generate``.
        task: the task candidates are scored on (the ranker task for ``ranker``).
        intent: the task description every meta-prompt shows (the original instruction).
        seed: the first prompt.
        written: the field boundary cases write (``None``: none are written).
        pool: real examples the case writer is shown, as examples of ``task``.
        targets: the labels cases are asked for, cycled (empty for generation inputs).
        ranker: ``generate``: the calibrated ranker prompt; rank_task: the ranker's task.
    """

    kind: str
    task: object
    intent: str
    seed: str
    written: str | None
    pool: tuple
    targets: tuple[int, ...] = ()
    ranker: str = ""
    rank_task: Task | None = None

    @property
    def labelled(self) -> bool:
        return self.kind != GENERATE


def input_fields(task) -> list[str]:
    """The template fields that hold an example's own input (scaffolding left out)."""
    return [f for f in task.fields if f not in SCAFFOLD]


def written_field(task) -> str | None:
    """The field a boundary case writes: the last input field; ``None`` when cases cannot be
    written (no input field, no train example to copy, or examples with their own options)."""
    fields = input_fields(task)
    if not fields or not task.train or any(getattr(ex, "choices", None) is not None for ex in task.train):
        return None
    return fields[-1]


def ranker_seed(instruction: str, scale: int) -> str:
    """The ranker's first prompt: a fixed rating frame around the generation task's instruction."""
    return RANKER_SEED.format(k=scale, instruction=instruction)


def clean_input(raw: str, max_words: int = 80, min_words: int = 2) -> str:
    """The first non-empty line of a written case, or '' when too short or runaway."""
    line = next((ln.strip() for ln in raw.splitlines() if ln.strip()), "")
    return line if min_words <= len(line.split()) <= max_words else ""


def input_text(task, inputs) -> str:
    """An example's input as meta-prompts show it: the one value, or ``field: value`` lines."""
    fields = input_fields(task)
    if len(fields) == 1:
        return inputs[fields[0]]
    return "\n".join(f"{f}: {inputs[f]}" for f in fields)


def _label_blocks(
    task: Task, blocks: Sequence[tuple[str, Sequence[Example]]], lm: LM, calibrate: bool
) -> list[np.ndarray]:
    """Label predictions of each ``(instruction, examples)`` block, every block in one call.

    With ``calibrate``, each block also scores the task's content-free inputs under its
    instruction (contextual calibration, as :mod:`methods.evaluate` does for dev).
    """
    free = task.content_free_examples() if calibrate else ()
    requests, spans = [], []
    for text, examples in blocks:
        block = requests_for(task, TextPrompt(text), tuple(examples) + free) if examples else []
        spans.append((len(requests), len(block)))
        requests += block
    loglik = lm.loglikelihood(requests) if requests else np.zeros(0)
    out = []
    for (_, examples), (start, size) in zip(blocks, spans):
        if not examples:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        block = loglik[start : start + size]
        n_ex = sum(len(task.choices(ex)) for ex in examples)
        prior = content_free_log_prior(task, block[n_ex:]) if free else None
        out.append(predictions(task, examples, block[:n_ex], prior))
    return out


@dataclass(frozen=True)
class Calibration:
    """Intent-based prompt calibration: synthetic boundary cases, annotated, as the benchmark.

    Args:
        n_real: real train examples in the benchmark (0: the paper's zero-shot setting).
        warmup: iterations before patience counts; with ``n_real > 0`` they also score on the
            real examples alone, before any case is written.
        patience: counted iterations without an improvement of ``min_delta`` that end the run
            (0: never).
        min_delta: the improvement in the selected score that resets patience.
        max_iterations: iterations of the main loop before ``done`` (0: only the pipeline's cap).
        n_synthetic: boundary cases asked per iteration.
        max_cases: written cases kept at most (writing stops there).
        n_shots: real examples shown per case-writing context.
        n_proposals: prompts suggested per iteration.
        history_k: past prompts shown to the suggester, and past iterations whose errors the case
            writer sees.
        n_errors: errors per correct answer shown to the analyzer.
        n_error_samples: errors per correct answer and past iteration shown to the case writer.
        annotator: ``llm`` (the proposer scores the label words) or ``file`` (a person, via CSV).
        annotator_instruction: the LLM annotator's instruction ('' : the task's own instruction).
        annotation_file: the CSV a person labels (``annotator=file``); give each trial its own,
            as an absolute path.
        select_on: ``synthetic`` (the benchmark, as in the paper) or ``dev``.
        n_eval: dev examples a new prompt is scored on (0: the whole dev split).
        ranker_scale: ratings ``1..ranker_scale`` of the ranker (generative tasks).
        ranker_steps: iterations calibrating the ranker before the generation prompt.
        temperature: proposer temperature for cases and suggestions (the analysis is greedy).
        max_new_tokens: length cap of a written case or a suggested prompt.
        analysis_tokens: length cap of an error analysis.
    """

    n_real: int = 8
    warmup: int = 1
    patience: int = 3
    min_delta: float = 0.01
    max_iterations: int = 0
    n_synthetic: int = 4
    max_cases: int = 32
    n_shots: int = 3
    n_proposals: int = 4
    history_k: int = 4
    n_errors: int = 4
    n_error_samples: int = 2
    annotator: str = "llm"
    annotator_instruction: str = ""
    annotation_file: str = ""
    select_on: str = "synthetic"
    n_eval: int = 32
    ranker_scale: int = 5
    ranker_steps: int = 4
    temperature: float = 0.9
    max_new_tokens: int = 48
    analysis_tokens: int = 96

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(f"Calibration: {problem}")

    def _problem(self) -> str:
        counts = ("n_real", "patience", "max_iterations", "n_synthetic", "max_cases", "n_shots", "n_errors",
                  "n_error_samples", "n_eval")
        for name in counts:
            if getattr(self, name) < 0:
                return f"{name} must be >= 0, got {getattr(self, name)}"
        for name in ("warmup", "n_proposals", "history_k", "ranker_steps", "max_new_tokens", "analysis_tokens"):
            if getattr(self, name) < 1:
                return f"{name} must be >= 1 (the first iteration scores the seed alone), got {getattr(self, name)}"
        if self.annotator not in ANNOTATORS:
            return f"annotator must be one of {', '.join(ANNOTATORS)}, not {self.annotator!r}"
        if self.annotator == "file" and not self.annotation_file.strip():
            return "annotator=file needs annotation_file, the CSV a person labels"
        if self.select_on not in SELECT_ON:
            return f"select_on must be one of {', '.join(SELECT_ON)}, not {self.select_on!r}"
        if self.ranker_scale < 2:
            return f"ranker_scale must be >= 2, got {self.ranker_scale}"
        if not self.min_delta >= 0 or not self.temperature >= 0:
            return "min_delta and temperature must be >= 0"
        return ""

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    # ------------------------------------------------------------------ protocol

    def init(self, task, scorer: LM, proposer: LM, rng: np.random.Generator) -> CalibrationState:
        if not is_generative(task) and written_field(task) is None and self.n_real == 0:
            raise ValueError(f"Calibration: task {task.name!r} gets no written cases (its examples bring their own "
                             "options, or it has no train split to copy); set n_real > 0 to calibrate on real examples")
        picked = rng.choice(len(task.train), min(self.n_real, len(task.train)), replace=False)
        real = tuple(sorted(int(i) for i in picked))
        if is_generative(task):
            gen_cases = tuple(_real_case(task.train[i]) for i in real)
            ranker = Loop(cases=self._ranker_real(task, real))
            return CalibrationState(real=real, main=Loop(cases=gen_cases), ranker=ranker, ranking=True)
        return CalibrationState(real=real, main=Loop(cases=tuple(_real_case(task.train[i]) for i in real)))

    def step(self, state: CalibrationState, task, scorer: LM, proposer: LM, rng: np.random.Generator):
        dev = fixed_dev(task, self.n_eval)
        main, seeded = self._seed_dev(state.main, task, dev, scorer)
        if is_generative(task) and state.ranking:
            stage = self._ranker_stage(task)
            ranker, metrics, _ = self._iterate(state.ranker, stage, (), scorer, proposer, rng)
            ranking = not self._loop_done(ranker, self.ranker_steps)
            new = replace(state, main=main, ranker=ranker, ranking=ranking, steps=state.steps + 1)
            return new, Report(self._metrics(new, stage, metrics), seeded)
        stage = self._generate_stage(task, state) if is_generative(task) else self._label_stage(task)
        main, metrics, evaluated = self._iterate(main, stage, dev, scorer, proposer, rng)
        new = replace(state, main=main, steps=state.steps + 1)
        return new, Report(self._metrics(new, stage, metrics), seeded + evaluated)

    def best(self, state: CalibrationState) -> TextPrompt:
        if not state.main.best:
            raise ValueError("Calibration has scored nothing yet; run at least one step")
        return TextPrompt(state.main.best)

    def done(self, state: CalibrationState) -> bool:
        return not state.ranking and self._loop_done(state.main, self.max_iterations)

    def snapshot(self, state: CalibrationState) -> Snapshot:
        return Snapshot(population=ranked((t, _number(d)) for t, _, d in state.main.tried))

    def _loop_done(self, loop: Loop, max_iterations: int) -> bool:
        return (self.patience > 0 and loop.stale >= self.patience) or (0 < max_iterations <= loop.step)

    # ------------------------------------------------------------------ stages

    def _label_stage(self, task: Task) -> Stage:
        return Stage(LABEL, task, task.instruction, task.instruction, written_field(task), tuple(task.train),
                     targets=tuple(range(len(task.verbalizer))))

    def _ranker_task(self, task) -> Task:
        """The label task the ranker prompt is calibrated on: each train input with its gold answer."""
        top = self.ranker_scale - 1
        pool = tuple(Example({"input": input_text(task, ex.inputs), "output": ex.answers[0]}, top) for ex in task.train)
        seed = ranker_seed(task.instruction, self.ranker_scale)
        words = tuple(f" {r}" for r in range(1, self.ranker_scale + 1))
        return Task(name=f"{task.name}-ranker", template=RANKER_TEMPLATE, verbalizer=words, instruction=seed,
                    train=pool, dev=(), test=())

    def _ranker_stage(self, task) -> Stage:
        rank_task = self._ranker_task(task)
        top = self.ranker_scale - 1
        # the reference's ranking meta-prompts ask for cases of the top two scores only
        return Stage(RANKER, rank_task, rank_task.instruction, rank_task.instruction, "output", rank_task.train,
                     targets=(top, top - 1))

    def _generate_stage(self, task, state: CalibrationState) -> Stage:
        ranker = state.ranker.best or self._ranker_task(task).instruction
        return Stage(GENERATE, task, task.instruction, task.instruction, written_field(task), tuple(task.train),
                     ranker=ranker, rank_task=self._ranker_task(task))

    def _ranker_real(self, task, real: Sequence[int]) -> tuple[Case, ...]:
        """Per real example: its gold answer rated top, another example's gold answer rated 1."""
        out, n = [], len(task.train)
        for i in real:
            ex = task.train[i]
            text = input_text(task, ex.inputs)
            out.append(Case(-1, (("input", text), ("output", ex.answers[0])), self.ranker_scale - 1,
                            self.ranker_scale - 1, real=True))
            others = (task.train[(i + j) % n].answers[0] for j in range(1, n))
            wrong = next((a for a in others if a.strip().lower() not in {g.strip().lower() for g in ex.answers}), None)
            if wrong is not None:
                out.append(Case(-1, (("input", text), ("output", wrong)), 0, 0, real=True))
        return tuple(out)

    def _seed_dev(self, main: Loop, task, dev, scorer: LM) -> tuple[Loop, tuple[Evaluated, ...]]:
        """The seed's dev score, when a step would otherwise report none (a generative task's
        ranker phase, or a label step that waits for a person's labels)."""
        if main.best:
            return main, ()
        waits = self.annotator == "file" and not any(c.label is not None for c in main.cases)
        if not (is_generative(task) or waits):
            return main, ()
        ((score, seen),) = scored_prompts(task, [TextPrompt(task.instruction)], dev, scorer)
        main = replace(main, best=task.instruction, best_dev=score, tried=((task.instruction, None, score),))
        return main, (Evaluated(task.instruction, score, len(dev), "seed", **seen),)

    # ------------------------------------------------------------------ one iteration

    def _iterate(self, loop: Loop, stage: Stage, dev, scorer: LM, proposer: LM, rng: np.random.Generator):
        """One iteration of the loop; returns ``(loop, metrics, evaluated)``."""
        changed_before = _changed(loop.cases)
        if stage.labelled and self.annotator == "file":
            loop = replace(loop, cases=self._read_labels(loop.cases, stage))
        if not _ready(loop.cases, stage) and any(c.label is None for c in loop.cases):
            return loop, self._loop_metrics(loop, stage, changed_before), ()  # only waiting for a person
        loop = self._write_cases(loop, stage, proposer, rng)
        bench = [c for c in loop.cases if c.label is not None or not stage.labelled]
        if not bench:
            return loop, self._loop_metrics(loop, stage, changed_before), ()
        unchanged = loop.step > 0 and len(bench) == loop.best_n and not loop.pending
        loop, evaluated = self._score_and_select(loop, stage, bench, dev, scorer)
        if unchanged:  # same prompt, same cases: the last analysis still holds (no call)
            shown, analysis = loop.rounds[-1].errors, loop.rounds[-1].analysis
        else:
            shown = self._errors_shown(loop.best_errors, rng)
            analysis = self._analyse(loop, stage, shown, len(bench), loop.best_note, proposer, rng)
        loop = replace(loop, rounds=loop.rounds + (Round(loop.best, loop.best_score, len(bench), shown, analysis),))
        loop = self._suggest(loop, stage, analysis, shown, proposer, rng)
        return loop, self._loop_metrics(loop, stage, changed_before), evaluated

    # 1. boundary cases --------------------------------------------------------------

    def _writes(self, loop: Loop, stage: Stage) -> int:
        """How many cases to ask for this iteration (0 during a warm-up on real examples)."""
        written = sum(not c.real for c in loop.cases)
        warming = loop.step < self.warmup and any(c.real for c in loop.cases)
        if stage.written is None or not stage.pool or warming or written >= self.max_cases:
            return 0
        return min(self.n_synthetic, self.max_cases - written)

    def _write_cases(self, loop: Loop, stage: Stage, proposer: LM, rng: np.random.Generator) -> Loop:
        """New boundary cases (one ``generate`` call), annotated or sent to the person."""
        n = self._writes(loop, stage)
        if n == 0:
            return loop
        prompts = list(loop.pending) or [loop.best or stage.seed]
        errors = self._error_history(loop)
        targets = [stage.targets[(loop.next_id + j) % len(stage.targets)] if stage.targets else None for j in range(n)]
        anchors = [stage.pool[int(rng.integers(len(stage.pool)))] for _ in range(n)]
        contexts = [
            self._case_context(stage, prompts[j % len(prompts)], errors, self._shots(stage, rng), anchors[j],
                               targets[j])
            for j in range(n)
        ]
        outs = proposer.generate(contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 seed=int(rng.integers(2**31)), stop=("\n\n",))
        fields = input_fields(stage.task)
        known = {_key(c.value(f) for f in fields) for c in loop.cases} | {_key(ex.inputs[f] for f in fields)
                                                                          for ex in stage.pool}
        made, next_id = [], loop.next_id
        for out, anchor, target in zip(outs, anchors, targets):
            text = clean_input(out[0], min_words=1 if stage.kind == RANKER else 2)
            inputs = tuple((f, text if f == stage.written else anchor.inputs[f]) for f in stage.task.fields)
            key = _key(dict(inputs)[f] for f in fields)
            if not text or key in known:  # empty, or a copy of a real example or an earlier case
                continue
            known.add(key)
            made.append(Case(next_id, inputs, target, None, step=loop.step + 1))
            next_id += 1
        made = self._annotate(made, stage, proposer)
        return replace(loop, cases=loop.cases + tuple(made), next_id=next_id)

    def _shots(self, stage: Stage, rng: np.random.Generator) -> tuple:
        return subsample(stage.pool, self.n_shots, rng) if self.n_shots else ()

    def _case_context(self, stage: Stage, prompt: str, errors: str, shots, anchor, target: int | None) -> str:
        task, name = stage.task, stage.written
        answer = "correct rating" if stage.kind == RANKER else "correct answer"
        wanted = "" if target is None else f", and whose {answer} is {task.verbalizer[target].strip()}"
        fixed = "".join(f"{_title(f)}: {anchor.inputs[f]}\n" for f in input_fields(task) if f != name)
        return CASE_TEMPLATE.format(
            intent=stage.intent, prompt=prompt, errors=errors,
            samples="\n\n".join(self._show(stage, ex) for ex in shots),
            field=name, target=wanted, fixed=fixed, title=_title(name),
        )

    def _show(self, stage: Stage, ex) -> str:
        lines = [f"{_title(f)}: {ex.inputs[f]}" for f in input_fields(stage.task)]
        name = "Rating" if stage.kind == RANKER else "Answer"
        return "\n".join(lines + [f"{name}: {stage.task.answer_text(ex)}"])

    def _error_history(self, loop: Loop) -> str:
        """The errors of the last ``history_k`` iterations, ``n_error_samples`` per correct answer."""
        blocks = []
        for rnd in loop.rounds[-self.history_k :]:
            kept = _per_answer(rnd.errors, self.n_error_samples)
            if kept:
                lines = [f"{text}\nPrediction: {pred}; correct: {gold}" for text, pred, gold in kept]
                blocks.append(f"Prompt: {rnd.prompt}\n" + "\n".join(lines))
        return "\n\n".join(blocks) or NO_ERRORS

    # 2. annotation ------------------------------------------------------------------

    def _annotate(self, made: list[Case], stage: Stage, proposer: LM) -> list[Case]:
        """Labels for new cases: the LLM annotator's (one call), or none yet (written to the file)."""
        if not made or not stage.labelled:
            return made
        if self.annotator == "file":
            self._append_rows(made, stage)
            return made
        instruction = self.annotator_instruction.strip() or stage.intent
        examples = [Example(dict(c.inputs), 0) for c in made]
        (labels,) = _label_blocks(stage.task, [(instruction, examples)], proposer, calibrate=False)
        return [replace(c, label=int(y)) for c, y in zip(made, labels)]

    def _append_rows(self, made: Sequence[Case], stage: Stage) -> None:
        """Appends the new cases with an empty label; ids already in the file are not written twice
        (a resumed trial repeats the step that wrote them)."""
        path, fields = Path(self.annotation_file), input_fields(stage.task)
        present = {row.get("id", "").strip() for row in _read_rows(path)}
        fresh = [c for c in made if str(c.id) not in present]
        if not fresh:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        empty = not path.exists() or path.stat().st_size == 0
        if not empty and not path.read_bytes().endswith(b"\n"):
            with path.open("a", encoding="utf-8") as f:  # a spreadsheet may save without a final newline
                f.write("\n")
        with path.open("a", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            if empty:
                writer.writerow(["id", "step", *fields, "intended", "label"])
            for c in fresh:
                intended = "" if c.intended is None else stage.task.verbalizer[c.intended].strip()
                writer.writerow([c.id, c.step, *(c.value(f) for f in fields), intended, ""])

    def _read_labels(self, cases: tuple[Case, ...], stage: Stage) -> tuple[Case, ...]:
        """The labels a person filled in, for the cases still waiting (by id, and the same text)."""
        waiting = {str(c.id) for c in cases if c.label is None}
        if not waiting:
            return cases
        rows = {row.get("id", "").strip(): row for row in _read_rows(Path(self.annotation_file))}
        words = {w.strip().lower(): i for i, w in enumerate(stage.task.verbalizer)}
        fields, out = input_fields(stage.task), []
        for c in cases:
            row = rows.get(str(c.id)) if str(c.id) in waiting else None
            if row is not None and all((row.get(f) or "").strip() == c.value(f).strip() for f in fields):
                label = words.get((row.get("label") or "").strip().lower())
                c = c if label is None else replace(c, label=label)
            out.append(c)
        return tuple(out)

    # 3. scoring and selection -----------------------------------------------------------

    def _score_and_select(self, loop: Loop, stage: Stage, bench: list[Case], dev, scorer: LM):
        """Scores the selected prompt and the pending suggestions on the benchmark (and the new ones
        on dev) in one call, then selects; returns ``(loop, evaluated)``.

        The benchmark only grows (cases are appended, labels only arrive), so when it has as many
        cases as when the selected prompt was last scored it is the same one, and that score stands.
        """
        incumbent = loop.best or stage.seed
        candidates = [incumbent] + [p for p in loop.pending if p != incumbent]
        known = {t: d for t, _, d in loop.tried}
        fresh = [c for c in candidates if c not in known] if stage.kind != RANKER else []
        kept = loop.step > 0 and len(bench) == loop.best_n
        scoring = candidates[1:] if kept else candidates
        scores, wrongs, devs, notes, seen = [], [], [], [], []
        if scoring:
            score = self._score_generation if stage.kind == GENERATE else self._score_labels
            scores, wrongs, devs, notes, seen = score(stage, scoring, fresh, bench, dev, scorer)
        if kept:
            scores, wrongs, notes = [loop.best_score] + scores, [loop.best_errors] + wrongs, [loop.best_note] + notes
        dev_of = {**known, **dict(zip(fresh, devs))}
        dev_of = {c: dev_of.get(c) for c in candidates}
        by_dev = self.select_on == "dev" and stage.kind != RANKER
        key = [dev_of[c] if by_dev else s for c, s in zip(candidates, scores)]
        pick = max(range(len(candidates)), key=lambda i: (key[i], -i))  # ties keep the incumbent
        improved = loop.step > 0 and pick > 0 and key[pick] >= key[0] + self.min_delta
        counted = loop.step + 1 > self.warmup
        tried = _updated(loop.tried, candidates, scores, dev_of)
        new = replace(
            loop, best=candidates[pick], best_score=scores[pick], best_dev=dev_of[candidates[pick]], pending=(),
            tried=tried, step=loop.step + 1, stale=0 if improved or not counted else loop.stale + 1,
            best_n=len(bench), best_errors=tuple(wrongs[pick]), best_note=notes[pick],
        )
        kinds = {stage.seed: "seed"}
        # The suggestions were written (last step) to improve the prompt selected then, which is
        # still the incumbent: selection only runs here. Anything else new is the seed.
        parent = {p: loop.best for p in loop.pending}
        evaluated = tuple(Evaluated(c, d, len(dev), kinds.get(c, "candidate"), parent.get(c, ""), **p)
                          for c, d, p in zip(fresh, devs, seen))
        return new, evaluated

    def _score_labels(self, stage: Stage, candidates, fresh, bench, dev, scorer: LM):
        task = stage.task
        examples = [Example(dict(c.inputs), c.label, c.choices) for c in bench]
        blocks = [(c, examples) for c in candidates] + [(c, list(dev)) for c in fresh]
        preds = _label_blocks(task, blocks, scorer, calibrated(task))
        scores = [task.score(p, examples) for p in preds[: len(candidates)]]
        devs = [task.score(p, dev) for p in preds[len(candidates) :]]
        seen = [provenance(task, p, dev) for p in preds[len(candidates) :]]
        wrongs = [
            [(input_text(task, ex.inputs), task.shown(y, ex), task.answer_text(ex))
             for ex, y in zip(examples, p) if not task.is_correct(y, ex)]
            for p in preds[: len(candidates)]
        ]
        return scores, wrongs, devs, [confusion(task, examples, p) for p in preds[: len(candidates)]], seen

    def _score_generation(self, stage: Stage, candidates, fresh, bench, dev, scorer: LM):
        """Outputs of every candidate (one ``generate`` call, dev included), then the ranker's ratings
        of the benchmark outputs (one ``loglikelihood`` call)."""
        task, rank_task, k = stage.task, stage.rank_task, self.ranker_scale
        inputs = [GenExample(dict(c.inputs), ()) for c in bench]
        contexts = [task.render(c, ex) for c in candidates for ex in inputs]
        contexts += [task.render(c, ex) for c in fresh for ex in dev]
        outs = [row[0] for row in scorer.generate(contexts, max_new_tokens=task.max_new_tokens, temperature=0.0,
                                                   stop=task.stop)] if contexts else []
        n = len(inputs)
        rated = [Example({"input": input_text(task, ex.inputs), "output": outs[j * n + i].strip()}, 0)
                 for j in range(len(candidates)) for i, ex in enumerate(inputs)]
        (ratings,) = _label_blocks(rank_task, [(stage.ranker, rated)], scorer, calibrate=False)
        scores, wrongs, floor = [], [], max(2, k - 1) - 1  # ratings are 0-based here
        for j in range(len(candidates)):
            mine = ratings[j * n : (j + 1) * n]
            scores.append(float(np.mean(mine)) / (k - 1))
            wrongs.append([(rated[j * n + i].inputs["input"], task.shown(rated[j * n + i].inputs["output"], inputs[i]),
                            f"rated {int(r) + 1} of {k}") for i, r in enumerate(mine) if r < floor])
        base = len(candidates) * n
        written = [outs[base + j * len(dev) : base + (j + 1) * len(dev)] for j in range(len(fresh))]
        devs = [task.score(w, dev) for w in written]
        notes = [f"Mean rating: {1 + s * (k - 1):.1f} of {k}\n" for s in scores]
        return scores, wrongs, devs, notes, [provenance(task, w, dev) for w in written]

    # 4. analysis and suggestion ---------------------------------------------------------

    def _errors_shown(self, wrong, rng: np.random.Generator) -> tuple[tuple[str, str, str], ...]:
        """Up to ``max(n_errors, n_error_samples)`` errors per correct answer, drawn at random."""
        order = rng.permutation(len(wrong)) if wrong else []
        return tuple(_per_answer([wrong[i] for i in order], max(self.n_errors, self.n_error_samples)))

    def _analyse(self, loop: Loop, stage: Stage, shown, n: int, confusion: str, proposer: LM,
                 rng: np.random.Generator) -> str:
        """The analyzer's summary of the selected prompt's errors (one greedy ``generate`` call)."""
        errors = _per_answer(shown, self.n_errors)
        if not errors:
            return NO_ANALYSIS
        lines = "\n".join(f"{text}\nPrediction: {pred}; correct: {gold}" for text, pred, gold in errors)
        context = ANALYSIS_TEMPLATE.format(
            intent=stage.intent, prompt=loop.best, n=n, score=round(100 * loop.best_score), confusion=confusion,
            errors=lines,
        )
        # greedy; the seed only pins down a backend (or a fake) that samples anyway
        (out,) = proposer.generate([context], max_new_tokens=self.analysis_tokens, temperature=0.0,
                                   seed=int(rng.integers(2**31)), stop=("\n\n",))
        text = " ".join(out[0].split())
        return text or NO_ANALYSIS

    def _history(self, loop: Loop) -> list[tuple[str, float]]:
        """The reference's choice: the latest ``history_k`` prompts, or every third iteration after
        the warm-up the best ``history_k`` of those scored since it, lowest first."""
        tried = [(t, s) for t, s, _ in loop.tried if s is not None]
        if loop.step < self.warmup or loop.step % 3 > 0:
            return tried[-self.history_k :]
        return sorted(tried, key=lambda p: p[1])[-self.history_k :]

    def _suggest(self, loop: Loop, stage: Stage, analysis: str, shown, proposer: LM, rng: np.random.Generator) -> Loop:
        """``n_proposals`` new prompts from the history and the analysis (one ``generate`` call)."""
        history = "\n\n".join(f"Prompt: {t}\nScore: {round(100 * s)}" for t, s in self._history(loop))
        answers = ""
        if stage.labelled:
            words = ", ".join(w.strip() for w in stage.task.verbalizer)
            answers = f" The prompt must ask for one of these answers: {words}."
        context = SUGGEST_TEMPLATE.format(intent=stage.intent, history=history, analysis=analysis, answers=answers)
        (outs,) = proposer.generate([context], max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                    n=self.n_proposals, seed=int(rng.integers(2**31)), stop=("\n\n",))
        raws = ["" if _ECHO.match(o.strip()) else o for o in outs]
        banned = [text for text, _, _ in shown]
        fresh = clean_candidates(raws, banned, [t for t, _, _ in loop.tried])
        return replace(loop, pending=tuple(fresh), proposed=loop.proposed + len(outs), usable=loop.usable + len(fresh))

    # ------------------------------------------------------------------ reporting

    def _loop_metrics(self, loop: Loop, stage: Stage, changed_before: int) -> dict[str, float]:
        written = [c for c in loop.cases if not c.real]
        changed = _changed(loop.cases)
        return {
            "synthetic_score": _number(loop.best_score),
            "benchmark": float(sum(c.label is not None or not stage.labelled for c in loop.cases)),
            "synthesized": float(len(written)),
            "annotated": float(sum(c.label is not None for c in written)) if stage.labelled else 0.0,
            "waiting": float(sum(c.label is None for c in written)) if stage.labelled else 0.0,
            "annotator_changed": float(changed),
            "annotator_changed_step": float(changed - changed_before),
            "proposed": float(loop.proposed),
            "usable": float(loop.usable),
            "stale": float(loop.stale),
            "iterations": float(loop.step),
        }

    def _metrics(self, state: CalibrationState, stage: Stage, loop_metrics: dict[str, float]) -> dict[str, float]:
        metrics = {"dev_score": _number(state.main.best_dev), **loop_metrics}
        if state.ranker is not None:
            metrics["ranking"] = float(stage.kind == RANKER)
            metrics["ranker_score"] = _number(state.ranker.best_score)
            if stage.kind != RANKER:  # the annotator worked in the ranker phase: keep its counts
                metrics["annotator_changed"] = float(_changed(state.ranker.cases))
                metrics["annotator_changed_step"] = 0.0
        return metrics


# ---------------------------------------------------------------------- small helpers


def confusion(task: Task, examples: Sequence[Example], preds) -> str:
    """The reference analyzer's confusion matrix: per correct answer, how often each answer was given
    (examples with their own options are left out: their answers do not share one label set)."""
    words = [w.strip() for w in task.verbalizer]
    counts = np.zeros((len(words), len(words)), dtype=int)
    for ex, y in zip(examples, preds):
        if ex.choices is None:
            counts[ex.label, int(y)] += 1
    rows = "; ".join(f"{w}: {counts[i].tolist()}" for i, w in enumerate(words))
    return f"Confusion (rows: correct answer, columns: answer given, both in the order {', '.join(words)}): {rows}\n"


def _key(values) -> str:
    return "\n".join(v.strip().lower() for v in values)


def _real_case(ex) -> Case:
    label = getattr(ex, "label", None)
    return Case(-1, tuple(ex.inputs.items()), label, label, getattr(ex, "choices", None), real=True)


def _ready(cases: Sequence[Case], stage: Stage) -> bool:
    return any(c.label is not None or not stage.labelled for c in cases)


def _changed(cases: Sequence[Case]) -> int:
    """Written cases whose annotated label differs from the one their writer intended."""
    return sum(not c.real and c.label is not None and c.intended is not None and c.label != c.intended for c in cases)


def _per_answer(errors, limit: int) -> list[tuple[str, str, str]]:
    """At most ``limit`` errors per correct answer, in order."""
    seen: Counter = Counter()
    out = []
    for err in errors:
        if seen[err[2]] < limit:
            seen[err[2]] += 1
            out.append(err)
    return out


def _updated(tried, candidates, scores, dev_of) -> tuple[tuple[str, float, float], ...]:
    """``tried`` with each candidate's latest benchmark score; new ones appended in order."""
    latest = dict(zip(candidates, scores))
    out = [(t, latest.get(t, s), d) for t, s, d in tried]
    have = {t for t, _, _ in tried}
    out += [(c, latest[c], dev_of[c]) for c in candidates if c not in have]
    return tuple(out)


def _read_rows(path: Path) -> list[dict]:
    """The annotation file's rows ([] when it does not exist yet); a byte-order mark is ignored."""
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _number(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _title(name: str) -> str:
    return name[:1].upper() + name[1:]
