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
