"""Benchmark loaders on the real data directory, the user-table task on files in tmp_path,
and every ``conf/task`` YAML built through Hydra."""

from __future__ import annotations

import json
import sys
import types
from collections import Counter
from pathlib import Path

import pytest

from tasks import loaders
from tasks.core import Example, Task, TaskError
from tasks.generative import GenTask
from tasks.sources import seeded_split

ROOT = Path(__file__).resolve().parents[1]
CONF_TASK = ROOT / "conf" / "task"


@pytest.fixture(scope="session")
def mmlu_all(data_dir) -> Task:
    return loaders.mmlu(data_dir)


def ids(examples) -> set[int]:
    """Object identities: meaningful only where each row's Example is built once, before splitting
    (the table loader); benchmark loaders build a split's Examples afresh, so compare :func:`inputs`."""
    return {id(e) for e in examples}


def inputs(examples) -> set[tuple]:
    """What each example shows the model: equal for two draws of the same row."""
    return {tuple(sorted(e.inputs.items())) for e in examples}


def texts(task: Task, split: str) -> list[str]:
    return [task.render("", e) for e in task.split(split)]


# ------------------------------------------------------------------ splitting


def test_seeded_split_is_disjoint_deterministic_and_seed_dependent():
    items = list(range(100))
    a = seeded_split(items, [10, 20, None], seed=3, what="pool")
    assert [len(s) for s in a] == [10, 20, 70]
    assert sorted(a[0] + a[1] + a[2]) == items
    assert all(list(s) == sorted(s) for s in a)  # file order kept within a split
    assert seeded_split(items, [10, 20, None], seed=3, what="pool") == a
    assert seeded_split(items, [10, 20, None], seed=4, what="pool")[0] != a[0]


def test_seeded_split_errors():
    with pytest.raises(TaskError, match=r"pool: too few rows \(5\)"):
        seeded_split(range(5), [3, 3], seed=0, what="pool")
    with pytest.raises(TaskError, match=">= 0"):
        seeded_split(range(5), [-1, 2], seed=0, what="pool")


# ------------------------------------------------------------------ sentence tasks


def test_sst2_counts_and_format(data_dir):
    task = loaders.sst2(data_dir)
    assert (len(task.train), len(task.dev), len(task.test)) == (200, 100, 872)
    assert Counter(e.label for e in task.test) == {1: 444, 0: 428}
    assert 0.3 < sum(e.label for e in task.train) / 200 < 0.75  # train pool is 56% positive
    assert task.verbalizer == (" negative", " positive")
    first = task.render(task.instruction, task.test[0])
    assert first == (
        "Classify the sentiment of the movie review as positive or negative.\n\n"
        "Review: it 's a charming and often affecting journey .\nSentiment:"
    )


def test_sst2_splits_disjoint_deterministic_per_seed(data_dir):
    a, b, c = (loaders.sst2(data_dir, n_train=50, n_dev=30, seed=s) for s in (0, 0, 1))
    assert len(inputs(a.train)) == 50 and len(inputs(a.dev)) == 30  # no sentence drawn twice
    assert not inputs(a.train) & inputs(a.dev)
    assert texts(a, "train") == texts(b, "train") and texts(a, "dev") == texts(b, "dev")
    assert texts(a, "train") != texts(c, "train")
    assert len(loaders.sst2(data_dir, n_test=100).test) == 100


def test_sst5_mr_cr_counts_and_labels(data_dir):
    sst5 = loaders.sst5(data_dir)
    assert len(sst5.test) == 2210 and set(Counter(e.label for e in sst5.test)) == {0, 1, 2, 3, 4}
    mr = loaders.mr(data_dir, n_train=100, n_dev=50)
    every = mr.train + mr.dev + mr.test
    assert len(every) == 10662 and Counter(e.label for e in every) == {0: 5331, 1: 5331}
    # Latin-1: accented words survive, and U+0085 never splits a line (count above stays exact).
    assert any("é" in e.inputs["sentence"] for e in every)
    cr = loaders.cr(data_dir, n_train=100, n_dev=50, n_test=1000, seed=2)
    assert (len(cr.train), len(cr.dev), len(cr.test)) == (100, 50, 1000)
    assert not inputs(cr.train) & inputs(cr.test) and not inputs(cr.dev) & inputs(cr.test)
    assert not inputs(cr.train) & inputs(cr.dev)
    assert {e.label for e in cr.test} == {0, 1}


def test_empty_split_is_refused(data_dir):
    with pytest.raises(TaskError, match="the dev split is empty"):
        loaders.mr(data_dir, n_dev=0)


