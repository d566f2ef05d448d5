"""Bad input is refused by the planning pass with one line naming the key or file and the fix.

The plan runs in-process here (it needs no Ray and no model), so each case costs milliseconds;
``tests/test_pipeline.py`` sends some of the same input through the command line to see the whole
contract: one ``error:`` line, exit status 2, no run directory left behind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from pipelines.plan import UserError, make_plan
from pipelines.run import check_resume_overrides
from tasks.core import Example, Task, TaskError, data_warnings
from tests.conftest import ROOT

CONF = ROOT / "conf"


def plan(*overrides: str, tmp: Path | None = None):
    """``make_plan`` on the default config with ``overrides`` (``model=tiny`` already set)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["model@lm.scorer=tiny", "model@lm.proposer=tiny", *overrides],
                      return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    choices = dict(cfg.hydra.runtime.choices)
    OmegaConf.set_struct(cfg, False)
    del cfg["hydra"]
    return make_plan(cfg, [CONF], choices, tmp or Path("/unused"))


def write_table(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def reviews(n: int = 40, labels=("bad", "good")) -> list[dict]:
    return [{"review": f"review number {i}", "stars": labels[i % len(labels)]} for i in range(n)]


def custom(path: Path, *extra: str) -> list[str]:
    return ["task=custom", f"task.path={path}", "task.text_fields=[review]", "task.label_field=stars",
            "task.labels=[bad,good]", "task.n_train=10", "task.n_dev=10", *extra]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.max_steps=nan"], "search.max_steps=nan: expected an integer >= 0"),
        (["search.max_steps=2.5"], "search.max_steps=2.5: expected an integer >= 0"),
        (["resources.replicas=inf"], "resources.replicas=inf: expected an integer >= 1"),
        (["resources.lm_cpus=nan"], "resources.lm_cpus=nan: expected a finite number >= 0"),
        (["search.seeds=[0,0]"], "search.seeds=[0, 0]: a seed is repeated"),
        (["search.seeds=[]"], "search.seeds=[]: expected a non-empty list of integers"),
        (["search.reuse_actors=maybe"], "search.reuse_actors='maybe': expected true or false"),
        (["cache.actors=0"], "cache.actors=0: expected an integer >= 1"),
        (["task.n_dev=2.5"], "task.n_dev=2.5: sst2 expects int"),
        (["method.temperature=nan"], "APE: argument temperature=nan should be float (finite)"),
        (["task.label_words=[' negative','']"], "label word 1 is ''"),
        (["task.label_words=[' good',' good']"], "repeat a word"),
        (["progress.mode=fancy"], "progress.mode must be one of auto, live, plain, off, not 'fancy'"),
        (["progress.interval_s=0"], "progress.interval_s must be a number of seconds > 0, not 0"),
    ],
)
def test_bad_numbers_and_arguments(overrides, message, data_dir):
    with pytest.raises(UserError) as err:
        plan(f"data_dir={data_dir}", *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_label_column_cannot_be_a_text_field(tmp_path):
    path = write_table(tmp_path / "r.csv", reviews())
    with pytest.raises(UserError, match="text_fields includes the label column 'stars': the gold label would be"):
        plan(*custom(path, "task.text_fields=[review,stars]"))


def test_single_class_data_is_refused(tmp_path):
    path = write_table(tmp_path / "r.csv", reviews(labels=("good",)))
    with pytest.raises(UserError, match="every row has label 'positive'; a classification task needs rows of at least two"):
        plan(*custom(path, "task.labels=[bad,good]"))


def test_undecodable_files_are_one_line(tmp_path, data_dir):
    latin = write_table(tmp_path / "r.csv", [{"review": "café au lait", "stars": "good"}, *reviews()], "latin-1")
    with pytest.raises(UserError, match=r"r.csv is not valid utf-8 .*set encoding=latin-1"):
        plan(*custom(latin))
    assert len(plan(*custom(latin, "task.encoding=latin-1")).tasks) == 1
    # a benchmark file in the wrong encoding: the same contract
    broken = tmp_path / "data"
    (broken / "sst2" / "glue").mkdir(parents=True)
    (broken / "SOURCES.md").write_text("copy\n")
    for name in ("train.tsv", "dev.tsv"):
        body = (Path(data_dir) / "sst2" / "glue" / name).read_bytes()[:4000]
        (broken / "sst2" / "glue" / name).write_bytes(body.rsplit(b"\n", 1)[0] + b"\n\xff\xfe broken\t1\n")
    with pytest.raises(UserError, match=r"train.tsv: cannot decode byte \d+ as utf-8"):
        plan(f"data_dir={broken}", "task.n_train=5", "task.n_dev=5")


def test_a_byte_order_mark_before_the_header_is_not_part_of_a_column_name(tmp_path):
    path = write_table(tmp_path / "r.csv", reviews(), encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    (task,) = plan(*custom(path)).tasks.values()
    assert task.train[0].inputs["review"].startswith("review number")
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in reviews()), encoding="utf-8-sig")
    assert len(plan(*custom(jsonl)).tasks) == 1


def test_a_cache_path_that_is_a_directory_is_refused(tmp_path, data_dir):
    with pytest.raises(UserError, match=f"cannot open the evaluation cache {tmp_path}: .*set cache.path"):
        plan(f"data_dir={data_dir}", f"cache.path={tmp_path}")


def test_data_problems_that_are_warnings_are_found_and_kept_in_the_plan(tmp_path):
    path = write_table(tmp_path / "r.csv", reviews(20) * 2)  # every row twice: some land in train and test
    warned = plan(*custom(path, "task.n_train=20", "task.n_dev=5"))
    assert any("have the same inputs as test examples" in w for w in warned.warnings)
    assert all(f"warning: {w}" in warned.lines for w in warned.warnings)
    ex = [Example({"s": "a"}, 0), Example({"s": "b"}, 1)]
    task = Task("t", "{instruction}{s}", (" no", " yes"), "", train=tuple(ex), dev=(ex[0],), test=(Example({"s": "c"}, 1),))
    assert data_warnings(task) == ["task 't': no dev example has label(s) ['yes']"]
    clean = Task("t", "{instruction}{s}", (" no", " yes"), "", train=tuple(ex), dev=tuple(ex), test=(Example({"s": "c"}, 1),))
    assert data_warnings(clean) == []


def test_empty_label_word_is_refused_by_the_task_itself():
    with pytest.raises(TaskError, match="label word 0 is ' '"):
        Task("t", "{instruction}{s}", (" ", " yes"), "", train=(), dev=(), test=())


def test_resume_refuses_overrides_that_change_the_sweep():
    saved = {"search": {"seeds": [0, 1], "max_steps": 5}, "method": {"_target_": "methods.ape.APE"}, "ray": {"address": None}}
    same = {**saved, "ray": {"address": "auto"}}
    check_resume_overrides(["resume=/r", "search.seeds=[0,1]", "ray.address=auto"], same, saved)  # the same sweep
    changed = {**same, "search": {"seeds": [0, 1], "max_steps": 9}}
    with pytest.raises(UserError, match=r"search.max_steps=9 changes search.max_steps from its saved config; drop it"):
        check_resume_overrides(["resume=/r", "search.max_steps=9"], changed, saved)
    other = {**same, "method": {"_target_": "methods.opro.OPRO"}}
    with pytest.raises(UserError, match="method=opro changes method"):
        check_resume_overrides(["method=opro"], other, saved)
