"""Benchmark tasks built from files: one plain function per benchmark, flat typed arguments.

Each loader is the ``_target_`` of a YAML in ``conf/task/`` and returns a
:class:`~tasks.core.Task`. Data is only read from ``data_dir`` (never copied), and every
random split comes from an explicit ``seed``: the same arguments always give the same task.
File reading and split helpers live in :mod:`tasks.sources`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.core import Example, Task, TaskError
from tasks.sources import (
    bbh_examples,
    bbh_path,
    check_split_files,
    check_template,
    data_file,
    draw,
    label_ids,
    mmlu_subjects,
    read_bbh,
    read_bbh_description,
    read_glue_tsv,
    read_label_lines,
    read_mmlu_csv,
    require_splits,
    seeded_split,
    sst2_from_hub,
    table_example,
    table_fields,
    table_rows,
    table_splits,
)

SENTIMENT_INSTRUCTION = "Classify the sentiment of the movie review as positive or negative."
REVIEW_TEMPLATE = "{instruction}\n\nReview: {sentence}\nSentiment:"
BINARY_WORDS = (" negative", " positive")


def _sentence_task(
    name: str, splits: Sequence[Sequence[tuple[str, int]]], template: str, label_words: Sequence[str], instruction: str,
    calibration: str = "none",
) -> Task:
    """A single-sentence classification task from ``(sentence, label)`` rows per split."""
    train, dev, test = ([Example(inputs={"sentence": s}, label=y) for s, y in rows] for rows in splits)
    require_splits((train, dev, test), f"task {name!r}")
    return Task(
        name=name, template=template, verbalizer=tuple(label_words), instruction=instruction,
        train=tuple(train), dev=tuple(dev), test=tuple(test), calibration=calibration,
    )


def sst2(
    data_dir: str,
    n_train: int = 200,
    n_dev: int = 100,
    n_test: int = 0,
    seed: int = 0,
    instruction: str = SENTIMENT_INSTRUCTION,
    template: str = REVIEW_TEMPLATE,
    label_words: Sequence[str] = BINARY_WORDS,
    hub_fallback: bool = False,
    calibration: str = "none",
) -> Task:
    """SST-2: optimize on seeded, disjoint train/dev draws from GLUE train; test on GLUE dev.

    GLUE's own test split has no labels, so its dev split (872 sentences) is the report split.

    Args:
        data_dir: the benchmark data directory (holds ``sst2/glue/{train,dev}.tsv``).
        n_train, n_dev: sizes drawn from GLUE train (67,349 sentences).
        n_test: how many GLUE dev sentences to report on; 0 means all 872.
        seed: fixes the draws.
        instruction: the hand-written baseline for the ``{instruction}`` slot.
        template: ``str.format`` template with ``{instruction}`` and ``{sentence}``.
        label_words: continuations for labels 0 (negative) and 1 (positive).
        hub_fallback: when the files are missing, load ``stanfordnlp/sst2`` from the Hugging
            Face hub instead (needs a network and ``datasets``); off by default so a wrong
            ``data_dir`` fails loudly instead of silently downloading.
        calibration: ``"none"`` or ``"contextual"`` (see :class:`tasks.core.Task`).
    """
    try:
        pool = read_glue_tsv(data_file(data_dir, "sst2", "glue", "train.tsv"))
        report = read_glue_tsv(data_file(data_dir, "sst2", "glue", "dev.tsv"))
    except TaskError:
        if not hub_fallback:
            raise
        pool, report = sst2_from_hub()
    train, dev = seeded_split(pool, [n_train, n_dev], seed, "sst2 train.tsv")
    test = draw(report, n_test, seed, "sst2 dev.tsv")
    return _sentence_task("sst2", (train, dev, test), template, label_words, instruction, calibration)


def sst5(
    data_dir: str,
    n_train: int = 200,
    n_dev: int = 100,
    n_test: int = 0,
    seed: int = 0,
    instruction: str = "Classify the sentiment of the movie review as terrible, bad, okay, good or great.",
    template: str = REVIEW_TEMPLATE,
    label_words: Sequence[str] = (" terrible", " bad", " okay", " good", " great"),
    calibration: str = "none",
) -> Task:
    """SST-5 (fine-grained, labels 0-4) from its fixed train/dev/test files.

    Args:
        data_dir: the benchmark data directory (holds ``sst5/stsa.fine.{train,dev,test}``).
        n_train, n_dev: seeded draws from the train (8,544) and dev (1,101) files.
        n_test: draw from the test file (2,210); 0 means all of it.
        seed, instruction, template, label_words, calibration: as for :func:`sst2`.
    """
    files = ("stsa.fine.train", "stsa.fine.dev", "stsa.fine.test")
    splits = [
        draw(read_label_lines(data_file(data_dir, "sst5", f)), n, seed, f"sst5/{f}")
        for f, n in zip(files, (n_train, n_dev, n_test), strict=True)
    ]
    return _sentence_task("sst5", splits, template, label_words, instruction, calibration)


def mr(
    data_dir: str,
    n_train: int = 200,
    n_dev: int = 100,
    n_test: int = 0,
    seed: int = 0,
    instruction: str = SENTIMENT_INSTRUCTION,
    template: str = REVIEW_TEMPLATE,
    label_words: Sequence[str] = BINARY_WORDS,
    calibration: str = "none",
) -> Task:
    """MR (movie-review snippets, 10,662; 1 = positive): one file, split here by ``seed``.

    Args:
        data_dir: the benchmark data directory (holds ``mr/rt-polarity.all``, Latin-1).
        n_train, n_dev: sizes of the seeded train and dev draws.
        n_test: size of the test draw; 0 means every remaining sentence.
        seed, instruction, template, label_words, calibration: as for :func:`sst2`.
    """
    rows = read_label_lines(data_file(data_dir, "mr", "rt-polarity.all"), encoding="latin-1")
    splits = seeded_split(rows, [n_train, n_dev, n_test or None], seed, "mr/rt-polarity.all")
    return _sentence_task("mr", splits, template, label_words, instruction, calibration)


def cr(
    data_dir: str,
    n_train: int = 200,
    n_dev: int = 100,
    n_test: int = 0,
    seed: int = 0,
    instruction: str = "Classify the sentiment of the product review as positive or negative.",
    template: str = REVIEW_TEMPLATE,
    label_words: Sequence[str] = BINARY_WORDS,
    calibration: str = "none",
) -> Task:
    """CR (customer reviews, 3,775; 1 = positive): one file, split here by ``seed``.

    Args:
        data_dir: the benchmark data directory (holds ``cr/custrev.all``).
        n_train, n_dev, n_test, seed, instruction, template, label_words, calibration: as for :func:`mr`.
    """
    rows = read_label_lines(data_file(data_dir, "cr", "custrev.all"))
    splits = seeded_split(rows, [n_train, n_dev, n_test or None], seed, "cr/custrev.all")
    return _sentence_task("cr", splits, template, label_words, instruction, calibration)


def bbh(
    data_dir: str,
    task_name: str,
    n_train: int = 50,
    n_dev: int = 50,
    n_test: int = 0,
    seed: int = 0,
    instruction: str | None = None,
    template: str = "{instruction}\n\nQ: {input}\nA:",
    max_labels: int = 10,
    min_label_count: int = 2,
    calibration: str = "none",
) -> Task:
    """A BIG-Bench Hard task whose answers come from a fixed set, scored answer-only.

    Lettered multiple choice (date_understanding, snarks, ...) scores each example's listed
    options ``" (A)"``, ``" (B)"``, ...; yes/no-style tasks (sports_understanding, navigate,
    web_of_lies, formal_fallacies, boolean_expressions, causal_judgement) score the distinct
    targets, sorted, each after a space. The few examples whose target is a slip (written
    as option text, or seen fewer than ``min_label_count`` times) are dropped; see
    :func:`tasks.sources.bbh_examples`.

    Args:
        data_dir: the benchmark data directory (holds ``bbh/bbh/<task_name>.json``).
        task_name: e.g. ``"sports_understanding"``, ``"navigate"``, ``"web_of_lies"``.
        n_train, n_dev: seeded draws from the task's examples (about 250).
        n_test: test draw size; 0 means every remaining example.
        seed: fixes the draws.
        instruction: baseline instruction; ``None`` takes the task description that opens
            ``bbh/cot-prompts/<task_name>.txt`` (empty when that file is absent).
        template: ``{instruction}`` and ``{input}``; the ``Q:``/``A:`` form of the BBH prompts.
        max_labels: for non-lettered tasks, more distinct targets than this means free-form.
        min_label_count: rarer targets are treated as slips and their examples dropped.

    Raises:
        TaskError: unknown task name, or free-form targets (word_sorting, object_counting...).
    """
    rows = read_bbh(bbh_path(data_dir, task_name))
    verbalizer, examples = bbh_examples(task_name, rows, max_labels, min_label_count)
    splits = seeded_split(examples, [n_train, n_dev, n_test or None], seed, f"bbh/{task_name}")
    require_splits(splits, f"bbh task {task_name!r}")
    if instruction is None:
        prompts = Path(data_dir, "bbh", "cot-prompts", f"{task_name}.txt")
        instruction = read_bbh_description(prompts) if prompts.is_file() else ""
    return Task(
        name=f"bbh_{task_name}", template=template, verbalizer=verbalizer,
        instruction=instruction, train=splits[0], dev=splits[1], test=splits[2], calibration=calibration,
    )


# ---------------------------------------------------------------------------------- MMLU

MMLU_LETTERS = ("A", "B", "C", "D")
MMLU_TEMPLATES = {
    # The optimized instruction goes before the standard (Hendrycks et al.) header.
    "letter": "{instruction}\n\n{header}{shots}{question}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\nAnswer:",
    # Cloze: no options listed; each option's own text is the continuation scored.
    "cloze": "{instruction}\n\n{header}{shots}{question}\nAnswer:",
}


def mmlu(
    data_dir: str,
    subjects: Sequence[str] | str | None = None,
    form: str = "letter",
    k_shot: int = 5,
    n_val: int = 0,
    n_test: int = 0,
    seed: int = 0,
    instruction: str = "",
    calibration: str = "none",
) -> Task:
    """MMLU in the standard k-shot format, as letter choice or as cloze.

    Splits: ``train`` is the per-subject 5-example dev pool itself (the shots; methods that
    need demonstrations draw them from here), ``dev`` is MMLU's val split (what methods
    optimize on), ``test`` is MMLU's test split (the report). Every example's shots are the
    first ``k_shot`` pool examples of its subject; a pool example never sees itself as a
    shot, so train examples get at most 4. ``Example.group`` is the subject, so
    :func:`group_scores` gives per-subject accuracy.

    Forms:
        ``letter``: options listed as ``A. ..`` lines, continuations ``" A"`` .. ``" D"``.
        ``cloze``: the question alone then ``Answer:``, each option's text (``" " + text``)
            is the continuation, and scores are length-normalized (options differ in length).
            Shots end with the correct option's text instead of a letter.

    Args:
        data_dir: the benchmark data directory (holds ``mmlu/data/{dev,val,test}``).
        subjects: subject file stems such as ``"abstract_algebra"``; ``None`` means all 57.
        form: ``"letter"`` or ``"cloze"``.
        k_shot: shots per prompt (0..5).
        n_val, n_test: seeded draws over all chosen subjects together; 0 means all.
        seed: fixes the draws.
        instruction: baseline text for the slot before the header (empty: the plain format).
        calibration: ``"none"`` or ``"contextual"`` (letter form only; see :class:`tasks.core.Task`).
    """
    if form not in MMLU_TEMPLATES:
        raise TaskError(f"unknown mmlu form {form!r}; expected 'letter' or 'cloze'")
    if not 0 <= k_shot <= 5:
        raise TaskError(f"k_shot must be between 0 and 5 (the dev pool has 5 per subject), got {k_shot}")
    train: list[Example] = []
    val: list[Example] = []
    test: list[Example] = []
    for subject in mmlu_subjects(data_dir, subjects):
        pool = _mmlu_rows(data_dir, "dev", subject)
        train += [_mmlu_example(subject, row, [r for r in pool if r is not row][:k_shot], form) for row in pool]
        val += [_mmlu_example(subject, row, pool[:k_shot], form) for row in _mmlu_rows(data_dir, "val", subject)]
        test += [_mmlu_example(subject, row, pool[:k_shot], form) for row in _mmlu_rows(data_dir, "test", subject)]
    return Task(
        name="mmlu" if form == "letter" else "mmlu_cloze", template=MMLU_TEMPLATES[form],
        verbalizer=tuple(" " + x for x in MMLU_LETTERS), instruction=instruction,
        train=tuple(train), dev=draw(val, n_val, seed, "mmlu val"), test=draw(test, n_test, seed, "mmlu test"),
        length_normalize=form == "cloze", calibration=calibration,
    )


def _mmlu_rows(data_dir: str, split: str, subject: str) -> list:
    return read_mmlu_csv(data_file(data_dir, "mmlu", "data", split, f"{subject}_{split}.csv"))


def _mmlu_block(row: tuple, form: str) -> str:
    """A question as it appears in a prompt, up to and including ``Answer:``."""
    question, options, _ = row
    if form == "cloze":
        return f"{question}\nAnswer:"
    listed = "".join(f"\n{letter}. {text}" for letter, text in zip(MMLU_LETTERS, options, strict=True))
    return f"{question}{listed}\nAnswer:"


def _mmlu_example(subject: str, row: tuple, shots: Sequence[tuple], form: str) -> Example:
    question, options, answer = row
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    solved = "".join(f"{_mmlu_block(s, form)} {_mmlu_answer(s, form)}\n\n" for s in shots)
    inputs = {"subject": subject, "header": header, "shots": solved, "question": question}
    inputs.update(zip(MMLU_LETTERS, options, strict=True))
    choices = tuple(" " + text for text in options) if form == "cloze" else None
    return Example(inputs=inputs, label=answer, choices=choices, group=subject)


def _mmlu_answer(row: tuple, form: str) -> str:
    _, options, answer = row
    return options[answer] if form == "cloze" else MMLU_LETTERS[answer]


def group_scores(task: Task, examples: Sequence[Example], predictions: Sequence[int]) -> dict[str, float]:
    """The task metric per ``Example.group`` (e.g. per MMLU subject), groups sorted by name.

    Args:
        task: supplies the metric.
        examples: the scored examples, aligned with ``predictions``.
        predictions: predicted label ids ``[len(examples)]``.
    """
    if len(examples) != len(predictions):
        raise TaskError(f"{len(predictions)} predictions for {len(examples)} examples")
    preds = np.asarray(predictions)
    members: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        members.setdefault(ex.group, []).append(i)
    return {g: task.score(preds[idx], [examples[i] for i in idx]) for g, idx in sorted(members.items())}


# ------------------------------------------------------------------------ user's own table

def table(
    path: str,
    text_fields: Sequence[str],
    label_field: str,
    label_words: Sequence[str],
    labels: Sequence[object] | None = None,
    template: str | None = None,
    instruction: str | None = None,
    n_train: int = 100,
    n_dev: int = 100,
    n_test: int = 0,
    seed: int = 0,
    format: str = "auto",
    name: str = "custom",
    encoding: str = "utf-8",
    dev_path: str | None = None,
    test_path: str | None = None,
    calibration: str = "none",
) -> Task:
    """A classification task from a user's CSV, TSV (header row) or JSONL file, split by ``seed``.

    With ``dev_path`` and ``test_path`` (most datasets ship split), ``path`` is the train file
    and each split is drawn from its own file.

    Args:
        path: the (train) file; relative paths resolve against the current working directory.
        text_fields: columns that go into the prompt, each a ``{field}`` of the template.
        label_field: the column holding the label.
        label_words: continuation per label id, e.g. ``[" negative", " positive"]``.
        labels: the raw label values in ``label_words`` order (e.g. ``["neg", "pos"]``).
            ``None``: values must be ids ``0..k-1`` or equal the label words (stripped).
        template: ``str.format`` template with ``{instruction}`` and the text fields;
            ``None`` builds ``"{instruction}\\n\\nText: {text}\\nAnswer:"``, one line per field.
        instruction: baseline instruction; ``None`` lists the label words.
        n_train, n_dev: sizes of the seeded train and dev draws.
        n_test: test draw size; 0 means every remaining row.
        seed: fixes the draws.
        format: ``auto`` (from the suffix: .csv, .tsv/.tab, .jsonl/.ndjson), csv, tsv, jsonl.
        name: the task's name in results.
        encoding: the file's text encoding.
        dev_path, test_path: separate dev and test files (give both or neither); ``n_dev`` and
            ``n_test`` then draw from them (0: all of it).
        calibration: ``"none"`` or ``"contextual"`` (see :class:`tasks.core.Task`).

    Raises:
        TaskError: one line naming the file, column, value or line at fault.
    """
    check_split_files(dev_path, test_path)
    fields = table_fields(text_fields, label_field)
    ids = label_ids(tuple(label_words), labels)
    template = default_template(fields) if template is None else template
    check_template(template, fields)

    def load(file: str) -> list[Example]:
        return table_rows(file, [*fields, label_field],
                          lambda row, f, line_no: table_example(row, fields, label_field, ids, f, line_no), format, encoding)

    examples = load(path)
    present = {ex.label for ex in examples}
    if len(present) < 2:
        (only,) = present
        raise TaskError(f"{path}: every row has label {label_words[only].strip()!r}; a classification task "
                        f"needs rows of at least two of {[w.strip() for w in label_words]}")
    splits = table_splits(examples, load, path, dev_path, test_path, (n_train, n_dev, n_test), seed)
    require_splits(splits, path)
    if instruction is None:
        words = ", ".join(w.strip() for w in label_words)
        instruction = f"Classify the text as one of: {words}."
    return Task(
        name=name, template=template, verbalizer=tuple(label_words), instruction=instruction,
        train=splits[0], dev=splits[1], test=splits[2], calibration=calibration,
    )


def default_template(fields: Sequence[str], answer: str = "Answer") -> str:
    """``{instruction}``, a blank line, one ``Field: {field}`` line per column, then ``answer:``."""
    lines = "\n".join(f"{f.replace('_', ' ').capitalize()}: {{{f}}}" for f in fields)
    return f"{{instruction}}\n\n{lines}\n{answer}:"


