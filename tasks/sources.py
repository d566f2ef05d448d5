"""Reading benchmark files and splitting them reproducibly: the I/O half of the loaders.

Every failure a user can cause (a wrong data directory, a missing column, a bad label, a
split larger than the file) becomes a one-line :class:`~tasks.core.TaskError` that names
the path, line or value involved. Nothing here builds prompts; see :mod:`tasks.loaders`.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import functools
import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import numpy as np

from tasks.core import Example, TaskError, check_label_words

T = TypeVar("T")

DATA_HINT = "set data_dir=... or PROMPTSWEEP_DATA"

# Benchmark text fields can be long (SST-2 phrases are short, but users' own tables need not be).
csv.field_size_limit(2**27)


def data_file(data_dir: str, *parts: str) -> Path:
    """The path of a benchmark file (or folder) under ``data_dir``, checked to exist.

    Raises:
        TaskError: naming the data directory when it is missing, else the missing file.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise TaskError(f"data directory not found: {root} ({DATA_HINT})")
    path = root.joinpath(*parts)
    if not path.exists():
        raise TaskError(f"data file not found: {path} ({DATA_HINT})")
    return path


def readable(read: Callable[..., T]) -> Callable[..., T]:
    """A benchmark reader whose undecodable file is one line naming it, not a ``UnicodeDecodeError``."""
    @functools.wraps(read)
    def wrapped(path: Path, *args, **kwargs) -> T:
        try:
            return read(path, *args, **kwargs)
        except UnicodeDecodeError as err:
            raise TaskError(f"{path}: cannot decode byte {err.start} as {err.encoding} ({err.reason}); "
                            "the file is damaged or in another encoding") from None
    return wrapped


@readable
def read_glue_tsv(path: Path) -> list[tuple[str, int]]:
    """``(sentence, label)`` rows of a GLUE TSV with a ``sentence\\tlabel`` header.

    GLUE sentences contain bare quote characters, so quoting is switched off (QUOTE_NONE).
    """
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        missing = {"sentence", "label"} - set(reader.fieldnames or ())
        if missing:
            raise TaskError(f"{path}: expected columns sentence and label, found {reader.fieldnames}")
        return [(row["sentence"].strip(), _int_label(row["label"], path, reader.line_num)) for row in reader]


@readable
def read_label_lines(path: Path, encoding: str = "utf-8") -> list[tuple[str, int]]:
    """``(sentence, label)`` rows of a "<label> <sentence>" text file (SST-5, MR, CR).

    Lines are split on ``\\n`` only: MR is Latin-1 and byte 0x85 decodes to U+0085 (NEL),
    which ``str.splitlines`` would wrongly treat as a line break inside a sentence.
    """
    rows = []
    with path.open(encoding=encoding, newline="") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            label, _, sentence = line.strip().partition(" ")
            rows.append((sentence.strip(), _int_label(label, path, line_no)))
    return rows


