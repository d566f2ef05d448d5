"""A trial's live W&B run: every step's scores, budget and prompts, while the sweep runs.

Each Tune trial logs to a W&B run of its own, started with Ray Tune's ``setup_wandb`` (run
id = trial id, group = the sweep, so the end-of-sweep comparison run sits beside them).
Per step it logs the dev score, the budget used and tables:

- ``best_prompt`` (rows grow with the steps): the best prompt so far, every method;
- ``triggers`` (grow): AutoPrompt's current trigger tokens, one string per position;
- ``soft_prompt`` (grow): a soft prompt's or prefix's vector norms and nearest tokens;
- ``candidates`` and ``population`` (this step's only): what the step scored, and what a
  population method keeps (EvoPrompt's population, ProTeGi's beam, OPRO's trajectory).

The rows and every step's scalars live in the trial's checkpoint, so a resumed trial logs
the whole tables again and continues its own run. A step is logged once: a resumed trial
first reads the steps its run already holds back from the run's files (``wandb leet
inspect``, W&B's own reader) and skips them; checkpointed steps whose log was lost with the
old process are logged when the trial resumes. Offline by default; ``wandb sync RUN_DIR/wandb`` uploads later.

``python -m pipelines.live RUN_DIR [trial=NAME] [table=NAME] [width=80]`` reads a run directory's W&B
runs back from disk: each run's steps per session, and a table as last logged.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from methods.base import Evaluated, Snapshot
from methods.lm import PrefixPrompt, SoftPrompt, TokenPrompt

# Tables whose rows accumulate over the steps, and tables of one step's rows.
HISTORY = {
    "best_prompt": ["step", "dev_score", "prompt"],
    "triggers": ["step", "dev_score", "current", "tokens", "ids", "best"],
    "soft_prompt": ["step", "dev_score", "kind", "current_norm", "best_norm", "norms", "nearest"],
}
PER_STEP = {
    "candidates": ["step", "idx", "kind", "prompt", "score", "n"],
    "population": ["step", "rank", "prompt", "score"],
}
POPULATION_ROWS = 50  # APE keeps every candidate it scored: show the best ones


def step_rows(step: int, dev: float, best, snap: Snapshot, evaluated: Sequence[Evaluated],
              decode: Callable[[int], str]) -> tuple[dict[str, list], dict[str, list]]:
    """One step's rows: ``(history, per_step)``, each by table name (only the tables that apply).

    ``best`` is :meth:`Method.best`'s prompt, ``snap`` the method's :class:`Snapshot` (empty
    for a method without one) and ``decode`` turns one token id into its text.
    """
    history: dict[str, list] = {"best_prompt": [[step, dev, best.describe()]]}
    current = snap.current if snap.current is not None else best
    if isinstance(current, TokenPrompt):
        tokens = " | ".join(repr(decode(i)) for i in current.ids)
        history["triggers"] = [[step, dev, current.describe(), tokens, " ".join(map(str, current.ids)),
                                best.describe()]]
    if isinstance(current, (SoftPrompt, PrefixPrompt)):
        norms = _norms(current)
        nearest = " | ".join(map(repr, best.nearest)) if isinstance(best, SoftPrompt) else ""
        history["soft_prompt"] = [[step, dev, "prefix" if isinstance(current, PrefixPrompt) else "soft",
                                   float(norms.mean()), float(_norms(best).mean()),
                                   " ".join(f"{n:.3g}" for n in norms), nearest]]
    per_step: dict[str, list] = {}
    if evaluated:
        per_step["candidates"] = [[step, i, e.kind, e.prompt, float(e.score), int(e.n)] for i, e in enumerate(evaluated)]
    if snap.population:
        per_step["population"] = [[step, r, text, score] for r, (text, score) in
                                  enumerate(snap.population[:POPULATION_ROWS], 1)]
    return history, per_step


def _norms(prompt) -> np.ndarray:
    """L2 norm of each virtual token's vector (a prefix's: over all its layers' keys and values)."""
    arr = prompt.key_values if isinstance(prompt, PrefixPrompt) else prompt.embeddings
    return np.linalg.norm(np.asarray(arr, dtype=np.float64), axis=-1)


