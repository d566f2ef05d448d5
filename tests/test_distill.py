"""Distillation: pairs from logs (gains on shared examples, filters, hardest first), training, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from methods.promptimal import rewrite_request, task_description
from pipelines import distill
from pipelines.distill import Counts, build, copies_any, hardest_prompts, training_texts
from tasks.core import example_key
from tests.fakes import planted_task

TASK = {"_target_": "tests.fakes.planted_task", "n_train": 10, "n_dev": 20, "n_test": 10}


def _run(tmp_path: Path, records: list[dict], task: dict = TASK, name: str = "run") -> Path:
    run = tmp_path / name
    (run / "evaluations").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"task": task, "search": {"tasks": {}}}))
    with (run / "evaluations" / "t1.jsonl").open("w") as f:
        for i, r in enumerate(records):
            f.write(json.dumps({"trial": "t1", "method": "opro", "task": "planted", "step": i, **r}) + "\n")
    return run


def _rec(prompt: str, outcomes: list[float], parent: str = "", keys: list[str] | None = None) -> dict:
    task = planted_task(10, 20, 10)
    keys = keys or [example_key(ex) for ex in task.dev[: len(outcomes)]]
    return {"prompt": prompt, "score": sum(outcomes) / len(outcomes), "n": len(outcomes), "kind": "candidate",
            **({"parent": parent} if parent else {}), "examples": keys, "outcomes": outcomes}


def _pairs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_child_better_on_the_shared_examples_becomes_a_pair_with_its_gain(tmp_path):
    dev = [example_key(ex) for ex in planted_task(10, 20, 10).dev]
    parent = _rec("Read the case and answer", [1, 0, 0, 1] * 4, keys=dev[:16])
    # The child was scored on 8 of the parent's examples and 4 others: only the 8 shared count.
    child = _rec("Read the case then decide yes or no", [1, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0], parent=parent["prompt"],
                 keys=dev[:8] + dev[16:20])
    run = _run(tmp_path, [parent, child])
    counts = build([run], tmp_path / "pairs.jsonl", min_common=8)
    (pair,) = _pairs(tmp_path / "pairs.jsonl")
    assert (pair["parent"], pair["child"], pair["n"]) == (parent["prompt"], child["prompt"], 8)
    assert pair["parent_score"] == 0.5 and pair["child_score"] == 0.75 and pair["gain"] == 0.25
    assert counts.kept == 1 and counts.by_task == {"planted": 1}
    assert json.loads((tmp_path / "pairs.stats.json").read_text())["kept"] == 1


def test_the_pair_input_is_the_rewriters_request_with_the_parents_failures_most_missed_first(tmp_path):
    task = planted_task(10, 20, 10)
    dev = [example_key(ex) for ex in task.dev[:8]]
    parent = _rec("Read the case and answer", [0, 0, 1, 1, 1, 1, 1, 1], keys=dev)
    other = _rec("Some other prompt entirely", [1, 0, 1, 1, 1, 1, 1, 1], keys=dev)  # misses dev[1] too
    child = _rec("Decide whether the case says yes", [1, 1, 1, 1, 1, 1, 1, 1], parent=parent["prompt"], keys=dev)
    build([_run(tmp_path, [parent, other, child])], tmp_path / "p.jsonl", n_failures=2)
    (pair,) = _pairs(tmp_path / "p.jsonl")
    shown = [ln.removeprefix("Input: ") for ln in pair["input"].splitlines() if ln.startswith("Input: ")]
    assert shown == [task.dev[1].inputs["sentence"], task.dev[0].inputs["sentence"]]  # missed twice, then once
    assert pair["input"].startswith(rewrite_request(task_description(task), parent["prompt"], 0.75, "")[:80])
    assert pair["input"].endswith("Improved instruction:") and pair["output"] == child["prompt"]


@pytest.mark.parametrize("case, field", [
    ("not_better", "not_better"), ("near_duplicate", "near_duplicate"), ("test", "scored_on_test"),
    ("copy", "copies_example"), ("few", "too_few_common"), ("orphan", "no_parent_record"),
])
def test_each_filter_drops_its_pair_and_counts_it(tmp_path, case, field):
    task = planted_task(10, 20, 10)
    dev = [example_key(ex) for ex in task.dev[:8]]
    parent = _rec("Read the case and answer", [0, 1] * 4, keys=dev)
    child_text, child_keys, outcomes, parent_text = "Decide whether the case says yes", dev, [1] * 8, parent["prompt"]
    if case == "not_better":
        outcomes = [1, 0] * 4
    elif case == "near_duplicate":
        child_text = "Read the case and answer."
    elif case == "test":
        child_keys = dev[:7] + [example_key(task.test[0])]
    elif case == "copy":
        child_text = f"Answer like this: {task.train[3].inputs['sentence']} means yes"
    elif case == "few":
        child_keys, outcomes = dev[:3] + [example_key(ex) for ex in task.dev[10:15]], [1] * 8
    elif case == "orphan":
        parent_text = "A prompt never scored"
    child = _rec(child_text, outcomes, parent=parent_text, keys=child_keys)
    if case == "test":
        parent = _rec(parent["prompt"], [0, 1] * 4, keys=child_keys)  # both scored on a test example
    counts = build([_run(tmp_path, [parent, child])], tmp_path / "p.jsonl", min_common=8)
    assert counts.kept == 0 and getattr(counts, field) == 1, vars(counts)


def test_repeats_keep_the_largest_gain_and_pairs_come_hardest_parent_first(tmp_path):
    dev = [example_key(ex) for ex in planted_task(10, 20, 10).dev[:8]]
    weak = _rec("Answer the case now", [0, 0, 0, 0, 0, 0, 1, 1], keys=dev)
    strong = _rec("Read the case and answer", [0, 0, 0, 0, 1, 1, 1, 1], keys=dev)
    records = [weak, strong,
               _rec("Decide whether the case says yes", [1, 1, 1, 1, 1, 1, 1, 1], parent=strong["prompt"], keys=dev),
               _rec("Decide whether the case says yes!", [0, 0, 0, 1, 0, 0, 1, 1], parent=weak["prompt"], keys=dev),
               _rec("Decide whether the case says yes.", [0, 0, 0, 0, 0, 0, 1, 1], parent=weak["prompt"], keys=dev),
               _rec("Decide whether the case says yes:", [0, 0, 1, 1, 0, 0, 1, 1], parent=weak["prompt"], keys=dev)]
    counts = build([_run(tmp_path, records)], tmp_path / "p.jsonl")
    pairs = _pairs(tmp_path / "p.jsonl")
    # weak's two alike children: the bigger gain kept; the weaker parent's pair first, though its gain is smaller
    assert [(p["parent"], p["gain"]) for p in pairs] == [(weak["prompt"], 0.25), (strong["prompt"], 0.5)]
    assert counts.repeated == 1 and counts.not_better == 1


def test_copies_any_needs_a_long_verbatim_run():
    assert copies_any("Say yes when the case 12 is yes please", ["the case 12 is yes"])
    assert not copies_any("Decide the label", ["the case 12 is yes"])
    long = "a remarkably thoughtful film about grief and memory"
    assert copies_any(f"Like '{long[5:40]}' answer positive", [long])
    assert not copies_any("a remarkably good instruction", [long])


def test_hardest_prompts_are_each_tasks_lowest_scoring():
    pairs = [{"task": "a", "parent": "p one x", "parent_score": 0.2, "child": "c one x", "child_score": 0.6},
             {"task": "a", "parent": "p two x", "parent_score": 0.1, "child": "c two x", "child_score": 0.3},
             {"task": "b", "parent": "q one x", "parent_score": 0.5, "child": "d one x", "child_score": 0.9}]
    assert hardest_prompts(pairs, 2) == {"a": ["p two x", "p one x"], "b": ["q one x", "d one x"]}
    assert hardest_prompts(pairs, 1) == {"a": ["p two x"], "b": ["q one x"]}


def test_training_text_is_request_then_completion_and_only_the_completion_is_learned():
    from tests.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    (ctx, comp), = training_texts([{"input": "Rewrite this. Improved instruction:", "output": "Say yes "}], "</s>")
    assert comp == " Say yes\n</s>"
    row = distill._encode(tok, ctx, comp, 512)
    n_comp = len(tok(comp, add_special_tokens=False)["input_ids"])
    assert row["labels"][-n_comp:] == row["input_ids"][-n_comp:]
    assert set(row["labels"][:-n_comp]) == {-100}
    short = distill._encode(tok, ctx, comp, n_comp + 2)  # too long: the request's start is cut, not the answer
    assert len(short["input_ids"]) == n_comp + 2 and short["labels"][-n_comp:] == row["labels"][-n_comp:]


@pytest.mark.parametrize("argv, message", [
    (["build", "out=x.jsonl"], "run directory"),
    (["build", "/nonexistent", "out=x.jsonl"], "not a run directory"),
    (["train", "missing.jsonl", "out=o"], "does not exist"),
    (["train", "{pairs}", "out=o", "lr=fast"], "lr='fast': expected float"),
    (["train", "{pairs}", "out=o", "epochs=0"], "epochs must be > 0"),
    (["train", "{pairs}", "out=o", "colour=red"], "unknown option 'colour'"),
    (["train", "{pairs}"], "out=... is required"),
    (["rounds", "{pairs}", "out=o", "rounds=0"], "must be >= 1"),
    (["fly"], "name a command"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"input": "a", "output": "b"}) + "\n")
    argv = [a.replace("{pairs}", str(tmp_path / "pairs.jsonl")) for a in argv]
    assert distill.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]  # nothing left behind


def test_counts_are_all_reported():
    assert set(vars(Counts())) >= {"not_better", "near_duplicate", "repeated", "scored_on_test", "copies_example"}


def _tiny_dir(path: Path) -> Path:
    from tests.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tiny_model(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


PAIRS = [{"input": "Rewrite: the banana\nImproved instruction:", "output": "Decide the label carefully"},
         {"input": "Rewrite: seven maybe\nImproved instruction:", "output": "Review the sentiment label"}]


def test_training_lowers_the_loss_saves_a_loadable_model_and_resumes(tmp_path):
    from backends.hf import HFBackend

    base, out = _tiny_dir(tmp_path / "base"), tmp_path / "rewriter"
    args = distill.TrainArgs(base=str(base), epochs=40, lr=2e-2, lora_r=8, batch_size=2, save_steps=20, threads=1)
    summary = distill._train_worker(PAIRS * 2, str(out), args)
    curve = [json.loads(line)["loss"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert summary["steps"] == 80 and len(curve) == 80 and not summary["resumed"]
    assert curve[-1] < 0.5 * curve[0]
    # the merged model is a plain model directory: the HF backend loads it and it writes the trained answer
    lm = HFBackend(model=str(out), dtype="float32")
    (out_text,), = lm.generate([PAIRS[0]["input"]], max_new_tokens=40, temperature=0.0, stop=("\n",))
    assert out_text.strip() == PAIRS[0]["output"]
    assert not any(out.glob("adapter_config.json"))  # merged, no adapter left to load
    # a second call finds the checkpoints and resumes instead of starting over
    again = distill._train_worker(PAIRS * 2, str(out), distill.TrainArgs(**{**vars(args), "epochs": 41}))
    assert again["resumed"] and again["steps"] == 82
    assert len((out / "loss.jsonl").read_text().splitlines()) == 82


def test_the_whole_loop_through_the_commands_trains_in_ray_and_the_rewriter_loads_by_config(tmp_path, data_dir):
    """A sweep's logs -> pairs -> a LoRA rewriter trained in a Ray task -> a fresh sweep that loads it as its
    proposer by config alone (tiny models: this checks the plumbing, not the quality)."""
    from tests.conftest import run_cli

    common = ["task.n_train=20", "task.n_dev=16", "task.n_test=16", "cache.enabled=false", "logger=none",
              f"data_dir={data_dir}", "search.methods=[promptimal]", "method=promptimal", "method.n_eval=16",
              "method.steps=2", "method.n_samples=3"]
    source = tmp_path / "source"
    proc = run_cli("model=tiny", *common, f"hydra.run.dir={source}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = [r for p in (source / "evaluations").glob("*.jsonl") for r in map(json.loads, p.read_text().splitlines())]
    rewrites = [r for r in log if r["kind"] == "rewrite"]
    assert rewrites and all(r["parent"] and len(r["examples"]) == len(r["outcomes"]) == 16 for r in rewrites)

    proc = run_cli("build", str(source), f"out={tmp_path / 'pairs.jsonl'}", "min_gain=-1", "max_similarity=1.01",
                   module="pipelines.distill")
    assert proc.returncode == 0, proc.stderr[-3000:]
    pairs = _pairs(tmp_path / "pairs.jsonl")
    assert pairs and all(p["child"] in {r["prompt"] for r in rewrites} for p in pairs)

    base, rewriter = _tiny_dir(tmp_path / "base"), tmp_path / "rewriter"
    proc = run_cli("train", str(tmp_path / "pairs.jsonl"), f"base={base}", f"out={rewriter}", "epochs=1",
                   "batch_size=2", "threads=1", module="pipelines.distill")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[distill] trained" in proc.stdout and (rewriter / "config.json").is_file()
    assert json.loads((rewriter / "distill.json").read_text())["pairs"] == len(pairs)

    again = tmp_path / "again"
    proc = run_cli("model@lm.scorer=tiny", "model@lm.proposer=hf", f"lm.proposer.model={rewriter}",
                   "lm.proposer.engine=torch", "lm.proposer.dtype=float32", *common, f"hydra.run.dir={again}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((again / "summary.json").read_text())
    assert summary["trials"][0]["proposer_model"] == str(rewriter)
    assert summary["trials"][0]["proposer_calls"] >= 1


def test_rounds_rewrite_each_tasks_hardest_prompts_and_keep_every_rounds_pairs(tmp_path, monkeypatch):
    """Each round is one promptimal sweep from the hardest prompts; its improvements join the data."""
    dev = [example_key(ex) for ex in planted_task(10, 20, 10).dev[:8]]
    seed_pairs = [{"task": "planted", "parent": "Answer the case now", "parent_score": 0.25,
                   "child": "Read the case and answer", "child_score": 0.5, "gain": 0.25, "input": "x", "output": "y"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in seed_pairs))
    commands = []

    def fake_sweep(cmd, check):
        commands.append(cmd)
        starts = json.loads(Path(next(a.split("=", 1)[1] for a in cmd if "starts_file=" in a)).read_text())
        (start,) = starts["planted"][:1]
        run_dir = Path(next(a.split("=", 1)[1] for a in cmd if a.startswith("hydra.run.dir=")))
        better = f"Decide carefully whether round {len(commands)} says yes"
        _run(run_dir.parent, [_rec(start, [0, 0, 0, 0, 0, 0, 1, 1], keys=dev),
                              _rec(better, [1, 1, 1, 1, 0, 0, 1, 1], parent=start, keys=dev)], name=run_dir.name)
        return type("Done", (), {"returncode": 0})()

    monkeypatch.setattr(distill.subprocess, "run", fake_sweep)
    merged = distill.rounds(tmp_path / "pairs.jsonl", tmp_path / "out", ["+experiment=x"], n_rounds=2, per_task=1)
    assert len(commands) == 2 and all("+experiment=x" in c and "method=promptimal" in c for c in commands)
    # round 1 starts from the lowest-scoring prompt; round 2 improves what round 1 wrote, with a new seed
    assert json.loads((tmp_path / "out/round_1/starts.json").read_text()) == {"planted": ["Answer the case now"]}
    assert json.loads((tmp_path / "out/round_2/starts.json").read_text()) == {
        "planted": ["Decide carefully whether round 1 says yes"]}
    assert [next(a for a in c if a.startswith("search.seeds=")) for c in commands] == ["search.seeds=[0]", "search.seeds=[1]"]
    for k in (1, 2):
        (pair,) = _pairs(tmp_path / f"out/round_{k}/pairs.jsonl")
        assert pair["child"] == f"Decide carefully whether round {k} says yes" and pair["gain"] == 0.5
    assert sorted(p["round"] for p in _pairs(merged)) == [0, 1, 2]


def test_a_reordering_of_the_parents_words_is_a_near_duplicate():
    assert distill.similarity("Classify the review as good or bad", "as good or bad Classify the review") == 1.0
    assert distill.similarity("Classify the review", "Decide what the review says") < 0.9


def test_compare_pairs_methods_of_different_runs_on_the_same_test_examples(tmp_path, capsys):
    def run(name, method, scores):
        d = tmp_path / name
        (d / "outputs").mkdir(parents=True)
        (d / "config.json").write_text("{}")
        (d / "outputs" / f"{method}.jsonl").write_text("".join(json.dumps({"score": s}) + "\n" for s in scores))
        (d / "summary.json").write_text(json.dumps({"trials": [
            {"status": "ok", "task": "cr", "method": method, "seed": 0, "outputs": f"outputs/{method}.jsonl"}]}))
        return d

    base = run("base", "manual", [0, 1] * 20)
    rewriter = run("rewriter", "promptimal", [1] * 40)
    assert distill.main(["compare", f"b:{base}", f"r:{rewriter}"]) == 0
    out = capsys.readouterr().out
    assert "promptimal@r" in out and "0.500" in out and "1.000" in out
    table = distill.compare([base, rewriter], ["b", "r"])
    (row,) = [r for r in table if r["method"] == "promptimal@r"]
    assert row["p_vs_manual@b"] < 0.01 and row["n"] == 40


def test_training_with_wandb_logs_an_offline_run_beside_the_model(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    base, out = _tiny_dir(tmp_path / "base"), tmp_path / "rewriter"
    args = distill.TrainArgs(base=str(base), epochs=1, batch_size=2, threads=1, logger="wandb")
    distill._train_worker(PAIRS, str(out), args)
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))