def _int_label(value: str, path: Path, line_no: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise TaskError(f"{path}: line {line_no}: label {value!r} is not an integer") from None


@readable
def read_mmlu_csv(path: Path) -> list[tuple[str, tuple[str, str, str, str], int]]:
    """``(question, (A, B, C, D), answer index)`` rows of a headerless MMLU CSV.

    Read with the csv module so an option that is the literal text "None" stays text.
    """
    rows = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise TaskError(f"{path}: line {reader.line_num}: expected question,A,B,C,D,answer(A-D)")
            options = (row[1], row[2], row[3], row[4])
            rows.append((row[0], options, "ABCD".index(row[5].strip())))
    return rows


@readable
def read_bbh(path: Path) -> list[tuple[str, str]]:
    """``(input, target)`` pairs of a BIG-Bench Hard task file."""
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return [(ex["input"], ex["target"]) for ex in data["examples"]]


@readable
def read_bbh_description(path: Path) -> str:
    """The one-line task description that opens a BBH chain-of-thought prompt file.

    The file is a canary line, a ``-----`` rule, the description, then worked examples.
    """
    lines = path.read_text(encoding="utf-8").split("\n")
    after_rule = lines[lines.index("-----") + 1 :] if "-----" in lines else lines
    line = next((ln.strip() for ln in after_rule if ln.strip()), "")
    return line.removeprefix("Task description:").strip()  # one file (temporal_sequences) labels it


def table_format(path: Path, format: str) -> str:
    """The table format to parse ``path`` with: ``format`` itself, or guessed from the suffix."""
    if format != "auto":
        if format not in ("csv", "tsv", "jsonl"):
            raise TaskError(f"unknown table format {format!r}; expected auto, csv, tsv or jsonl")
        return format
    suffixes = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
    if path.suffix.lower() not in suffixes:
        raise TaskError(f"cannot tell the format of {path} from its suffix; set format=csv, tsv or jsonl")
    return suffixes[path.suffix.lower()]


def read_table(path_str: str, format: str = "auto", encoding: str = "utf-8") -> list[tuple[int, dict]]:
    """``(line number, row)`` pairs of a user's CSV, TSV (with a header row) or JSONL file.

    Raises:
        TaskError: the file is missing, undecodable, empty, or a JSONL line is not an object.
    """
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise TaskError(f"table file not found: {path}")
    kind = table_format(path, format)
    try:
        rows = _read_jsonl(path, encoding) if kind == "jsonl" else _read_delimited(path, kind, encoding)
    except UnicodeDecodeError as err:
        raise TaskError(f"{path} is not valid {encoding} ({err.reason}); set encoding=latin-1 or similar") from None
    if not rows:
        raise TaskError(f"{path} has no data rows")
    return rows


def _without_bom(encoding: str) -> str:
    """utf-8-sig for any name of utf-8: it drops the byte-order mark spreadsheet exports put before
    the first column name. An unknown encoding is left for ``open`` to refuse."""
    try:
        return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
    except LookupError:
        return encoding


def _read_delimited(path: Path, kind: str, encoding: str) -> list[tuple[int, dict]]:
    with path.open(encoding=_without_bom(encoding), newline="") as f:
        # TSV text often holds bare quote characters (as GLUE's does): no quoting there.
        tsv = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if kind == "tsv" else {}
        reader = csv.DictReader(f, **tsv)
        rows = [(reader.line_num, row) for row in reader]
        if reader.fieldnames is None:
            raise TaskError(f"{path} is empty")
    return rows


def _read_jsonl(path: Path, encoding: str) -> list[tuple[int, dict]]:
    rows = []
    with path.open(encoding=_without_bom(encoding)) as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}: line {line_no} is not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise TaskError(f"{path}: line {line_no} is a JSON {type(row).__name__}, expected an object")
            rows.append((line_no, row))
    return rows


def check_columns(path: str, rows: Sequence[tuple[int, dict]], needed: Sequence[str]) -> None:
    """Fail with the list of existing columns if any ``needed`` column is absent."""
    columns = list(rows[0][1])
    for line_no, row in rows:
        missing = [c for c in needed if c not in row]
        if missing:
            where = "" if list(row) == columns else f" at line {line_no}"
            raise TaskError(f"{path}: column(s) {missing} not found{where}; columns are {list(row)}")


def check_split_files(dev_path: str | None, test_path: str | None) -> None:
    """A user's table comes as one file split by seed, or as train, dev and test files: not two of them."""
    if (dev_path is None) != (test_path is None):
        raise TaskError("give both dev_path and test_path (separate split files), or neither (one file split by seed)")


def table_rows(path: str, columns: Sequence[str], make: Callable[[dict, str, int], T], format: str,
               encoding: str) -> list[T]:
    """``make(row, path, line number)`` for every row of a user's table, its columns checked first."""
    rows = read_table(path, format, encoding)
    check_columns(path, rows, columns)
    return [make(row, path, line_no) for line_no, row in rows]


def table_splits(
    train: Sequence[T], load: Callable[[str], Sequence[T]], path: str, dev_path: str | None, test_path: str | None,
    sizes: Sequence[int], seed: int,
) -> list[tuple[T, ...]]:
    """Train, dev and test of a user's table: ``train`` (the rows of ``path``) split by ``seed``, or,
    with split files, each drawn from its own file (``load`` reads one; a size of 0 takes it all)."""
    n_train, n_dev, n_test = sizes
    if dev_path is None:
        return seeded_split(train, [n_train, n_dev, n_test or None], seed, path)
    return [draw(rows, n, seed, f) for rows, n, f in
            ((train, n_train, path), (load(dev_path), n_dev, dev_path), (load(test_path), n_test, test_path))]


