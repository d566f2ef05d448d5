"""bench/lm_eval_crosscheck.py helpers: the lm-eval task files and the parsing of its logged samples.

lm-eval itself is not needed: the prompt test assembles the context the way lm-eval's
multiple-choice tasks do (description, then each shot as text + target delimiter + letter
+ few-shot delimiter, then the question) from the written YAML, with Jinja configured as
lm-eval configures it, and compares it with our own letter-form rendering.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import jinja2
import numpy as np
import pytest
import yaml

from tasks.loaders import mmlu

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lm_eval_crosscheck", ROOT / "bench" / "lm_eval_crosscheck.py")
xc = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = xc  # dataclasses look their module up while the class is built
_spec.loader.exec_module(xc)

DEV = [
    [" Leading space, kept as is?", "None", "NA", "0", "1", "B"],
    ["What is 2+2?", "3", "4", "5", "22", "B"],
    ["Quote \"inside\", comma", "a, b", "c", "d", "e", "A"],
    ["Multi\nline question", "x", "y", "z", "w", "D"],
    ["Fifth shot", "p", "q", "r", "s", "C"],
    ["Sixth row, never a shot", "p", "q", "r", "s", "A"],
]
TEST = [["Which {brace} option?", "1.50", "True", "", "04", "C"], ["Last one", "e", "f", "g", "h", "A"]]


def write_csv(path: Path, rows: list[list[str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)


@pytest.fixture()
def data_dir(tmp_path: Path) -> Path:
    for split, rows in (("dev", DEV), ("test", TEST), ("val", TEST)):
        write_csv(tmp_path / "mmlu" / "data" / split / f"high_school_geography_{split}.csv", rows)
    return tmp_path


def lm_eval_context(config: dict, shots: list[dict], doc: dict, n_shots: int) -> str:
    """The plain-text context lm-eval builds for a multiple-choice doc from a task config."""
    env = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    text, target = env.from_string(config["doc_to_text"]), env.from_string(config["doc_to_target"])
    parts = [config["description"]]
    for shot in shots[:n_shots]:
        letter = config["doc_to_choice"][int(target.render(**shot))]
        parts.append(text.render(**shot) + config["target_delimiter"] + letter + config["fewshot_delimiter"])
    return "".join(parts) + text.render(**doc)


@pytest.mark.parametrize("n_shots", [0, 1, 5])
def test_the_written_task_renders_our_letter_prompt_character_for_character(data_dir, tmp_path, n_shots):
    paths = xc.write_tasks(tmp_path / "tasks", data_dir, ["high_school_geography"], n_shots)
    config = yaml.safe_load(paths[0].read_text())
    docs = {split: [dict(zip(xc.COLUMNS, row)) for row in csv.reader(open(config["dataset_kwargs"]["data_files"][split],
                                                                          encoding="utf-8", newline=""))]
            for split in ("dev", "test")}
    task = mmlu(str(data_dir), ["high_school_geography"], k_shot=n_shots)
    ours = [task.render(task.instruction, ex) for ex in task.test]
    theirs = [lm_eval_context(config, docs["dev"], doc, n_shots) for doc in docs["test"]]
    assert theirs == ours
    assert int(config["num_fewshot"]) == n_shots and config["fewshot_config"] == {"sampler": "first_n"}
    assert [int(jinja2.Template(config["doc_to_target"]).render(**d)) for d in docs["test"]] == [ex.label for ex in task.test]


def test_task_files_point_at_the_local_csvs_and_the_group_lists_every_subject(data_dir, tmp_path):
    write_csv(data_dir / "mmlu" / "data" / "dev" / "marketing_dev.csv", DEV)
    write_csv(data_dir / "mmlu" / "data" / "test" / "marketing_test.csv", TEST)
    paths = xc.write_tasks(tmp_path / "tasks", data_dir, ["high_school_geography", "marketing"], 5)
    configs = [yaml.safe_load(p.read_text()) for p in paths]
    files = configs[1]["dataset_kwargs"]["data_files"]
    assert configs[1]["dataset_path"] == "csv" and Path(files["test"]).is_absolute()
    assert Path(files["dev"]) == (data_dir / "mmlu" / "data" / "dev" / "marketing_dev.csv").resolve()
    assert configs[2]["group"] == xc.GROUP
    assert configs[2]["task"] == ["xcheck_mmlu_high_school_geography", "xcheck_mmlu_marketing"]
    assert configs[1]["description"].endswith("about marketing.\n\n")


def test_a_missing_subject_file_fails_in_one_line(data_dir, tmp_path):
    with pytest.raises(SystemExit, match="MMLU file.*not found.*nope_dev.csv"):
        xc.write_tasks(tmp_path / "tasks", data_dir, ["nope"], 5)


def test_the_command_is_offline_capable_and_limits_each_subject():
    cmd = xc.lm_eval_command("lm_eval", Path("/m"), Path("/t"), 5, 50, Path("/o"), 1)
    assert cmd[cmd.index("--model_args") + 1] == "pretrained=/m,dtype=float32"
    assert cmd[cmd.index("--limit") + 1] == "50" and cmd[cmd.index("--num_fewshot") + 1] == "5"
    assert "--log_samples" in cmd and cmd[cmd.index("--device") + 1] == "cpu"
    env = xc.offline_env(Path("/w"))
    assert env["HF_DATASETS_OFFLINE"] == env["HF_HUB_OFFLINE"] == "1"


def sample(doc_id: int, lls: list[float], target: int, context: str = "ctx", as_dict: bool = True) -> str:
    """One samples-JSONL line as lm-eval writes it (numbers as strings)."""
    pairs = [(context, f" {x}") for x in "ABCD"]
    args = {f"gen_args_{i}": {"arg_0": c, "arg_1": k} for i, (c, k) in enumerate(pairs)} if as_dict else pairs
    return json.dumps({"doc_id": doc_id, "target": str(target), "arguments": args,
                       "filtered_resps": [[str(v), "False"] for v in lls]})


def test_samples_are_read_in_doc_order_with_their_logliks():
    lines = [sample(1, [-1, -2, -0.5, -3], 2, "b"), sample(0, [-0.25, -2, -1, -3], 1, "a", as_dict=False)]
    scored = xc.scored_from_samples(lines)
    assert scored.contexts == ("a", "b")
    np.testing.assert_array_equal(scored.loglik[0], [-0.25, -2, -1, -3])
    assert scored.predictions.tolist() == [0, 2] and scored.labels.tolist() == [1, 2]
    assert scored.accuracy == 0.5


def test_samples_that_are_not_the_first_rows_or_not_the_four_letters_are_refused():
    with pytest.raises(ValueError, match="first 1 test rows"):
        xc.scored_from_samples([sample(3, [0, 0, 0, 0], 0)])
    bad = json.loads(sample(0, [0, 0, 0, 0], 0))
    bad["arguments"]["gen_args_3"]["arg_1"] = " E"
    with pytest.raises(ValueError, match="continuations"):
        xc.scored_from_samples([json.dumps(bad)])


def test_compare_counts_agreement_and_shows_where_prompts_differ():
    labels = np.array([0, 1, 2])
    ours = xc.Scored(("p", "q", "r"), np.array([[0, -1, -2, -3], [-1, 0, -2, -3], [-1, -2, 0, -3]], float), labels)
    theirs = xc.Scored(("p", "q", "x"), ours.loglik + np.array([[0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1e-5, 0]]), labels)
    result = xc.compare(theirs, ours)
    assert result["same_pred"] == 3 and result["same_context"] == 2 and result["max_dll"] == pytest.approx(2)
    assert "char 0" in result["first_diff"] and "'x'" in result["first_diff"]
    flipped = xc.Scored(theirs.contexts, ours.loglik + np.array([[0, 5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]), labels)
    assert xc.compare(flipped, ours)["same_pred"] == 2