class LiveLog:
    """A trial's step-by-step record, kept in its checkpoint, and its W&B run when one is on.

    Args:
        saved: :meth:`state` from the trial's checkpoint (``None`` for a fresh trial).
        run: the trial's W&B run, or ``None`` (logger off): the rows are kept all the same.
        logged: the last step the run already holds (-1: none).
    """

    def __init__(self, saved: dict | None = None, run=None, logged: int = -1) -> None:
        saved = saved or {}
        self.history: dict[str, list] = {k: list(v) for k, v in saved.get("history", {}).items()}
        self.metrics: dict[int, dict] = {int(k): v for k, v in saved.get("metrics", {}).items()}
        self.per_step: dict[str, list] = dict(saved.get("per_step", {}))
        self.run, self.logged = run, logged
        self._tokens: dict[int, str] = {}

    def state(self) -> dict:
        return {"history": self.history, "metrics": self.metrics, "per_step": self.per_step}

    def decoder(self, decode: Callable[[Sequence[int]], str]) -> Callable[[int], str]:
        """``decode`` for one id at a time, remembered: AutoPrompt changes one token per step."""
        def one(i: int) -> str:
            if i not in self._tokens:
                self._tokens[i] = decode([i])
            return self._tokens[i]
        return one

    def record(self, step: int, metrics: dict, history: dict[str, list], per_step: dict[str, list]) -> None:
        """Keep a step's rows and log them (once: a step the run already holds is skipped)."""
        for name, rows in history.items():
            self.history.setdefault(name, []).extend(rows)
        self.metrics[step] = _scalars(metrics)
        self.per_step = per_step
        self.catch_up()

    def catch_up(self) -> None:
        """Log every kept step the run does not hold yet, in order.

        After a resume these are the checkpointed steps whose log was lost with the old
        process (W&B writes its file every second or so); an earlier step gets its scalars and
        the tables as they stood then, the last one its own candidates as well.
        """
        if self.run is None:
            return
        import wandb

        last = max(self.metrics, default=-1)
        for step in sorted(s for s in self.metrics if s > self.logged):
            tables = {name: wandb.Table(columns=HISTORY[name], data=[r for r in rows if r[0] <= step])
                      for name, rows in self.history.items()}
            if step == last:
                tables |= {name: wandb.Table(columns=PER_STEP[name], data=rows) for name, rows in self.per_step.items()}
            # commit: W&B otherwise holds a step open until a later one is logged, and a killed
            # trial would lose its last step even after the file was written
            self.run.log({**self.metrics[step], **tables}, step=step, commit=True)
            self.logged = step

    def finish(self, summary: dict, failed: bool = False) -> None:
        if self.run is None:
            return
        import wandb

        self.run.summary.update(_scalars(summary))
        self.run.finish(exit_code=1 if failed else 0)
        # Now, not in W&B's exit hook: a Ray worker's W&B service may be gone by then, and the
        # hook then prints a traceback for a run that was already saved.
        wandb.teardown()


