"""The sweep's progress view in the terminal: trials by status, each running trial's budget, and an ETA.

A Ray Tune callback on the driver: it reads what each trial last reported (step, dev score,
example-evaluations used) from Tune's own trial objects, so it holds no state a resume
would have to restore. On a terminal it is a ``rich`` live table refreshed in place (the
trials' own lines scroll above it); when output is not a terminal (CI, ``ray job submit``
logs, a pipe) it prints the same facts as plain ``[sweep]`` lines: the headline when a trial
starts or ends, and the headline with every running trial every ``interval_s`` seconds.

The estimate of the time left assumes the rest of the sweep goes at the pace of this run
so far: ``elapsed * left / done``, where each trial's share done is the furthest of its
example-evaluations against its cap, its steps against ``max_steps`` and its steps against
those its method plans (``manual``: 1, APE: its rounds + 1; the trial reports it as
``progress``). An open-ended method that stops early (GRIPS's patience) finishes sooner than
estimated; scoring the final prompt on test, after the search, is not in it.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, replace

from ray.tune import Callback

from pipelines.lm.budget import share_spent
from pipelines.summary import trial_label
from pipelines.trial import apply_samples

MODES = ("auto", "live", "plain", "off")
FINISHED = ("TERMINATED", "ERROR")


@dataclass(frozen=True)
class Row:
    """One trial as the view shows it."""

    label: str
    status: str
    step: int
    dev: float
    examples: int
    calls: int
    wall_s: float
    share: float  # of the trial's work done, in [0, 1]
    tested: bool = False  # its final prompt was scored on test: the trial's last report


NOT_CREATED = Row("", "PENDING", 0, math.nan, 0, 0, 0.0, 0.0)  # a trial Tune has not created yet


def row(trial, cap: int | None, max_steps: int) -> Row:
    """A Tune trial's last report as a :class:`Row`."""
    result = trial.last_result or {}
    config = trial.config or {}
    spec = apply_samples(config["trial"], config.get("sample", {})) if "trial" in config else {}
    step, examples = int(result.get("step", 0) or 0), int(result.get("scorer_examples", 0) or 0)
    status, tested = str(trial.status), "test_score" in result  # the last report comes after the search
    if status in FINISHED or tested:
        share = 1.0
    elif "progress" in result:  # the trial's own: it also knows the steps its method plans
        share = float(result["progress"])
    else:  # a report from before trials sent their progress
        share = share_spent(step, examples, cap, max_steps)
    return Row(trial_label(spec) if spec else str(trial), status, step, float(result.get("dev_score", math.nan)),
               examples, int(result.get("scorer_calls", 0) or 0), float(result.get("wall_s", 0.0) or 0.0),
               min(share, 1.0), tested)


def counts(rows: list[Row]) -> dict[str, int]:
    """Trials by status. ``stopped``: ended by the scheduler (ASHA, PBT) or by Ctrl+C before
    their test score (Tune calls both terminated); shown only when there are some."""
    running = sum(r.status in ("RUNNING", "PAUSED") for r in rows)
    done = sum(r.status == "TERMINATED" and r.tested for r in rows)
    stopped = sum(r.status == "TERMINATED" and not r.tested for r in rows)
    failed = sum(r.status == "ERROR" for r in rows)
    out = {"running": running, "pending": len(rows) - running - done - stopped - failed, "done": done,
           "failed": failed}
    return out | ({"stopped": stopped} if stopped else {})


def eta_s(rows: list[Row], elapsed_s: float, share_at_start: float) -> float | None:
    """Seconds left at this run's pace so far (``None`` until some work is done in this run)."""
    if not rows:
        return None
    share = sum(r.share for r in rows) / len(rows)
    gained = share - share_at_start
    if share >= 1.0 - 1e-9:
        return 0.0
    if gained <= 1e-9 or elapsed_s <= 0:
        return None
    return elapsed_s * (1.0 - share) / gained


def duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def headline(rows: list[Row], elapsed_s: float, eta: float | None) -> str:
    c = counts(rows)
    share = sum(r.share for r in rows) / len(rows) if rows else 0.0
    stopped = f", {c['stopped']} stopped" if "stopped" in c else ""
    # Searches over but trials still running: they are scoring their final prompts on test,
    # which the estimate does not cover; say so rather than "0s".
    left = "test scoring left" if eta == 0.0 and c["running"] else f"ETA {duration(eta)}"
    return (f"{c['running']} running, {c['pending']} pending, {c['done']} done, {c['failed']} failed{stopped}"
            f" | {share:.0%} of the sweep | elapsed {duration(elapsed_s)}, {left}")


def budget_text(r: Row, cap: int | None) -> str:
    return f"{r.examples:,}/{cap:,} ({r.examples / cap:.0%})" if cap else f"{r.examples:,}"


def step_text(r: Row, max_steps: int) -> str:
    return f"{r.step}/{max_steps}" if max_steps else str(r.step)


def plain_lines(rows: list[Row], elapsed_s: float, eta: float | None, cap: int | None, max_steps: int) -> list[str]:
    """The view as plain lines: the headline, then one line per running trial."""
    lines = [f"[sweep] {headline(rows, elapsed_s, eta)}"]
    for r in rows:
        if r.status in ("RUNNING", "PAUSED"):
            lines.append(f"[sweep]   {r.label}: step {step_text(r, max_steps)}, dev {r.dev:.3f}, "
                         f"scorer_examples {budget_text(r, cap)}, {duration(r.wall_s)}")
    return lines


