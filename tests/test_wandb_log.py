"""Trained prompts reach W&B as artifacts (offline: nothing leaves the machine)."""

from __future__ import annotations

from pipelines.wandb_log import log_prompt_artifacts


class Recorder:
    def __init__(self) -> None:
        self.logged = []

    def log_artifact(self, artifact) -> None:
        self.logged.append(artifact)


def test_soft_prompts_and_prefixes_become_typed_artifacts(tmp_path):
    soft, prefix = tmp_path / "soft", tmp_path / "prefix"
    for d in (soft, prefix):
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
    base = {"status": "ok", "seed": 0, "dev_score": 0.8, "test_score": 0.7}
    rows = [
        {**base, "trial": "soft_prompt-0", "method": "soft_prompt", "prompt_kind": "SoftPrompt", "artifact": str(soft)},
        {**base, "trial": "prefix_tuning-0", "method": "prefix_tuning", "prompt_kind": "PrefixPrompt", "artifact": str(prefix)},
        {**base, "trial": "ape-0", "method": "ape", "prompt_kind": "TextPrompt"},  # nothing to save
        {**base, "trial": "gone-0", "method": "soft_prompt", "prompt_kind": "SoftPrompt", "artifact": str(tmp_path / "missing")},
        {"trial": "failed-0", "method": "soft_prompt", "seed": 1, "status": "failed", "artifact": str(soft)},
    ]
    run = Recorder()
    log_prompt_artifacts(run, rows)
    assert [(a.name, a.type) for a in run.logged] == [("soft_prompt-0-soft_prompt", "soft_prompt"),
                                                       ("prefix_tuning-0-prefix", "prefix")]
    assert run.logged[1].metadata["test_score"] == 0.7
    assert "adapter_config.json" in run.logged[0].manifest.entries


def test_every_finished_trials_test_outputs_become_table_rows(tmp_path):
    import json

    from pipelines.wandb_log import OUTPUT_COLUMNS, output_rows

    (tmp_path / "outputs").mkdir()
    recs = [{"input": "2+2", "output": "The answer is 4.", "answer": "4", "gold": ["4"], "correct": True},
            {"input": "3+3", "output": "7", "answer": "7", "gold": ["6"], "correct": False}]
    (tmp_path / "outputs" / "t0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    rows = [{"status": "ok", "method": "opro", "task": "gsm8k", "seed": 0, "outputs": "outputs/t0.jsonl"},
            {"status": "failed", "method": "ape", "task": "gsm8k", "seed": 0, "outputs": "outputs/t0.jsonl"},
            {"status": "ok", "method": "manual", "task": "gsm8k", "seed": 0}]  # written before outputs existed
    table = output_rows(rows, tmp_path)
    assert len(OUTPUT_COLUMNS) == len(table[0])
    assert table == [["opro", "gsm8k", 0, "2+2", "The answer is 4.", "4", "['4']", True],
                     ["opro", "gsm8k", 0, "3+3", "7", "7", "['6']", False]]