def _scalars(metrics: dict) -> dict[str, float]:
    """The numeric metrics (W&B charts numbers; strings and lists go in tables)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number)) and not isinstance(v, bool)}


def start_run(logger: dict, run_dir: Path, config: dict):
    """The trial's W&B run (``None`` when the logger is off) and the last step it already holds.

    Must run inside a Tune trial: ``setup_wandb`` takes the run id (the trial id), name and
    group from the trial's session; the group is the sweep's (``logger.group``).
    """
    if not logger.get("enabled") or logger.get("mode") == "disabled":
        return None, -1
    from ray import tune
    from ray.air.integrations.wandb import setup_wandb

    # setup_wandb skips its API-key lookup only when the mode is in the environment.
    os.environ["WANDB_MODE"] = logger["mode"]
    os.environ.setdefault("WANDB_SILENT", "true")
    trial_id = tune.get_context().get_trial_id()
    logged = max(logged_steps(run_dir / "wandb", trial_id), default=-1)
    run = setup_wandb(
        config=config, project=logger["project"], entity=logger.get("entity"), group=logger.get("group"),
        mode=logger["mode"], dir=str(run_dir), job_type="trial", resume="allow", settings=run_settings(),
    )
    return run, logged


def run_settings():
    """W&B settings of a trial's run.

    ``console="off"``: the trial's lines already reach the sweep's output through Ray. No
    system-stats sampler: on a small machine it takes CPU from the scorer. The run's file is
    written every second (W&B's default is every 15 s), so a trial killed by Ctrl+C keeps
    what it logged up to a second before.
    """
    import wandb

    return wandb.Settings(console="off", x_disable_stats=True, silent=True, x_transaction_log_flush_interval=1.0)


# --------------------------------------------------------------------------- reading runs back

def run_dirs(wandb_dir: Path, run_id: str | None = None) -> list[Path]:
    """A W&B directory's run folders (offline or synced), oldest first; only ``run_id``'s if given."""
    if not wandb_dir.is_dir():
        return []
    dirs = [d for d in wandb_dir.iterdir() if d.is_dir() and d.name.startswith(("offline-run-", "run-"))]
    if run_id is not None:
        dirs = [d for d in dirs if folder_run_id(d) == run_id]
    return sorted(dirs, key=_started)


def folder_run_id(folder: Path) -> str:
    """The run id a W&B run folder is named after (``offline-run-YYYYMMDD_HHMMSS-ID``)."""
    return folder.name.rsplit("-", 1)[-1]


def _started(folder: Path) -> str:
    """A run folder's start time as W&B names it (``offline-run-YYYYMMDD_HHMMSS-ID``)."""
    found = re.search(r"\d{8}_\d{6}", folder.name)
    return found.group(0) if found else folder.name


def records(run_folder: Path) -> list[dict]:
    """The records of one run folder's ``.wandb`` log, read by W&B's own ``wandb leet inspect``."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_folder)],
                          capture_output=True, text=True, timeout=120)
    out = []
    for line in proc.stdout.splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def history(recs: list[dict]) -> list[dict]:
    """The history rows (``run.log`` calls) among a run folder's records, in order."""
    return [r["history"]["item"] for r in recs if r.get("type") == "history"]


def steps(recs: list[dict]) -> list[int]:
    """The steps one session logged, in order."""
    return [int(h["_step"]) for h in history(recs) if "_step" in h]


def logged_steps(wandb_dir: Path, run_id: str) -> list[int]:
    """Every step ``run_id`` has logged, over all its sessions (a resumed run has several)."""
    return [s for d in run_dirs(wandb_dir, run_id) for s in steps(records(d))]


def run_info(recs: list[dict]) -> dict:
    """Id, name, group and job type of a run, from its run record."""
    for r in recs:
        if r.get("type") == "run":
            run = r["run"]
            return {"id": run.get("run_id"), "name": run.get("display_name"), "group": run.get("run_group"),
                    "job_type": run.get("job_type")}
    return {}


def last_table(run_folder: Path, recs: list[dict], key: str) -> dict | None:
    """Table ``key`` as this session last logged it: ``{"step", "columns", "data"}`` (None if never)."""
    for item in reversed(history(recs)):
        path = item.get(f"{key}.path")
        if path and (run_folder / "files" / path).is_file():
            table = json.loads((run_folder / "files" / path).read_text())
            return {"step": int(item["_step"]), "columns": table["columns"], "data": table["data"]}
    return None


def show(run_dir: Path, trial: str = "", table: str = "", width: int = 80) -> str:
    """What ``python -m pipelines.live`` prints: per W&B run its sessions and steps, and ``table``."""
    wandb_dir = run_dir / "wandb"
    by_id: dict[str, list[Path]] = {}
    for d in run_dirs(wandb_dir):
        by_id.setdefault(folder_run_id(d), []).append(d)
    lines = []
    for run_id, folders in by_id.items():
        recs = [records(d) for d in folders]
        info = next((i for i in map(run_info, recs) if i), {})
        if trial and trial not in f"{run_id} {info.get('name') or ''}":
            continue
        sessions = [steps(r) for r in recs]
        flat = [s for session in sessions for s in session]
        twice = sorted({s for s in flat if flat.count(s) > 1})
        lines.append(f"run {run_id} {info.get('name') or ''} (group {info.get('group')}, {info.get('job_type')}): "
                     f"{len(folders)} session(s), steps {_spans(sessions)}" + (f"; LOGGED TWICE: {twice}" if twice else ""))
        if table:
            got = last_table(folders[-1], recs[-1], table)
            if got:
                lines.append(f"  table {table} at step {got['step']}:")
                lines += ["    " + ln for ln in _aligned(got["columns"], got["data"], width).splitlines()]
    return "\n".join(lines) if lines else f"no W&B runs in {wandb_dir}"


def _aligned(columns: list[str], data: list[list], width: int = 80) -> str:
    """A table as plain text (``rich``): numbers right-aligned, text left-aligned, cut at ``width``."""
    import io

    from rich import box
    from rich.console import Console
    from rich.table import Table

    numeric = [all(isinstance(r[i], (int, float)) for r in data) for i in range(len(columns))]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for name, num in zip(columns, numeric):
        table.add_column(name, justify="right" if num else "left", no_wrap=True, overflow="ellipsis",
                         max_width=None if num or not width else width)
    for r in data:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in r))
    console = Console(file=io.StringIO(), width=400, color_system=None, legacy_windows=False)
    console.print(table)
    return "\n".join(ln.rstrip() for ln in console.file.getvalue().splitlines() if ln.strip())


def _spans(sessions: list[list[int]]) -> str:
    return " + ".join(f"{s[0]}..{s[-1]}" if len(s) > 1 else (str(s[0]) if s else "none") for s in sessions)


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv[1:] if "=" in a)
    if not argv or not Path(argv[0]).is_dir() or not args.get("width", "0").isdigit():
        print("usage: python -m pipelines.live RUN_DIR [trial=NAME] [table=NAME] [width=CHARS, 0: no cut]",
              file=sys.stderr)
        return 2
    print(show(Path(argv[0]), args.get("trial", ""), args.get("table", ""), int(args.get("width", 80))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