def seeded_split(
    items: Sequence[T], sizes: Sequence[int | None], seed: int, what: str
) -> list[tuple[T, ...]]:
    """Disjoint random splits of ``items`` of the given sizes, reproducible from ``seed``.

    Args:
        items: the pool to split.
        sizes: one size per split; ``None`` (last place only) means "all remaining items".
        seed: seeds ``np.random.default_rng``; the same seed always gives the same splits.
        what: names the pool in error messages, e.g. ``"sst2/glue/train.tsv"``.

    Returns:
        One tuple per size, each in the pool's original order (only membership is random).

    Raises:
        TaskError: a size is negative, or the pool is too small for the sizes.
    """
    fixed = [n for n in sizes if n is not None]
    if any(n < 0 for n in fixed):
        raise TaskError(f"{what}: split sizes must be >= 0, got {list(sizes)}")
    if sum(fixed) > len(items):
        raise TaskError(f"{what}: too few rows ({len(items)}) for split sizes {list(sizes)}")
    counts = [len(items) - sum(fixed) if n is None else n for n in sizes]
    order = np.random.default_rng(seed).permutation(len(items))
    bounds = np.cumsum([0, *counts])
    return [tuple(items[i] for i in sorted(order[a:b])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def draw(items: Sequence[T], n: int, seed: int, what: str) -> tuple[T, ...]:
    """``n`` items drawn without replacement from ``seed`` (all of them when ``n`` is 0)."""
    return tuple(items) if n == 0 else seeded_split(items, [n], seed, what)[0]


def require_splits(splits: Sequence[Sequence[T]], where: str) -> None:
    """Fail when one of the (train, dev, test) splits a method needs came out empty."""
    for name, split in zip(("train", "dev", "test"), splits, strict=True):
        if not split:
            raise TaskError(f"{where}: the {name} split is empty; set n_{name} >= 1 (or add rows)")


def sst2_from_hub() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """SST-2 ``(train, validation)`` rows from the Hugging Face hub (needs a network).

    ``datasets`` is imported here, not at module level, so offline use never touches it.
    """
    try:
        import datasets
    except ImportError:
        raise TaskError("hub_fallback needs the `datasets` package (pip install datasets)") from None
    try:  # the canonical SST-2 repo; GLUE's copy has the same sentences and labels
        ds = datasets.load_dataset("stanfordnlp/sst2")
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one readable line
        raise TaskError(f"could not load stanfordnlp/sst2 from the hub: {err}") from None
    return (
        [(r["sentence"].strip(), int(r["label"])) for r in ds["train"]],
        [(r["sentence"].strip(), int(r["label"])) for r in ds["validation"]],
    )


def label_ids(label_words: Sequence[str], labels: Sequence[object] | None) -> dict[str, int]:
    """Raw label value (as stripped text) -> label id, for a user's table.

    With ``labels`` the i-th raw value is label i. Without, a value may be a label word
    (stripped) or an integer id ``0..k-1``; words win if both could match.
    """
    if len(label_words) < 2:
        raise TaskError(f"label_words must be 2 or more distinct strings, got {list(label_words)}")
    check_label_words(label_words, "label_words")
    if labels is not None:
        raw = [str(v).strip() for v in labels]
        if len(raw) != len(label_words) or len(set(raw)) != len(raw):
            raise TaskError(f"labels {raw} must be {len(label_words)} distinct values, one per label word")
        return {v: i for i, v in enumerate(raw)}
    ids = {w.strip(): i for i, w in enumerate(label_words)}
    for i in range(len(label_words)):
        ids.setdefault(str(i), i)
    return ids


def cell(row: dict, column: str, path: str, line_no: int) -> str:
    """The text in ``column`` of a table row; a short CSV row or a JSON null is an error."""
    value = row[column]
    if value is None:
        raise TaskError(f"{path}: line {line_no}: no value for column {column!r}")
    return value if isinstance(value, str) else str(value)


def row_label(row: dict, column: str, ids: dict[str, int], path: str, line_no: int) -> int:
    """The label id of a table row, or a TaskError that shows the bad value and its line."""
    value = cell(row, column, path, line_no).strip()
    if value not in ids:
        raise TaskError(f"{path}: line {line_no}: label {value!r} is not one of {list(ids)}")
    return ids[value]


# Characters str.format would read as attribute access, indexing or a format spec.
_BAD_FIELD_CHARS = set(".[]{}:!")


def table_example(row: dict, fields: Sequence[str], label_field: str, ids: dict, path: str, line_no: int) -> Example:
    """One Example from a table row: the text fields as inputs, the label mapped to its id."""
    inputs = {f: cell(row, f, path, line_no) for f in fields}
    return Example(inputs=inputs, label=row_label(row, label_field, ids, path, line_no))


def table_fields(text_fields: Sequence[str] | str, label_field: str) -> list[str]:
    """The text columns as a list, checked to be usable as ``str.format`` fields."""
    fields = [text_fields] if isinstance(text_fields, str) else list(text_fields)
    if not fields:
        raise TaskError("text_fields is empty; name at least one column to put in the prompt")
    if label_field in fields:
        raise TaskError(f"text_fields includes the label column {label_field!r}: the gold label would be in "
                        "the prompt; remove it from text_fields")
    for f in [*fields, label_field]:
        if not f or f == "instruction" or _BAD_FIELD_CHARS & set(f):
            raise TaskError(f"column name {f!r} cannot be a template field; rename the column")
    return fields


def check_template(template: str, fields: Sequence[str]) -> None:
    """Fail if the template is malformed or uses a field that is not a text column."""
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f}
    except ValueError as err:
        raise TaskError(f"template is not a valid format string: {err}") from None
    unknown = sorted(used - set(fields) - {"instruction"})
    if unknown:
        raise TaskError(f"template uses {unknown} which are not in text_fields {list(fields)}")


def named_file(data_dir: str, parts: Sequence[str], listing: Sequence[str], kind: str) -> Path:
    """``data_file(data_dir, *parts)`` for a file named after a task; when it is missing, the error
    lists the task names there are (the ``.json`` stems in the ``listing`` folder)."""
    try:
        return data_file(data_dir, *parts)
    except TaskError as err:
        folder = Path(data_dir, *listing)
        if not folder.is_dir():
            raise
        known = sorted(p.stem for p in folder.glob("*.json"))
        raise TaskError(f"{err}; known {kind}: {', '.join(known)}") from None


def bbh_path(data_dir: str, task_name: str) -> Path:
    """The JSON file of a BBH task; an unknown name lists the known ones."""
    return named_file(data_dir, ("bbh", "bbh", f"{task_name}.json"), ("bbh", "bbh"), "bbh tasks")


def bbh_examples(
    task_name: str, rows: Sequence[tuple[str, str]], max_labels: int, min_count: int
) -> tuple[tuple[str, ...], list[Example]]:
    """The verbalizer and examples of a BBH task whose answers come from a fixed set.

    Option-letter tasks (targets like ``"(B)"``): each example's choices are the option
    letters listed in its input (``" (A)"``, ``" (B)"``, ...), since the number of options
    varies within a task; the verbalizer is their union. Other tasks: the distinct targets,
    sorted, when there are at most ``max_labels``. Examples whose target is not one of
    their options, or seen fewer than ``min_count`` times, are annotation slips and dropped
    (at most 5% of a task, else it counts as free-form).

    Raises:
        TaskError: the task's answers are free-form (word_sorting, object_counting, ...).
    """
    letter_targets = sum(bool(_LETTER.fullmatch(t)) for _, t in rows)
    if letter_targets >= 0.95 * len(rows):
        verbalizer, examples = _bbh_option_examples(rows)
    else:
        verbalizer, examples = _bbh_label_examples(rows, max_labels, min_count)
    if len(verbalizer) < 2 or len(examples) < 0.95 * len(rows):
        distinct = list(Counter(t for _, t in rows))
        raise TaskError(
            f"bbh task {task_name!r} has free-form targets ({len(distinct)} distinct, e.g. {distinct[:3]}); "
            f"only tasks with 2..{max_labels} fixed answers or lettered options are supported"
        )
    return verbalizer, examples


_LETTER = re.compile(r"\(([A-Z])\)")
_OPTION_LINE = re.compile(r"^\(([A-Z])\)", re.MULTILINE)


def _bbh_option_examples(rows: Sequence[tuple[str, str]]) -> tuple[tuple[str, ...], list[Example]]:
    examples, seen = [], set()
    for text, target in rows:
        letters = _OPTION_LINE.findall(text)
        match = _LETTER.fullmatch(target)
        # Drops a target written as option text, and an input cut off after its first option.
        if match is None or match.group(1) not in letters or len(letters) < 2:
            continue
        seen.update(letters)
        choices = tuple(f" ({x})" for x in letters)
        examples.append(Example(inputs={"input": text}, label=letters.index(match.group(1)), choices=choices))
    verbalizer = tuple(f" ({x})" for x in sorted(seen))
    # Examples offering every option use the verbalizer, so label-word methods see the common case.
    examples = [replace(ex, choices=None) if ex.choices == verbalizer else ex for ex in examples]
    return verbalizer, examples


def _bbh_label_examples(
    rows: Sequence[tuple[str, str]], max_labels: int, min_count: int
) -> tuple[tuple[str, ...], list[Example]]:
    counts = Counter(t for _, t in rows)
    labels = sorted(t for t, c in counts.items() if c >= min_count)
    if len(labels) > max_labels:
        return (), []
    examples = [Example(inputs={"input": x}, label=labels.index(t)) for x, t in rows if t in labels]
    return tuple(" " + t for t in labels), examples


def mmlu_subjects(data_dir: str, subjects: Sequence[str] | str | None) -> list[str]:
    """The chosen subject names, checked against the test files present."""
    folder = data_file(data_dir, "mmlu", "data", "test")
    known = sorted(p.name[: -len("_test.csv")] for p in folder.glob("*_test.csv"))
    if not known:
        raise TaskError(f"no MMLU subjects found in {folder}")
    chosen = [subjects] if isinstance(subjects, str) else list(known if subjects is None else subjects)
    if not chosen:
        raise TaskError("mmlu subjects is an empty list; use null for all subjects")
    for name in chosen:
        if name not in known:
            near = difflib.get_close_matches(name, known, n=3)
            raise TaskError(f"unknown mmlu subject {name!r}; did you mean {near or known[:5]}?")
    return chosen
