"""Soft prompt and prefix tuning end to end: trained through the shared actor, saved as PEFT adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.conftest import run_cli
from tests.test_pipeline import TINY


def test_soft_and_prefix_trials_train_and_export_peft_adapters(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", "logger=wandb",
                   "search=single", "search.methods=[soft_prompt,prefix_tuning,autoprompt,label_search]",
                   "search.max_steps=2",
                   "+search.method_overrides={soft_prompt: {n_virtual: 2, eval_every: 2, n_eval: 8},"
                   " prefix_tuning: {n_virtual: 3, eval_every: 2, n_eval: 8},"
                   " autoprompt: {n_triggers: 2, n_candidates: 4, batch_size: 4, eval_every: 1, n_eval: 8},"
                   " label_search: {n_train: 8, epochs: 1, n_eval: 8, keep_original: false}}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    _assert_live_tables(run_dir)
    rows = {r["method"]: r for r in json.loads((run_dir / "summary.json").read_text())["trials"]}
    # Label search read its states through the shared actors, and its test score used the words it chose.
    words = rows["label_search"]["label_words"]
    assert rows["label_search"]["status"] == "ok" and len(words) == 2 and words != [" negative", " positive"]
    assert f"[labels: {'/'.join(w.strip() for w in words)}]" in (run_dir / "report.md").read_text()
    assert "label_words" not in rows["soft_prompt"]
    assert rows["prefix_tuning"]["status"] == "ok" and rows["prefix_tuning"]["prompt_kind"] == "PrefixPrompt"
    assert rows["soft_prompt"]["prompt_kind"] == "SoftPrompt"
    from backends.tiny import tiny_model, tiny_tokenizer
    from backends.peft_export import load_prefix, load_soft_prompt

    vocab = len(tiny_tokenizer())
    prefix_dir, soft_dir = rows["prefix_tuning"]["artifact"], rows["soft_prompt"]["artifact"]
    assert prefix_dir.endswith("/prefix") and soft_dir.endswith("/soft_prompt")
    assert json.loads((Path(prefix_dir) / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    prefix = load_prefix(prefix_dir, tiny_model(vocab))
    soft = load_soft_prompt(soft_dir, tiny_model(vocab))
    assert prefix.shape[0] == 3 and soft.shape == (2, 32)
    # Reloaded, each adapter is exactly the best prompt its trial kept (in its last checkpoint).
    import pickle

    for method, reloaded in (("prefix_tuning", prefix), ("soft_prompt", soft)):
        checkpoints = sorted((run_dir / "tune").glob(f"*{rows[method]['trial']}*/checkpoint_*/trial.pkl"))
        state = pickle.loads(checkpoints[-1].read_bytes())["state"]
        np.testing.assert_array_equal(reloaded, state.best.astype(np.float32), err_msg=method)
    report = (run_dir / "report.md").read_text()
    assert "key/value prefix" in report and "soft prompt" in report


def _assert_live_tables(run_dir: Path) -> None:
    """Each gradient trial's W&B run shows its prompt step by step: AutoPrompt's triggers token
    by token, a soft prompt's and a prefix's vector norms (and the soft prompt's nearest words)."""
    from pipelines.live import last_table, records, run_dirs

    rows = {r["method"]: r for r in json.loads((run_dir / "summary.json").read_text())["trials"]}
    tables = {}
    for method, row in rows.items():
        (folder,) = run_dirs(run_dir / "wandb", row["trial"])
        recs = records(folder)
        tables[method] = {k: last_table(folder, recs, k) for k in ("triggers", "soft_prompt")}
    triggers = tables["autoprompt"]["triggers"]
    assert [r[0] for r in triggers["data"]] == [1, 2] and tables["autoprompt"]["soft_prompt"] is None
    step = dict(zip(triggers["columns"], triggers["data"][-1]))
    assert len(step["tokens"].split(" | ")) == 2 and len(step["ids"].split()) == 2
    assert step["best"] == rows["autoprompt"]["best_prompt"]
    for method, kind in (("soft_prompt", "soft"), ("prefix_tuning", "prefix")):
        soft = tables[method]["soft_prompt"]
        last = dict(zip(soft["columns"], soft["data"][-1]))
        assert last["kind"] == kind and last["current_norm"] > 0 and tables[method]["triggers"] is None
        assert len(last["norms"].split()) == (2 if kind == "soft" else 3)
    soft_last = dict(zip(tables["soft_prompt"]["soft_prompt"]["columns"], tables["soft_prompt"]["soft_prompt"]["data"][-1]))
    assert len(soft_last["nearest"].split(" | ")) == 2  # evaluated at step 2: the best prompt's nearest words


def test_progress_lines_name_the_sampled_hyperparameters():
    from pipelines.summary import trial_label
    from pipelines.trial import apply_samples

    spec = {"method_name": "prefix_tuning", "seed": 1, "method": {"lr": 0.01, "n_virtual": 8}}
    sampled = apply_samples(spec, {"prefix_tuning": {"lr": 0.0123456, "n_virtual": 16}, "ape": {"n_prompts": 3}})
    assert trial_label(sampled) == "prefix_tuning seed=1 lr=0.0123 n_virtual=16"
    assert sampled["method"] == {"lr": 0.0123456, "n_virtual": 16}
    assert trial_label(apply_samples(spec, {})) == "prefix_tuning seed=1"
