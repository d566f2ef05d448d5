"""Generative benchmark tasks built from files: GSM8K, BBH (all 27, answer-only or CoT), instruction
induction, and a user's own input/output table.

Each loader is the ``_target_`` of a YAML in ``conf/task/`` and returns a
:class:`~tasks.generative.GenTask`. As in :mod:`tasks.loaders`, data is read from ``data_dir``
only and every random split comes from an explicit ``seed``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tasks.answers import gsm8k_gold
from tasks.core import TaskError
from tasks.generative import ANSWER_METRICS, GenExample, GenTask, qa_template
from tasks.loaders import default_template
from tasks.sources import (
    bbh_path,
    cell,
    check_split_files,
    check_template,
    data_file,
    draw,
    named_file,
    read_bbh,
    read_bbh_description,
    readable,
    require_splits,
    seeded_split,
    table_fields,
    table_rows,
    table_splits,
)

STOP = ("\n\n", "\nQ:")  # an answer ends at a blank line or where the model starts the next question
COT_OPENER = "Let's think step by step."


# ---------------------------------------------------------------------------------- GSM8K

_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k_solution(answer: str) -> str:
    """A GSM8K solution as a worked answer: calculator annotations dropped, the final
    ``#### N`` written as "The answer is N." (the form the model is asked to end with)."""
    body, _, _ = answer.rpartition("####")
    steps = _CALCULATOR.sub("", body).strip()
    return f"{steps}\nThe answer is {gsm8k_gold(answer)}."


