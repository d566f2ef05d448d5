"""The end-of-sweep W&B run, from the driver: tables of every candidate and the comparison.

Each trial has its own live run (``pipelines/live.py``); this one joins them in the sweep's
group (``logger.group``) with ``job_type="comparison"``.

Offline by default (no network or key needed; ``wandb sync`` uploads later). Only the
redacted config is logged; API keys never reach W&B.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipelines.results import read_jsonl

EVAL_COLUMNS = ["method", "seed", "step", "kind", "prompt", "score", "n", "scorer_examples", "scorer_calls", "tokens", "wall_s"]
SUMMARY_COLUMNS = ["method", "task", "seed", "prompt_kind", "best_prompt", "dev_score", "test_score",
                   "test_score_raw", "test_score_calibrated", "scorer_examples", "scorer_calls", "scorer_tokens",
                   "proposer_calls", "wall_s", "status"]


def log_run(cfg: dict, rows: list[dict], run_dir: Path) -> None:
    """Log the sweep's evaluations and summary as W&B tables (offline unless configured)."""
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    logger = cfg["logger"]
    run = wandb.init(
        project=logger["project"], entity=logger.get("entity"), mode=logger["mode"], dir=str(run_dir),
        group=logger.get("group"), name=f"{logger.get('group') or run_dir.name} comparison", config=cfg,
        job_type="comparison", reinit="finish_previous",
    )
    try:
        evals = read_jsonl(run_dir / "evaluations.jsonl")
        run.log({
            "candidates": wandb.Table(columns=EVAL_COLUMNS, data=[[e.get(c) for c in EVAL_COLUMNS] for e in evals]),
            "comparison": wandb.Table(columns=SUMMARY_COLUMNS, data=[[r.get(c) for c in SUMMARY_COLUMNS] for r in rows]),
        })
        from pipelines.report import plot_paths, report_tables

        run.log({f"report/{name}": wandb.Table(dataframe=df.reset_index()) for name, df in report_tables(run_dir).items()})
        run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in plot_paths(run_dir)})
        for r in rows:
            if r.get("status") == "ok":
                run.summary[f"{r['method']}/seed{r['seed']}/test_score"] = r["test_score"]
        if outputs := output_rows(rows, run_dir):
            run.log({"test_outputs": wandb.Table(columns=OUTPUT_COLUMNS, data=outputs)})
        log_prompt_artifacts(run, rows)
    finally:
        run.finish()


OUTPUT_COLUMNS = ["method", "task", "seed", "input", "output", "answer", "gold", "correct"]


def output_rows(rows: list[dict], run_dir: Path) -> list[list]:
    """Every finished trial's per-example test outputs (``outputs/<trial>.jsonl``) as table rows."""
    out = []
    for r in rows:
        if r.get("status") == "ok" and r.get("outputs") and (run_dir / r["outputs"]).is_file():
            for rec in read_jsonl(run_dir / r["outputs"]):
                out.append([r.get("method"), r.get("task"), r.get("seed"), rec.get("input"), rec.get("output"),
                            rec.get("answer"), str(rec.get("gold")), rec.get("correct")])
    return out


def log_prompt_artifacts(run, rows: list[dict]) -> None:
    """Each trained soft prompt or prefix (a PEFT adapter directory) as a W&B artifact."""
    import wandb

    for r in rows:
        path = r.get("artifact")
        if r.get("status") != "ok" or not path or not Path(path).is_dir():
            continue
        kind = "prefix" if r.get("prompt_kind") == "PrefixPrompt" else "soft_prompt"
        art = wandb.Artifact(f"{r['trial']}-{kind}".replace("/", "_"), type=kind, metadata={
            "method": r["method"], "seed": r["seed"], "dev_score": r.get("dev_score"), "test_score": r.get("test_score"),
        })
        art.add_dir(path)
        run.log_artifact(art)