def table(rows: list[Row], elapsed_s: float, eta: float | None, cap: int | None, max_steps: int):
    """The view as ``rich`` renderables: the headline over a table of running trials, then failed ones."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    t = Table(expand=False)
    for name, justify in (("trial", "left"), ("status", "left"), ("step", "right"), ("dev", "right"),
                          ("scorer examples", "right"), ("calls", "right"), ("time", "right")):
        t.add_column(name, justify=justify, no_wrap=name != "trial")
    shown = [r for r in rows if r.status in ("RUNNING", "PAUSED")] + [r for r in rows if r.status == "ERROR"]
    for r in shown:
        style = "red" if r.status == "ERROR" else None
        t.add_row(r.label, r.status.lower(), step_text(r, max_steps), "" if math.isnan(r.dev) else f"{r.dev:.3f}",
                  budget_text(r, cap), str(r.calls), duration(r.wall_s), style=style)
    return Group(Text(f"promptsweep: {headline(rows, elapsed_s, eta)}", style="bold"), t)


class SweepProgress(Callback):
    """Tune callback drawing the progress view (see the module docstring).

    Args:
        cap: each trial's cap on scorer example-evaluations (``None``: no cap).
        max_steps: each trial's cap on steps.
        mode: ``auto`` (live on a terminal, else plain), ``live``, ``plain`` or ``off``.
        interval_s: plain mode prints at most this often while nothing starts or ends.
    """

    def __init__(self, cap: int | None, max_steps: int, mode: str = "auto", interval_s: float = 30.0) -> None:
        if mode not in MODES:
            raise ValueError(f"progress.mode must be one of {', '.join(MODES)}, not {mode!r}")
        if not isinstance(interval_s, (int, float)) or isinstance(interval_s, bool) or not interval_s > 0:
            raise ValueError(f"progress.interval_s must be a number of seconds > 0, not {interval_s!r}")
        self.cap, self.max_steps, self.mode, self.interval_s = cap, int(max_steps), mode, float(interval_s)
        self._reset()

    def _reset(self, total: int = 0) -> None:
        self._total = total  # Tune creates trials as it starts them: the rest are not in its list yet
        self._start = time.monotonic()
        self._share_at_start: float | None = None
        self._live = None
        self._printed_at = -math.inf
        self._printed_key: dict | None = None
        self._drawn_at = -math.inf

    def __getstate__(self) -> dict:
        # Tune pickles its run config (callbacks included) for Tuner.restore: keep settings only.
        return {"cap": self.cap, "max_steps": self.max_steps, "mode": self.mode, "interval_s": self.interval_s}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset()

    def setup(self, total_num_samples: int | None = None, **info) -> None:
        self._reset(int(total_num_samples or 0))
        if self._resolved_mode() == "live":
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(), refresh_per_second=2, redirect_stdout=True, redirect_stderr=True)
            self._live.start()

    def _resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return "live" if sys.stdout.isatty() else "plain"

    def on_step_end(self, iteration: int, trials: list, **info) -> None:
        self._show(trials)

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._show(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._show(trials)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._show(trials)

    def on_experiment_end(self, trials: list, **info) -> None:
        self._show(trials, final=True)
        if self._live is not None:
            self._live.stop()
            self._live = None

    def _show(self, trials: list, final: bool = False) -> None:
        """Redraw (live) or print (plain) when due. Tune calls this on every pass of its loop,
        so the rows are only built when something will be shown."""
        mode = self._resolved_mode()
        if mode == "off":
            return
        now = time.monotonic()
        if mode == "live":
            due = self._live is not None and (final or now - self._drawn_at >= 0.5)
        else:
            key = counts(_statuses(trials, self._total))
            if final and key == self._printed_key:
                return  # the last lines printed already say it
            whole = final or now - self._printed_at >= self.interval_s
            due = whole or key != self._printed_key  # on a start or end: the headline only
        if not due and self._share_at_start is not None:
            return
        rows = [row(t, self.cap, self.max_steps) for t in trials]
        rows += [NOT_CREATED] * max(0, self._total - len(rows))
        if self._share_at_start is None and rows:  # a resumed sweep starts part-way
            self._share_at_start = sum(r.share for r in rows) / len(rows)
        if not due:
            return
        elapsed = now - self._start
        eta = eta_s(rows, elapsed, self._share_at_start or 0.0)
        if mode == "live":
            self._live.update(table(rows, elapsed, eta, self.cap, self.max_steps), refresh=True)
            self._drawn_at = now
            return
        lines = plain_lines(rows, elapsed, eta, self.cap, self.max_steps)
        print(*(lines if whole else lines[:1]), sep="\n", flush=True)
        self._printed_key = key
        if whole:
            self._printed_at = now


def _statuses(trials: list, total: int) -> list[Row]:
    """Rows holding only what :func:`counts` reads (status, tested): cheap enough for every pass."""
    rows = [replace(NOT_CREATED, status=str(t.status), tested="test_score" in (t.last_result or {})) for t in trials]
    return rows + [NOT_CREATED] * max(0, total - len(rows))