@readable
def read_gsm8k(path: Path) -> list[tuple[str, str]]:
    """``(question, answer)`` rows of a GSM8K JSONL file."""
    rows = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
                rows.append((row["question"], row["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise TaskError(f"{path}:{line_no}: not a GSM8K row ({err})") from None
    return rows


def gsm8k(
    data_dir: str,
    n_train: int = 200,
    n_dev: int = 100,
    n_test: int = 0,
    k_shot: int = 0,
    cot: bool = True,
    position: str = "answer",
    instruction: str = COT_OPENER,
    max_new_tokens: int = 256,
    seed: int = 0,
) -> GenTask:
    """GSM8K grade-school math: optimize on draws from train, report on the 1,319 test problems.

    OPRO's setting is zero-shot (``k_shot=0``) with the instruction at the start of the answer
    (``position="answer"``, baseline "Let's think step by step."). Few-shot CoT shows
    ``k_shot`` worked train solutions before the question (drawn by ``seed``, disjoint from
    the train and dev draws), the same for every question.

    Args:
        data_dir: holds ``gsm8k/{train,test}.jsonl``.
        n_train, n_dev: seeded, disjoint draws from train (7,473).
        n_test: test draw size; 0 means all 1,319.
        k_shot: worked examples shown before each question.
        cot: shots show the worked solution (else only "The answer is N.").
        position: where the instruction goes (``before``, ``after``, ``answer``).
        instruction: the baseline for the slot.
        max_new_tokens: generation cap (a CoT solution needs a few hundred).
        seed: fixes the draws.
    """
    pool = read_gsm8k(data_file(data_dir, "gsm8k", "train.jsonl"))
    report = read_gsm8k(data_file(data_dir, "gsm8k", "test.jsonl"))
    train, dev, shots = seeded_split(pool, [n_train, n_dev, k_shot], seed, "gsm8k/train.jsonl")
    test = draw(report, n_test, seed, "gsm8k/test.jsonl")
    solved = "".join(f"Q: {q}\nA: {_shot_answer(a, cot)}\n\n" for q, a in shots)

    def example(row: tuple[str, str]) -> GenExample:
        question, answer = row
        return GenExample(inputs={"question": question, "shots": solved}, answers=(gsm8k_gold(answer),),
                          target=gsm8k_solution(answer))

    splits = [tuple(example(r) for r in rows) for rows in (train, dev, test)]
    require_splits(splits, "task 'gsm8k'")
    return GenTask(
        name="gsm8k", template=qa_template(position, "question", shots=True), instruction=instruction,
        train=splits[0], dev=splits[1], test=splits[2], metric="gsm8k",
        max_new_tokens=max_new_tokens if cot else min(max_new_tokens, 16), stop=STOP,
    )


def _shot_answer(answer: str, cot: bool) -> str:
    return gsm8k_solution(answer) if cot else f"The answer is {gsm8k_gold(answer)}."


# ------------------------------------------------------------------------------------ BBH



@readable
def read_bbh_shots(path: Path) -> list[tuple[str, str]]:
    """``(question, worked answer)`` of the 3 exemplars in a BBH chain-of-thought prompt file."""
    text = path.read_text(encoding="utf-8")
    body = text.split("-----", 1)[-1]
    blocks = [b.strip() for b in re.split(r"\n\n(?=Q: )", body) if b.strip().startswith("Q: ")]
    shots = []
    for block in blocks:
        question, sep, answer = block.partition("\nA: ")
        if not sep:
            raise TaskError(f"{path}: an exemplar has no 'A: ' line")
        shots.append((question.removeprefix("Q: "), answer.strip()))
    if not shots:
        raise TaskError(f"{path}: no 'Q: ... A: ...' exemplars found")
    return shots


def bbh_final(worked: str) -> str:
    """The answer a BBH worked exemplar ends with ("... So the answer is (B).")."""
    _, sep, tail = worked.rpartition("So the answer is ")
    if not sep:
        raise TaskError(f"a BBH exemplar does not end with 'So the answer is ...': {worked[-80:]!r}")
    return tail.strip().removesuffix(".")


def bbh_gen(
    data_dir: str,
    task_name: str,
    cot: bool = True,
    k_shot: int = 3,
    n_train: int = 50,
    n_dev: int = 50,
    n_test: int = 0,
    position: str = "before",
    instruction: str | None = None,
    max_new_tokens: int = 0,
    seed: int = 0,
) -> GenTask:
    """Any of the 27 BIG-Bench Hard tasks with a written answer, as Suzgun et al. prompt it.

    The shots are the task's own 3 exemplars from ``bbh/cot-prompts/<task>.txt``: worked
    ("A: Let's think step by step. ... So the answer is X.") for chain of thought, or cut to
    "A: X" for answer-only. A CoT question's answer opens with "Let's think step by step."
    unless the instruction sits there (``position="answer"``). Scored by exact match after
    the last "the answer is" (:data:`tasks.generative.ANSWER_METRICS` ``bbh``).

    Args:
        data_dir: holds ``bbh/bbh/<task>.json`` and ``bbh/cot-prompts/<task>.txt``.
        task_name: e.g. ``"date_understanding"``, ``"word_sorting"``, ``"dyck_languages"``.
        cot: worked exemplars and a reasoning answer, else answer-only.
        k_shot: how many of the 3 exemplars to show (0 for zero-shot).
        n_train, n_dev: seeded, disjoint draws from the task's examples (about 250).
        n_test: test draw size; 0 means every remaining example.
        position: where the instruction goes (``before``, ``after``, ``answer``).
        instruction: baseline; ``None`` takes the task description that opens the prompt file
            (or "Let's think step by step." at ``position="answer"`` with CoT).
        max_new_tokens: generation cap; 0 picks 256 for CoT, 32 for answer-only.
        seed: fixes the draws.
    """
    rows = read_bbh(bbh_path(data_dir, task_name))
    prompt_file = data_file(data_dir, "bbh", "cot-prompts", f"{task_name}.txt")
    if not 0 <= k_shot <= 3:
        raise TaskError(f"k_shot must be between 0 and 3 (BBH has 3 exemplars per task), got {k_shot}")
    shots = read_bbh_shots(prompt_file)[:k_shot]
    opener = f" {COT_OPENER}" if cot and position != "answer" else ""
    solved = "".join(f"Q: {q}\nA: {a if cot else bbh_final(a)}\n\n" for q, a in shots)
    if instruction is None:
        instruction = COT_OPENER if cot and position == "answer" else read_bbh_description(prompt_file)
    examples = [GenExample(inputs={"input": x, "shots": solved}, answers=(y,)) for x, y in rows]
    splits = seeded_split(examples, [n_train, n_dev, n_test or None], seed, f"bbh/{task_name}")
    require_splits(splits, f"bbh task {task_name!r}")
    return GenTask(
        name=f"bbh_{task_name}" + ("_cot" if cot else ""), template=qa_template(position, "input", shots=True) + opener,
        instruction=instruction, train=splits[0], dev=splits[1], test=splits[2], metric="bbh",
        max_new_tokens=max_new_tokens or (256 if cot else 32), stop=STOP,
    )


# -------------------------------------------------------------------- instruction induction

# APE's choice of metric per task (experiments/evaluation/instruction_induction/utility.py,
# after Honovich et al.); every other task is exact match.
II_METRICS = {"common_concept": "ii_f1", "informal_to_formal": "ii_f1", "orthography_starts_with": "ii_set",
              "taxonomy_animal": "ii_set", "synonyms": "ii_contains"}
APE_TEMPLATE = "Instruction: {instruction}\n\nInput: {input}\nOutput:"


@readable
def read_ii(path: Path) -> list[dict]:
    """The examples of an instruction-induction file, in their numbered order."""
    data = json.loads(path.read_text(encoding="utf-8"))
    examples = data["examples"]
    return [examples[k] for k in sorted(examples, key=int)]


def ii_example(task_name: str, row: dict, rng: np.random.Generator) -> GenExample:
    """An instruction-induction row as APE's loader reads it (see :func:`ii`); the answers
    de-duplicated, blank ones (a few translation lists have them) dropped."""
    ex = _ii_row(task_name, row, rng)
    return GenExample(inputs=ex.inputs, answers=tuple(dict.fromkeys(a for a in ex.answers if a.strip())))


def _ii_row(task_name: str, row: dict, rng: np.random.Generator) -> GenExample:
    if task_name == "cause_and_effect":
        cause, effect = row["cause"], row["effect"]
        first, second = (cause, effect) if rng.random() < 0.5 else (effect, cause)
        return GenExample(inputs={"input": f"Sentence 1: {first} Sentence 2: {second}"}, answers=(cause,))
    if task_name == "common_concept":
        return GenExample(inputs={"input": ", ".join(row["items"])}, answers=tuple(row["all_common_concepts"]))
    if task_name == "rhymes":
        return GenExample(inputs={"input": row["input"]}, answers=(row["output"], *row["other_rhymes"]))
    if task_name.startswith("translation"):
        return GenExample(inputs={"input": row["input"]}, answers=(row["output"], *row["possible_translations"]))
    return GenExample(inputs={"input": row["input"]}, answers=(row["output"],))


def ii(
    data_dir: str,
    task_name: str,
    n_train: int = 100,
    n_dev: int = 20,
    n_test: int = 0,
    annotation: int = 0,
    instruction: str | None = None,
    template: str = APE_TEMPLATE,
    max_new_tokens: int = 40,
    seed: int = 0,
) -> GenTask:
    """One of the 24 instruction-induction tasks (Honovich et al. 2022) under APE's protocol.

    As APE runs it: the ``induce`` file is split into demonstrations for proposers (``train``,
    at most half of it) and the examples candidates are scored on (``dev``); the ``execute``
    file, never seen during search, is the test set. Outputs are scored by APE's per-task
    metric (:data:`II_METRICS`) against every acceptable answer (all translations, all rhymes,
    all common concepts). Departures: cause_and_effect's sentence order is drawn from
    ``seed`` (APE uses Python's global ``random``); common_concept shows all its items (APE's
    loader drops the last one).

    Args:
        data_dir: holds ``instruction_induction/raw/{induce,execute}/<task>.json`` and
            ``instruction_induction/annotations/<task>.json``.
        task_name: e.g. ``"antonyms"``, ``"translation_en-de"``.
        n_train: demonstrations drawn from ``induce`` (capped at half of it).
        n_dev: examples drawn from the rest of ``induce`` to score candidates on.
        n_test: draw from ``execute``; 0 means all of it (100 for most tasks).
        annotation: which of the task's human-written instructions is the baseline.
        instruction: a baseline of your own instead (overrides ``annotation``).
        template: APE's evaluation template by default.
        max_new_tokens: generation cap (answers are one line; stops at a newline).
        seed: fixes the draws.
    """
    rng = np.random.default_rng(seed)
    induce = [ii_example(task_name, r, rng) for r in read_ii(_ii_file(data_dir, "raw", "induce", task_name))]
    execute = [ii_example(task_name, r, rng) for r in read_ii(_ii_file(data_dir, "raw", "execute", task_name))]
    n_train = min(n_train, len(induce) // 2)
    train, dev = seeded_split(induce, [n_train, min(n_dev, len(induce) - n_train)], seed, f"instruction_induction/{task_name}")
    test = draw(execute, n_test, seed, f"instruction_induction/execute/{task_name}")
    require_splits((train, dev, test), f"instruction-induction task {task_name!r}")
    if instruction is None:
        notes = json.loads(_ii_file(data_dir, "annotations", None, task_name).read_text(encoding="utf-8"))["annotations"]
        if not 0 <= annotation < len(notes):
            raise TaskError(f"task {task_name!r} has {len(notes)} annotated instructions; annotation must be 0..{len(notes) - 1}")
        instruction = notes[annotation]
    return GenTask(
        name=f"ii_{task_name}", template=template, instruction=instruction, train=train, dev=dev, test=test,
        metric=II_METRICS.get(task_name, "ii_em"), max_new_tokens=max_new_tokens, stop=("\n",),
    )


def _ii_file(data_dir: str, kind: str, sub: str | None, task_name: str) -> Path:
    parts = ["instruction_induction", kind] + ([sub] if sub else []) + [f"{task_name}.json"]
    return named_file(data_dir, parts, ("instruction_induction", "raw", "induce"), "instruction-induction tasks")


# ------------------------------------------------------------------------ user's own table

def gen_table(
    path: str,
    input_fields: Sequence[str],
    output_field: str,
    metric: str = "exact_match",
    dev_path: str | None = None,
    test_path: str | None = None,
    template: str | None = None,
    instruction: str = "",
    n_train: int = 100,
    n_dev: int = 100,
    n_test: int = 0,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    seed: int = 0,
    format: str = "auto",
    name: str = "custom_gen",
    encoding: str = "utf-8",
) -> GenTask:
    """A generative task from a user's CSV, TSV (header row) or JSONL file of inputs and outputs.

    One file is split by ``seed``; with ``dev_path`` and ``test_path`` (most datasets ship
    split), ``path`` is the train file and each split is drawn from its own file.

    Args:
        path: the (train) file; relative paths resolve against the current working directory.
        input_fields: columns that go into the prompt, each a ``{field}`` of the template.
        output_field: the gold answer's column (a JSON list in JSONL gives several answers).
        metric: a name in :data:`tasks.generative.ANSWER_METRICS` (exact_match, contains, f1,
            numeric, gsm8k, bbh, ii_em, ...).
        dev_path, test_path: separate dev and test files (give both or neither).
        template: ``{instruction}`` and the input fields; ``None`` builds
            ``"{instruction}\\n\\nInput: {input}\\nOutput:"``, one line per field.
        instruction: the baseline instruction.
        n_train, n_dev: seeded draws (from ``path``, or from each split's file).
        n_test: test draw size; 0 means every remaining (or every test-file) row.
        max_new_tokens, stop: decoding settings.
        seed, format, name, encoding: as for :func:`tasks.loaders.table`.
    """
    if metric not in ANSWER_METRICS:
        raise TaskError(f"unknown metric {metric!r}; known: {sorted(ANSWER_METRICS)}")
    check_split_files(dev_path, test_path)
    fields = table_fields(input_fields, output_field)
    template = default_template(fields, "Output") if template is None else template
    check_template(template, fields)

    def load(file: str) -> list[GenExample]:
        return table_rows(file, [*fields, output_field],
                          lambda row, f, line_no: _gen_row(row, fields, output_field, f, line_no), format, encoding)

    splits = table_splits(load(path), load, path, dev_path, test_path, (n_train, n_dev, n_test), seed)
    require_splits(splits, path)
    return GenTask(
        name=name, template=template, instruction=instruction, train=tuple(splits[0]), dev=tuple(splits[1]),
        test=tuple(splits[2]), metric=metric, max_new_tokens=max_new_tokens, stop=tuple(stop),
    )


def _gen_row(row: dict, fields: Sequence[str], output_field: str, path: str, line_no: int) -> GenExample:
    inputs = {f: cell(row, f, path, line_no) for f in fields}
    gold = row.get(output_field)
    golds = tuple(str(g) for g in gold) if isinstance(gold, list) else (cell(row, output_field, path, line_no),)
    if not golds or not all(g.strip() for g in golds):
        raise TaskError(f"{path}:{line_no}: empty {output_field!r}; every row needs a gold answer")
    return GenExample(inputs=inputs, answers=golds)