def test_missing_data_dir_and_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(TaskError, match=f"data directory not found: {missing}.*PROMPTSWEEP_DATA"):
        loaders.sst2(str(missing))
    with pytest.raises(TaskError, match=r"data file not found: .*sst2/glue/train.tsv"):
        loaders.sst2(str(tmp_path))


def test_sst2_hub_fallback_uses_datasets_only_when_asked(tmp_path, monkeypatch):
    rows = [{"sentence": f"s{i} ", "label": i % 2} for i in range(40)]
    calls = []

    def load_dataset(*args):
        calls.append(args)
        return {"train": rows, "validation": rows[:10]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(TaskError, match="data file not found"):
        loaders.sst2(str(tmp_path), n_train=5, n_dev=5)
    assert calls == []
    task = loaders.sst2(str(tmp_path), n_train=5, n_dev=5, hub_fallback=True)
    assert calls == [("stanfordnlp/sst2",)]
    assert len(task.test) == 10 and task.test[0].inputs["sentence"] == "s0"


# ------------------------------------------------------------------ BBH


def test_bbh_binary_tasks(data_dir):
    sports = loaders.bbh(data_dir, "sports_understanding")
    assert sports.verbalizer == (" no", " yes")
    assert (len(sports.train), len(sports.dev), len(sports.test)) == (50, 50, 150)
    assert sports.instruction.startswith("Determine whether an artificially constructed sentence")
    assert sports.render("I", sports.train[0]).startswith('I\n\nQ: Is the following sentence plausible? "')
    assert sports.render("I", sports.train[0]).endswith('"\nA:')
    for name, words in [("navigate", (" No", " Yes")), ("web_of_lies", (" No", " Yes")),
                        ("formal_fallacies", (" invalid", " valid")),
                        ("boolean_expressions", (" False", " True"))]:
        assert loaders.bbh(data_dir, name, n_train=5, n_dev=5).verbalizer == words


def test_bbh_lettered_options_follow_each_example(data_dir):
    task = loaders.bbh(data_dir, "date_understanding", n_train=5, n_dev=5)
    assert task.verbalizer == tuple(f" ({x})" for x in "ABCDEF")
    every = task.train + task.dev + task.test
    five = [e for e in every if e.choices is not None]
    assert len(five) == 38 and all(e.choices == task.verbalizer[:5] for e in five)
    raw = json.loads(Path(data_dir, "bbh", "bbh", "date_understanding.json").read_text())["examples"]
    gold = {ex["input"]: ex["target"] for ex in raw}
    assert all(task.choices(e)[e.label] == " " + gold[e.inputs["input"]] for e in every)
    # one target written as option text instead of a letter: dropped
    movies = loaders.bbh(data_dir, "movie_recommendation")
    assert len(movies.train + movies.dev + movies.test) == 249
    # one input cut off after its first option: dropped (a single choice would always be right)
    snarks = loaders.bbh(data_dir, "snarks")
    assert len(snarks.train + snarks.dev + snarks.test) == 177


def test_bbh_refuses_free_form_and_unknown_tasks(data_dir):
    for name in ("word_sorting", "object_counting", "multistep_arithmetic_two"):
        with pytest.raises(TaskError, match=f"bbh task '{name}' has free-form targets"):
            loaders.bbh(data_dir, name)
    with pytest.raises(TaskError, match="known bbh tasks: .*sports_understanding"):
        loaders.bbh(data_dir, "sport_understanding")


# ------------------------------------------------------------------ MMLU


def test_mmlu_counts_and_groups(mmlu_all):
    assert (len(mmlu_all.train), len(mmlu_all.dev), len(mmlu_all.test)) == (285, 1531, 14042)
    per_subject = Counter(e.group for e in mmlu_all.test)
    assert len(per_subject) == 57
    assert per_subject["abstract_algebra"] == 100 and per_subject["high_school_geography"] == 198
    assert set(Counter(e.label for e in mmlu_all.test)) == {0, 1, 2, 3}


def test_mmlu_letter_prompt_exact(data_dir):
    task = loaders.mmlu(data_dir, ["abstract_algebra"], k_shot=1, n_val=0)
    assert len(task.test) == 100 and len(task.dev) == 11 and task.verbalizer == (" A", " B", " C", " D")
    assert task.render("INSTR", task.dev[0]) == (
        "INSTR\n\n"
        "The following are multiple choice questions (with answers) about abstract algebra.\n\n"
        "Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\nA. 0\nB. 1\nC. 2\nD. 3\nAnswer: B\n\n"
        "The cyclic subgroup of Z_24 generated by 18 has order\nA. 4\nB. 8\nC. 12\nD. 6\nAnswer:"
    )
    assert task.dev[0].label == 0 and task.dev[0].group == "abstract_algebra"


def write_toy_mmlu(root: Path) -> None:
    rows = {
        "dev": [
            ["Q1?", "a", "b", "None", "d", "C"],  # the literal option text "None" stays text
            ["Q2?", "w", "x", "y", "z", "A"],
            ["Q3?", "1", "2", "3", "4", "D"],
        ],
        "val": [["V1, with comma?", "p", "q", "r", "s", "B"]],
        "test": [["T1?", "e", "f", "g", "h", "D"], ["T2?", "i", "j", "k", "l", "A"]],
    }
    for split, content in rows.items():
        folder = root / "mmlu" / "data" / split
        folder.mkdir(parents=True)
        lines = [",".join(f'"{c}"' if "," in c else c for c in row) for row in content]
        (folder / f"toy_subject_{split}.csv").write_text("\n".join(lines) + "\n")


def test_mmlu_toy_letter_and_cloze_exact(tmp_path):
    write_toy_mmlu(tmp_path)
    letter = loaders.mmlu(str(tmp_path), k_shot=2, instruction="Be careful.")
    shots = "Q1?\nA. a\nB. b\nC. None\nD. d\nAnswer: C\n\nQ2?\nA. w\nB. x\nC. y\nD. z\nAnswer: A\n\n"
    header = "The following are multiple choice questions (with answers) about toy subject.\n\n"
    assert letter.render(letter.instruction, letter.dev[0]) == (
        f"Be careful.\n\n{header}{shots}V1, with comma?\nA. p\nB. q\nC. r\nD. s\nAnswer:"
    )
    # train is the shot pool itself, and an example never sees itself as a shot
    assert [e.inputs["question"] for e in letter.train] == ["Q1?", "Q2?", "Q3?"]
    assert "Q1?" not in letter.train[0].inputs["shots"] and "Q2?\n" in letter.train[0].inputs["shots"]
    cloze = loaders.mmlu(str(tmp_path), form="cloze", k_shot=2)
    assert cloze.length_normalize and not letter.length_normalize
    assert cloze.test[0].choices == (" e", " f", " g", " h") and cloze.test[0].label == 3
    assert cloze.render("", cloze.test[1]) == f"{header}Q1?\nAnswer: None\n\nQ2?\nAnswer: w\n\nT2?\nAnswer:"
    assert cloze.choices(cloze.test[1])[cloze.test[1].label] == " i"


def test_mmlu_argument_errors(tmp_path):
    write_toy_mmlu(tmp_path)
    with pytest.raises(TaskError, match="unknown mmlu subject 'toy_subjects'; did you mean \\['toy_subject'\\]"):
        loaders.mmlu(str(tmp_path), ["toy_subjects"])
    with pytest.raises(TaskError, match="unknown mmlu form"):
        loaders.mmlu(str(tmp_path), form="letters")
    with pytest.raises(TaskError, match="k_shot"):
        loaders.mmlu(str(tmp_path), k_shot=6)


def test_group_scores(data_dir):
    task = loaders.mmlu(data_dir, ["marketing", "world_religions"], k_shot=0, n_test=60, seed=1)
    gold = [e.label for e in task.test]
    assert loaders.group_scores(task, task.test, gold) == {"marketing": 1.0, "world_religions": 1.0}
    wrong_on_marketing = [(y + 1) % 4 if e.group == "marketing" else y for e, y in zip(task.test, gold, strict=True)]
    assert loaders.group_scores(task, task.test, wrong_on_marketing) == {"marketing": 0.0, "world_religions": 1.0}
    with pytest.raises(TaskError, match="predictions for"):
        loaders.group_scores(task, task.test, gold[:-1])


def test_group_scores_mixed_accuracy():
    task = Task("t", "{instruction}{x}", (" a", " b"), "", (), (), ())
    examples = [Example({"x": ""}, label=y, group=g) for y, g in [(0, "p"), (1, "p"), (0, "q"), (1, "q")]]
    assert loaders.group_scores(task, examples, [0, 0, 0, 1]) == {"p": 0.5, "q": 1.0}


# ------------------------------------------------------------------ user tables

CSV_ROWS = [("great fun", "pos"), ("dull, slow", "neg"), ('"quoted" line', "pos"), ("meh", "neg")] * 5


def write_csv(path: Path, rows=CSV_ROWS, header="review,sentiment") -> Path:
    lines = [header] + ['"' + t.replace('"', '""') + f'",{y}' for t, y in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def table(path, **kw) -> Task:
    args = dict(text_fields=["review"], label_field="sentiment", label_words=[" negative", " positive"],
                labels=["neg", "pos"], n_train=4, n_dev=4)
    return loaders.table(str(path), **{**args, **kw})


def test_table_csv(tmp_path):
    task = table(write_csv(tmp_path / "r.csv"), seed=5)
    assert (len(task.train), len(task.dev), len(task.test)) == (4, 4, 12)
    assert task.template == "{instruction}\n\nReview: {review}\nAnswer:"
    assert task.instruction == "Classify the text as one of: negative, positive."
    every = task.train + task.dev + task.test
    assert Counter(e.label for e in every) == {0: 10, 1: 10}
    assert {e.inputs["review"] for e in every} == {"great fun", "dull, slow", '"quoted" line', "meh"}
    assert all(e.label == (e.inputs["review"] in ("great fun", '"quoted" line')) for e in every)
    again = table(write_csv(tmp_path / "r.csv"), seed=5)
    assert [e.inputs for e in again.dev] == [e.inputs for e in task.dev]
    assert not ids(task.train) & ids(task.dev)


def test_table_reads_separate_split_files(tmp_path):
    train = write_csv(tmp_path / "train.csv", [("great fun", "pos"), ("dull, slow", "neg")] * 3)
    dev = write_csv(tmp_path / "dev.csv", [("fine", "pos"), ("bad", "neg")])
    test = write_csv(tmp_path / "test.csv", [("lovely", "pos"), ("awful", "neg"), ("grim", "neg")])
    task = table(train, n_train=0, n_dev=0, dev_path=str(dev), test_path=str(test))
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 2, 3)
    assert [e.inputs["review"] for e in task.test] == ["lovely", "awful", "grim"]
    assert [e.label for e in task.test] == [1, 0, 0]
    with pytest.raises(TaskError, match="both dev_path and test_path"):
        table(train, test_path=str(test))


def test_table_jsonl_labels_as_ids_or_words(tmp_path):
    rows = [{"q": f"question {i}", "ctx": "c", "y": i % 3} for i in range(12)]
    words = [" A", " B", " C"]
    task = loaders.table(str(write_jsonl(tmp_path / "t.jsonl", rows)), ["q", "ctx"], "y", words, n_train=3, n_dev=3)
    assert task.template == "{instruction}\n\nQ: {q}\nCtx: {ctx}\nAnswer:"
    assert all(int(e.inputs["q"].split()[1]) % 3 == e.label for e in task.train + task.dev + task.test)
    by_word = [{"text": "x", "label": "yes" if i % 2 else "no"} for i in range(10)]
    task = loaders.table(str(write_jsonl(tmp_path / "w.jsonl", by_word)), ["text"], "label", [" no", " yes"],
                         n_train=2, n_dev=2, template="{instruction} {text} ->", instruction="Say.")
    assert task.render(task.instruction, task.test[0]) == "Say. x ->"
    assert Counter(e.label for e in task.train + task.dev + task.test) == {0: 5, 1: 5}


def test_table_tsv_by_format_argument(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("text\tlabel\n" + "".join(f'he said "hi {i}\tpositive\n' for i in range(6)) + "sad\tnegative\n")
    task = loaders.table(str(path), ["text"], "label", ["negative", "positive"], n_train=2, n_dev=2, format="tsv")
    assert len(task.test) == 3 and any(e.inputs["text"] == 'he said "hi 0' for e in task.train + task.dev + task.test)
    with pytest.raises(TaskError, match="cannot tell the format of .*data.txt.*set format="):
        loaders.table(str(path), ["text"], "label", ["negative", "positive"])


@pytest.mark.parametrize(
    "make, kwargs, message",
    [
        (lambda d: d / "absent.csv", {}, "table file not found: .*absent.csv"),
        (lambda d: write_csv(d / "a.csv"), {"text_fields": ["text"]},
         r"column\(s\) \['text'\] not found; columns are \['review', 'sentiment'\]"),
        (lambda d: write_csv(d / "a.csv", CSV_ROWS[:3] + [("odd", "neutral")] + CSV_ROWS[:16]), {},
         r"a.csv: line 5: label 'neutral' is not one of \['neg', 'pos'\]"),
        (lambda d: write_csv(d / "a.csv"), {"labels": None}, r"label 'pos' is not one of \['negative', 'positive'"),
        (lambda d: write_jsonl(d / "a.jsonl", []), {}, "a.jsonl has no data rows"),
        (lambda d: write_csv(d / "a.csv", []), {}, "a.csv has no data rows"),
        (lambda d: write_text(d / "a.csv", ""), {}, "a.csv is empty"),
        (lambda d: write_jsonl(d / "a.jsonl", [{"review": "x", "sentiment": "pos"}, "{oops"]), {},
         "a.jsonl: line 2 is not valid JSON"),
        (lambda d: write_jsonl(d / "a.jsonl", [[1, 2]]), {}, "line 1 is a JSON list, expected an object"),
        (lambda d: write_jsonl(d / "a.jsonl", [{"review": "x", "sentiment": "pos"}, {"review": "y"}]), {},
         r"column\(s\) \['sentiment'\] not found at line 2"),
        (lambda d: write_csv(d / "a.csv"), {"n_train": 15, "n_dev": 5}, "the test split is empty"),
        (lambda d: write_csv(d / "a.csv"), {"n_train": 15, "n_dev": 10}, r"too few rows \(20\)"),
        (lambda d: write_csv(d / "a.csv"), {"n_dev": 0}, "the dev split is empty"),
        (lambda d: write_csv(d / "a.csv"), {"template": "{instruction} {text}"}, r"template uses \['text'\]"),
        (lambda d: write_csv(d / "a.csv"), {"labels": ["neg"]}, "must be 2 distinct values"),
        (lambda d: write_csv(d / "a.csv", header="re.view,sentiment"), {"text_fields": ["re.view"]},
         "cannot be a template field"),
    ],
)
def test_table_errors_are_one_line_task_errors(tmp_path, make, kwargs, message):
    path = make(tmp_path)
    with pytest.raises(TaskError, match=message) as err:
        table(path, **kwargs)
    assert "\n" not in str(err.value)


def test_table_rejects_undecodable_text(tmp_path):
    path = tmp_path / "l1.csv"
    path.write_bytes("review,sentiment\n".encode() + "caf\xe9,pos\nthé,neg\n".encode("latin-1") * 12)
    with pytest.raises(TaskError, match="not valid utf-8.*encoding=latin-1"):
        table(path)
    assert table(path, encoding="latin-1").train[0].inputs["review"] == "café"


# ------------------------------------------------------------------ configs


def task_yamls() -> list[str]:
    return sorted(p.stem for p in CONF_TASK.glob("*.yaml"))


def test_every_task_yaml_names_its_command():
    assert {"sst2", "mmlu", "mmlu_cpu", "mmlu_cloze", "sst5", "mr", "cr", "bbh_sports", "custom"} <= set(task_yamls())
    for name in task_yamls():
        first = (CONF_TASK / f"{name}.yaml").read_text().splitlines()[0]
        assert first.startswith("# python -m pipelines.run") and f"task={name}" in first


# Cheap overrides per config so instantiating all of them takes about a second.
SMALL = {
    "mmlu": ["task.subjects=[marketing,anatomy]", "task.n_val=10", "task.n_test=10"],
    "mmlu_cloze": ["task.subjects=[marketing,anatomy]", "task.n_test=10"],
    "mmlu_cpu": ["task.n_test=10"],
}


@pytest.mark.parametrize("name", task_yamls())
def test_task_yaml_instantiates(name, data_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    overrides = [f"+task={name}", f"+data_dir='{data_dir}'", *SMALL.get(name, [])]
    if name == "custom":
        path = write_jsonl(tmp_path / "mine.jsonl", [{"text": f"t{i}", "label": i % 2} for i in range(300)])
        overrides.append(f"task.path='{path}'")
    elif name == "custom_gen":
        path = write_jsonl(tmp_path / "mine.jsonl", [{"input": f"t{i}", "output": f"o{i}"} for i in range(300)])
        overrides.append(f"task.path='{path}'")
    elif "n_train" in (CONF_TASK / f"{name}.yaml").read_text() and not name.startswith("bbh"):
        overrides += ["task.n_train=8", "task.n_dev=8"]
    with initialize_config_dir(config_dir=str(CONF_TASK.parent), version_base="1.3"):
        cfg = compose(overrides=overrides)
    task = instantiate(cfg.task)
    assert isinstance(task, (Task, GenTask)) and task.train and task.dev and task.test
    rendered = task.render("INSTRUCTION", task.test[0])
    # the instruction leads, except where a generative task puts it at the start of the answer
    assert rendered.splitlines()[0].endswith("INSTRUCTION") or rendered.endswith("A: INSTRUCTION")
    if name == "mmlu_cpu":
        assert {e.group for e in task.dev} == {
            "abstract_algebra", "high_school_geography", "marketing", "us_foreign_policy", "world_religions"
        }
        assert len(task.dev) == 88
    if name == "mmlu_cloze":
        assert task.length_normalize and task.test[0].choices is not None
