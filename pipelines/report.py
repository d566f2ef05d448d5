"""Turn a run directory into a side-by-side comparison: ``report.md`` plus PNG plots.

Usage: ``python -m pipelines.report RUN_DIR``. Reads ``summary.json`` (one row per trial,
failures included), ``evaluations.jsonl`` (every candidate scored, in order),
``outputs/<trial>.jsonl`` (each final prompt's score on every test example) and any
``transfer/*.json`` that :mod:`pipelines.transfer` added. The same numbers are exposed as
DataFrames (:func:`report_tables`) and images (:func:`plot_paths`) so the sweep driver can
log exactly what the Markdown shows.

The leaderboard ranks methods by mean test score over seeds, with a 95% bootstrap interval
over test examples, a t-interval over seeds, paired permutation tests against the ``manual``
baseline and against the best method (Holm-corrected; :mod:`pipelines.stats`), the budget
used in example-evaluations, an anytime score and the dev-test gap. "mean ± std" is over
seeds (``ddof=1``; "-" for one seed); NaN scores are left out of means; a method's best
prompt is its best-dev seed's (test is never used to pick).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from pipelines.summary import with_labels
from pipelines.results import read_jsonl
from pipelines.stats import anytime_score, bootstrap_interval, holm, paired_p, seed_interval

BASELINE = "manual"
BASELINES = (BASELINE, "empty")  # listed first; `empty` is the template with no instruction
NON_MEAN_METRICS = {"macro_f1"}  # intervals and tests then use per-example accuracy (said in the report)
X_AXES = {  # evaluation-log field -> axis label of a best-so-far panel
    "scorer_examples": "scorer example-evaluations", "tokens": "tokens (scorer + proposer)", "wall_s": "trial seconds",
}
FAMILIES = {
    "TextPrompt": "text instruction", "TokenPrompt": "trigger tokens", "SoftPrompt": "soft prompt",
    "PrefixPrompt": "key/value prefix",
}
PROMPT_WIDTH = 80
SOFT_DESCRIPTION = re.compile(r"^<soft (\d+)x(\d+): (.*)>$", re.S)
PREFIX_DESCRIPTION = re.compile(r"^<prefix (\d+)x(\d+)(?:: from (.*))?>$", re.S)


class ReportError(Exception):
    """The run directory cannot be reported on (shown to the user as one line)."""


@dataclass(frozen=True)
class Run:
    """What a run directory holds, split into finished and failed trials."""

    dir: Path
    ok: tuple[dict, ...]
    failed: tuple[dict, ...]
    evaluations: tuple[dict, ...]
    wall_s: float
    stopped: int = 0  # trials a scheduler (ASHA, PBT) stopped early: no test score, not in the tables


def load_run(run_dir: Path | str) -> Run:
    """Read ``summary.json`` and the evaluation log; raises :class:`ReportError` without a summary."""
    run_dir = Path(run_dir)
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ReportError(f"no summary.json in {run_dir} (is it a finished run directory?)")
    try:
        summary = json.loads(path.read_text())
        rows = list(summary["trials"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReportError(f"{path} is not a run summary: {type(err).__name__}: {err}") from err
    ok = tuple(r for r in rows if r.get("status") == "ok")
    failed = tuple(r for r in rows if r.get("status") not in ("ok", "stopped"))
    stopped = sum(r.get("status") == "stopped" for r in rows)
    evaluations = tuple(read_jsonl(run_dir / "evaluations.jsonl"))  # merged before the summary is written
    return Run(run_dir, ok, failed, evaluations, float(summary.get("wall_s") or 0.0), stopped)


def _tasks(run: Run) -> list[str]:
    return sorted({str(r.get("task", "?")) for r in run.ok})


def _method_order(rows: Sequence[dict]) -> list[str]:
    """Baselines first, then text, token and soft methods, each alphabetically."""
    kinds = {r["method"]: r.get("prompt_kind", "") for r in rows}
    family = {k: i for i, k in enumerate(FAMILIES)}
    base = {m: i for i, m in enumerate(BASELINES)}
    return sorted(kinds, key=lambda m: (base.get(m, len(base)), family.get(kinds[m], len(family)), m))


def _by_method(rows: Sequence[dict], task: str) -> dict[str, list[dict]]:
    rows = [r for r in rows if r.get("task") == task]
    seed = lambda r: str(r.get("seed")).zfill(12)  # noqa: E731 - numeric order for ints, stable for the rest
    return {m: sorted((r for r in rows if r["method"] == m), key=seed) for m in _method_order(rows)}


def _number(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def mean_std(values: Sequence) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the finite values; std is NaN with fewer than two."""
    xs = np.array([_number(v) for v in values], dtype=float)
    xs = xs[np.isfinite(xs)]
    if xs.size == 0:
        return math.nan, math.nan
    return float(xs.mean()), float(xs.std(ddof=1)) if xs.size > 1 else math.nan


def best_row(rows: Sequence[dict]) -> dict:
    """The seed with the highest dev score (the first one if no dev score is finite)."""
    devs = [_number(r.get("dev_score")) for r in rows]
    finite = [i for i, d in enumerate(devs) if math.isfinite(d)]
    return rows[max(finite, key=lambda i: devs[i])] if finite else rows[0]


def _family_view(row: dict) -> tuple[str, str]:
    """What a human should read of a prompt: (text, token ids or soft-prompt shape)."""
    kind, text = row.get("prompt_kind", ""), str(row.get("best_prompt", ""))
    if kind == "TokenPrompt":
        return text, str(list(row.get("prompt_tokens") or []))
    if kind == "PrefixPrompt" and (match := PREFIX_DESCRIPTION.match(text)):
        origin = f"(trained from {match.group(3)})" if match.group(3) else "(trained)"
        return origin, f"{match.group(1)} positions x {match.group(2)} key/value numbers"
    match = SOFT_DESCRIPTION.match(text) if kind == "SoftPrompt" else None
    return (match.group(3), f"{match.group(1)} vectors x {match.group(2)} dims") if match else (text, "")


def _method_row(method: str, rows: Sequence[dict], n_failed: int) -> dict:
    """One method's line: seeds, dev/test mean and std, mean cost per trial, and the best seed's
    prompt (``best_prompt`` as logged; ``found``/``detail`` in its family's words)."""
    mean = lambda f: mean_std([f(r) for r in rows])[0]  # noqa: E731
    (dev, dev_std), (test, test_std) = (mean_std([r.get(k) for r in rows]) for k in ("dev_score", "test_score"))
    best = best_row(rows)
    found, detail = _family_view(best)
    return {
        "method": method, "family": FAMILIES.get(best.get("prompt_kind", ""), "?"),
        "seeds": len(rows), "failed": n_failed,
        "dev_mean": dev, "dev_std": dev_std, "test_mean": test, "test_std": test_std,
        "scorer_examples": mean(lambda r: r.get("scorer_examples")),
        "scorer_calls": mean(lambda r: r.get("scorer_calls")),
        "tokens": mean(lambda r: _number(r.get("scorer_tokens", 0)) + _number(r.get("proposer_tokens", 0))),
        "wall_s": mean(lambda r: r.get("wall_s")),
        "best_seed": best.get("seed"), "best_dev": _number(best.get("dev_score")),
        "best_test": _number(best.get("test_score")), "best_prompt": str(best.get("best_prompt", "")),
        "found": found, "detail": detail,
    }


def summary_table(run: Run, task: str) -> pd.DataFrame:
    """One row per method on ``task`` (see :func:`_method_row`), baseline first."""
    failed = [r.get("method") for r in run.failed if r.get("task") == task]
    return pd.DataFrame([_method_row(m, rows, failed.count(m)) for m, rows in _by_method(run.ok, task).items()])


def groups_table(run: Run, task: str) -> pd.DataFrame | None:
    """Group (e.g. MMLU subject) x method: mean test score over seeds; None without groups."""
    methods = {m: rs for m, rs in _by_method(run.ok, task).items() if any(r.get("test_groups") for r in rs)}
    groups = sorted({g for rs in methods.values() for r in rs for g in (r.get("test_groups") or {})})
    if not groups:
        return None
    mean = lambda rs, g: mean_std([(r.get("test_groups") or {}).get(g) for r in rs])[0]  # noqa: E731
    return pd.DataFrame({"group": groups, **{m: [mean(rs, g) for g in groups] for m, rs in methods.items()}})


def report_tables(run_dir: Path | str) -> dict[str, pd.DataFrame]:
    """Numeric tables behind the report, keyed ``summary/<task>``, ``prompts/<task>`` (best prompt
    per method, by family), ``groups/<task>`` (if test groups exist), ``failures`` (if any)."""
    return _tables(load_run(run_dir))


def _tables(run: Run) -> dict[str, pd.DataFrame]:
    tables = {}
    for task in _tasks(run):
        tables[f"leaderboard/{task}"] = leaderboard(run, task)
        if (cal := calibration_table(run, task)) is not None:
            tables[f"calibration/{task}"] = cal
        summary = tables[f"summary/{task}"] = summary_table(run, task)
        tables[f"prompts/{task}"] = summary[["family", "method", "best_seed", "best_dev", "best_test", "found",
                                             "detail"]]
        if (groups := groups_table(run, task)) is not None:
            tables[f"groups/{task}"] = groups
    for entry in transfers(run):
        tables[f"transfer/{entry['file'].removesuffix('.json')}"] = transfer_table(entry)
    if run.failed:
        cols = ["task", "method", "seed", "trial", "error"]
        tables["failures"] = pd.DataFrame([{c: r.get(c, "?") for c in cols} for r in run.failed], columns=cols)
    return tables


def best_so_far(records: Sequence[dict], x: str = "scorer_examples") -> tuple[np.ndarray, np.ndarray]:
    """One trial's best dev score against its cumulative cost ``x`` (file order).

    ``x`` is a cost field every record carries: ``scorer_examples`` (the budget's unit),
    ``scorer_calls``, ``tokens`` or ``wall_s``, each as it stood when the record's step ended.
    Within a step (consecutive records with the same cost), the step's cost is shared out in
    the order the method reported its candidates, in proportion to the examples each was
    scored on: APE's eight candidates scored in one batched call then read as eight points
    of one search rather than one jump. Only records scored on the trial's full dev set count
    as a best: racing scores some candidates on a few examples, and such a score is too noisy
    to call the best so far (their cost still counts).

    Returns:
        ``(cost [k], best [k])``, cost increasing.
    """
    recs = [r for r in records if math.isfinite(_number(r.get(x)))]
    if not recs:
        return np.zeros(0), np.zeros(0)
    ends = np.maximum.accumulate(np.array([_number(r[x]) for r in recs]))
    sizes = np.array([max(_number(r.get("n")), 1.0) if math.isfinite(_number(r.get("n"))) else 1.0 for r in recs])
    cost, start, i = np.empty(len(recs)), 0.0, 0
    while i < len(recs):
        j = i
        while j < len(recs) and ends[j] == ends[i]:
            j += 1
        share = np.cumsum(sizes[i:j]) / sizes[i:j].sum()
        cost[i:j] = start + (ends[i] - start) * share
        start, i = ends[i], j
    full = max((_number(r.get("n")) for r in recs), default=math.nan)
    keep = np.array([not math.isfinite(full) or _number(r.get("n")) == full for r in recs])
    if not keep.any():
        return np.zeros(0), np.zeros(0)
    best = np.fmax.accumulate(np.array([_number(r.get("score")) for r in recs])[keep])  # fmax: NaN never wins
    cost = cost[keep]
    last = np.r_[cost[1:] != cost[:-1], True]  # one point per cost
    return cost[last], best[last]


def mean_curve(curves: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """Seeds' step curves on the union of their x: ``(x, mean, min, max)``, each ``[k]``.

    The curve starts once every seed has a point (so the mean is always over the same
    seeds); a seed that stopped early holds its final best.
    """
    curves = [(x, y) for x, y in curves if x.size]
    grid = np.unique(np.concatenate([x for x, _ in curves])) if curves else np.zeros(0)
    grid = grid[grid >= max((x[0] for x, _ in curves), default=0)]
    at = np.array([y[np.searchsorted(x, grid, side="right") - 1] for x, y in curves]).reshape(-1, grid.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        return grid, np.nanmean(at, 0), np.nanmin(at, 0), np.nanmax(at, 0)


def _logs(run: Run) -> dict[str, list[dict]]:
    by_trial: dict[str, list[dict]] = {}
    for rec in run.evaluations:
        by_trial.setdefault(str(rec.get("trial")), []).append(rec)
    return by_trial


def method_curves(run: Run, task: str, x: str = "scorer_examples") -> dict[str, tuple[int, tuple[np.ndarray, ...]]]:
    """Per method on ``task``: (seeds with a log, mean curve against ``x``), from finished trials only."""
    by_trial, out = _logs(run), {}
    for method, rows in _by_method(run.ok, task).items():
        curves = [c for r in rows if (c := best_so_far(by_trial.get(str(r.get("trial")), []), x))[0].size]
        if curves:
            out[method] = (len(curves), mean_curve(curves))
    return out


def budget_span(run: Run, task: str) -> float:
    """The example budget the anytime score integrates over: the trials' common cap
    (``budget.scorer.examples``), else the most any trial of the task spent."""
    rows = [r for r in run.ok if r.get("task") == task]
    caps = {r.get("budget_examples") for r in rows}
    if len(caps) == 1 and (cap := _number(next(iter(caps)))) > 0:
        return cap
    return max((_number(r.get("scorer_examples")) for r in rows), default=math.nan)


def anytime_scores(run: Run, task: str) -> dict[str, float]:
    """Per trial: the normalized area under its best-so-far dev curve against example-evaluations."""
    span, by_trial = budget_span(run, task), _logs(run)
    out = {}
    for r in run.ok:
        if r.get("task") == task:
            x, best = best_so_far(by_trial.get(str(r.get("trial")), []))
            out[str(r.get("trial"))] = anytime_score(x, best, span) if math.isfinite(span) else math.nan
    return out


def example_scores(run: Run, row: dict, key: str = "score") -> np.ndarray | None:
    """A trial's per-example test scores from ``outputs/<trial>.jsonl`` (``None`` when absent).

    ``key`` is ``score`` (what the task selects with), ``score_raw`` or ``score_calibrated``.
    Runs from before per-example scores were saved fall back to ``correct``.
    """
    path = run.dir / str(row.get("outputs", ""))
    if not row.get("outputs") or not path.is_file():
        return None
    recs = read_jsonl(path)
    vals = [rec.get(key, rec.get("correct") if key == "score" else None) for rec in recs]
    if not vals or any(v is None for v in vals):
        return None
    return np.array(vals, dtype=np.float64)


def score_matrix(run: Run, rows: Sequence[dict], key: str = "score") -> np.ndarray | None:
    """``[n_test, seeds]`` per-example scores of a method's seeds (those with saved outputs)."""
    return _stacked([s for r in rows if (s := example_scores(run, r, key)) is not None])


def _stacked(cols: list[np.ndarray]) -> np.ndarray | None:
    """Seeds' per-example score vectors side by side; ``None`` without any, or if their lengths differ."""
    return np.stack(cols, axis=1) if cols and len({c.size for c in cols}) == 1 else None


def _against_baselines(methods: Sequence[str], mats: dict) -> dict[str, dict[str, float]]:
    """Per baseline the run has: each other method's Holm-corrected paired p-value against it."""
    out = {}
    for base in BASELINES:
        others = [m for m in methods if m != base]
        out[base] = dict(zip(others, holm([_p(mats[m], mats.get(base)) for m in others]))) if base in mats else {}
    return out


def _p(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None or a.shape[0] != b.shape[0]:
        return math.nan
    return paired_p(a, b)


def leaderboard(run: Run, task: str) -> pd.DataFrame:
    """Methods on ``task`` ranked by mean test score, with the statistics a reviewer asks for.

    Columns: rank, method, seeds, test (mean over seeds), ``ci_lo``/``ci_hi`` (95% bootstrap
    over test examples, seeds averaged per example), ``seed_lo``/``seed_hi`` (95% t-interval
    over seeds), ``p_manual``/``p_empty``/``p_best`` (paired permutation tests against each
    baseline and against the top-ranked method, each Holm-corrected across the methods tested),
    ``examples`` (mean example-evaluations per trial), ``anytime`` (mean over seeds),
    ``gap`` (dev minus test) with ``overfit`` when it exceeds two standard errors of a dev
    score at that level, and the raw and calibrated test means.
    """
    by = _by_method(run.ok, task)
    if not by:
        return pd.DataFrame()
    mats = {m: score_matrix(run, rows) for m, rows in by.items()}
    test = {m: mean_std([r.get("test_score") for r in rows])[0] for m, rows in by.items()}
    order = sorted(by, key=lambda m: (-test[m] if math.isfinite(test[m]) else math.inf, m))
    best, p_base = order[0], _against_baselines(order, mats)
    rest = [m for m in order if m != best]
    p_best = dict(zip(rest, holm([_p(mats[m], mats[best]) for m in rest])))
    anytime = anytime_scores(run, task)
    rows_out = []
    for rank, m in enumerate(order, 1):
        rows = by[m]
        ci = bootstrap_interval(mats[m]) if mats[m] is not None else (math.nan, math.nan)
        seeds = seed_interval([_number(r.get("test_score")) for r in rows])
        dev = mean_std([r.get("dev_score") for r in rows])[0]
        n_dev = mean_std([r.get("n_dev") for r in rows])[0]
        gap = dev - test[m]
        se = math.sqrt(max(test[m] * (1 - test[m]), 0.0) / n_dev) if n_dev > 0 and math.isfinite(test[m]) else math.nan
        rows_out.append({
            "rank": rank, "method": m, "seeds": len(rows), "test": test[m], "ci_lo": ci[0], "ci_hi": ci[1],
            "seed_lo": seeds[0], "seed_hi": seeds[1],
            **{f"p_{base}": p_base[base].get(m, math.nan) for base in BASELINES}, "p_best": p_best.get(m, math.nan),
            "examples": mean_std([r.get("scorer_examples") for r in rows])[0],
            "anytime": mean_std([anytime.get(str(r.get("trial"))) for r in rows])[0],
            "dev": dev, "gap": gap, "overfit": bool(math.isfinite(se) and gap > 2 * se),
            "raw": mean_std([r.get("test_score_raw") for r in rows])[0],
            "calibrated": mean_std([r.get("test_score_calibrated") for r in rows])[0],
        })
    return pd.DataFrame(rows_out)


def transfers(run: Run) -> list[dict]:
    """What :mod:`pipelines.transfer` wrote into the run (``transfer/*.json``), by file name."""
    out = []
    for path in sorted((run.dir / "transfer").glob("*.json")):
        try:
            out.append({**json.loads(path.read_text()), "file": path.name})
        except (json.JSONDecodeError, OSError):
            continue
    return out


def transfer_table(entry: dict) -> pd.DataFrame:
    """Per method (baselines first): its source test score, the target test score with a 95%
    bootstrap interval over the target's examples, raw and calibrated, and the paired p-value
    against each baseline on the target (Holm-corrected); skipped trials counted."""
    rows = list(entry.get("rows", []))
    mats = {m: _stacked([np.asarray(r["scores"], dtype=np.float64) for r in rows if r["method"] == m and r.get("scores")])
            for m in _method_order(rows)}
    p = _against_baselines(list(mats), mats)
    out = []
    for m, mat in mats.items():
        mine = [r for r in rows if r["method"] == m]
        lo, hi = bootstrap_interval(mat) if mat is not None else (math.nan, math.nan)
        out.append({
            "method": m, "seeds": sum(not r.get("skipped") for r in mine), "skipped": sum(bool(r.get("skipped")) for r in mine),
            "why": next((r["skipped"] for r in mine if r.get("skipped")), ""),
            "source_test": mean_std([r.get("source_test") for r in mine])[0],
            "test": mean_std([r.get("test_score") for r in mine if not r.get("skipped")])[0], "ci_lo": lo, "ci_hi": hi,
            "raw": mean_std([r.get("test_score_raw") for r in mine])[0],
            "calibrated": mean_std([r.get("test_score_calibrated") for r in mine])[0],
            **{f"p_{base}": p[base].get(m, math.nan) for base in BASELINES},
        })
    return pd.DataFrame(out)


def _transfer_md(entry: dict, table: pd.DataFrame) -> list[str]:
    bases = [b for b in BASELINES if b in set(table["method"])]
    rows = [[md_cell(r.method), str(r.seeds) + (f" (+{r.skipped} skipped)" if r.skipped else ""), fmt(r.source_test),
             fmt(r.test), interval(r.ci_lo, r.ci_hi),
             f"{fmt(r.raw)} → {fmt(r.calibrated)}" if math.isfinite(_number(r.raw)) else "-",
             *(pvalue(getattr(r, f"p_{b}")) for b in bases)]
            for r in table.itertuples()]
    sources = ", ".join(map(md_cell, entry.get("source_models", [])))
    out = [f"### {md_cell(entry.get('task', '?'), None)} with {md_cell(entry.get('scorer_model', '?'), None)}", "",
           ("Each method's best-dev seed's prompt" if entry.get("trials") == "best" else "Every trial's best prompt")
           + f" (found on {sources}) scored on all {entry.get('n_test', '?')} test examples "
           f"of {md_cell(entry.get('task', '?'), None)}" + (" on the same model." if entry.get("same_model") else
                                                              " on another model."), "",
           md_table(["method", "seeds", "source test", "target test", "95% CI (test examples)", "raw → calibrated",
                     *(f"p vs {b}" for b in bases)], rows), ""]
    for r in table.itertuples():
        if r.skipped:
            out.append(f"- {md_cell(r.method)}: {r.skipped} skipped: {md_cell(r.why, None)}")
    return out + [""]


def calibration_table(run: Run, task: str) -> pd.DataFrame | None:
    """Per method: raw and contextually calibrated test score, each with its interval, and the
    paired p-value of the difference; ``None`` when the task was not calibratable."""
    out = []
    for m, rows in _by_method(run.ok, task).items():
        raw, cal = score_matrix(run, rows, "score_raw"), score_matrix(run, rows, "score_calibrated")
        if raw is None or cal is None:
            continue
        (raw_lo, raw_hi), (cal_lo, cal_hi) = bootstrap_interval(raw), bootstrap_interval(cal)
        out.append({"method": m, "raw": float(raw.mean()), "raw_lo": raw_lo, "raw_hi": raw_hi,
                    "calibrated": float(cal.mean()), "cal_lo": cal_lo, "cal_hi": cal_hi, "p": _p(raw, cal)})
    return pd.DataFrame(out) if out else None


def _colors(run: Run) -> dict[str, tuple]:
    """One color per method, the same in every plot (distinct for up to 20 methods)."""
    methods = _method_order(run.ok)
    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    return dict(zip(methods, itertools.cycle(palette)))


def _png(kind: str, task: str) -> str:
    return f"{kind}_{re.sub(r'[^A-Za-z0-9._-]+', '_', task)}.png"


def plot_best_so_far(run: Run, task: str, path: Path) -> Path | None:
    """Best-so-far dev score against example-evaluations, tokens and seconds (one panel each),
    mean over seeds with a min-max band; the example budget as a dotted line."""
    panels = {x: method_curves(run, task, x) for x in X_AXES}
    if not any(panels.values()):
        return None
    colors, span = _colors(run), budget_span(run, task)
    fig = Figure(figsize=(16, 4.8))  # a bare Figure renders with Agg: no pyplot, no global backend
    for ax, (x_key, curves) in zip(fig.subplots(1, len(panels)), panels.items()):
        for method, (n, (x, mean, lo, hi)) in curves.items():
            label, c = f"{method} ({n} seed{'s' * (n > 1)})", colors[method]
            if method in BASELINES or x.size == 1:
                ax.axhline(mean[-1], color=c, ls="--", lw=1.2, label=f"{label}: {mean[-1]:.3f}")
                continue
            ax.step(x, mean, where="post", color=c, lw=2, label=label)
            ax.fill_between(x, lo, hi, step="post", color=c, alpha=0.15, lw=0)
            ax.plot(x[-1], mean[-1], "o", color=c, ms=4)
        if x_key == "scorer_examples" and math.isfinite(span):
            ax.axvline(span, color="black", ls=":", lw=1)
        ax.set(xlabel=X_AXES[x_key], ylabel="best dev score so far")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{task}: best-so-far dev score against cost (mean over seeds, band = min-max)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never hides a curve
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_cost_quality(run: Run, task: str, path: Path, board: pd.DataFrame | None = None) -> Path | None:
    """Test score against the example-evaluations each method used: one point per method (mean
    over seeds, bars = 95% bootstrap interval over test examples), faint points per seed.
    ``board`` is the task's :func:`leaderboard` when the caller has it (its statistics are slow)."""
    board, colors = leaderboard(run, task) if board is None else board, _colors(run)
    if board.empty or not np.isfinite(board["examples"]).any():
        return None
    fig = Figure(figsize=(8, 4.8))
    ax = fig.subplots()
    for r in board.itertuples():
        c = colors[r.method]
        for t in _by_method(run.ok, task)[r.method]:
            ax.plot(_number(t.get("scorer_examples")), _number(t.get("test_score")), ".", color=c, alpha=0.35)
        err = [[max(r.test - r.ci_lo, 0)], [max(r.ci_hi - r.test, 0)]] if math.isfinite(r.ci_lo) else None
        ax.errorbar(r.examples, r.test, yerr=err, fmt="o", color=c, capsize=3, label=f"{r.method}: {r.test:.3f}")
    if math.isfinite(span := budget_span(run, task)):
        ax.axvline(span, color="black", ls=":", lw=1, label=f"budget: {span:,.0f}")
    ax.set(xlabel="scorer example-evaluations used per trial", ylabel="test score",
           title=f"{task}: test score against budget used")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_test(run: Run, task: str, path: Path) -> Path | None:
    """Test metric per method (mean, std error bars); the manual baseline as a dashed line."""
    table, colors = summary_table(run, task), _colors(run)
    if table.empty:
        return None
    bars, base = table[table["method"] != BASELINE], table[table["method"] == BASELINE]["test_mean"].dropna()
    fig = Figure(figsize=(max(5.0, 1.1 * len(bars) + 2.5), 4.5))
    ax, x = fig.subplots(), np.arange(len(bars))
    ax.set_xlim(-0.9, max(len(bars), 1) - 0.1)  # keeps a lone bar from filling the plot
    ax.bar(x, bars["test_mean"].fillna(0), yerr=bars["test_std"], capsize=4,  # NaN std (one seed): no error bar
           color=[colors[m] for m in bars["method"]], edgecolor="black", lw=0.5)
    for xi, mean, std in zip(x, bars["test_mean"], bars["test_std"].fillna(0)):
        top = (mean if math.isfinite(mean) else 0) + std + 0.01
        ax.text(xi, top, fmt(mean) if math.isfinite(mean) else "n/a", ha="center", va="bottom", fontsize=8)
    if len(base):
        ax.axhline(base.iloc[0], color="gray", ls="--", lw=1.5, label=f"{BASELINE} baseline: {base.iloc[0]:.3f}")
        ax.legend(fontsize=8, loc="lower right")
    tilt = {"rotation": 20, "ha": "right"} if max(map(len, bars["method"]), default=0) > 10 else {}  # long names
    sep = " " if tilt else "\n"
    ax.set_xticks(x, [f"{m}{sep}(n={n})" for m, n in zip(bars["method"], bars["seeds"])], fontsize=9, **tilt)
    ax.set(ylabel="test metric", title=f"{task}: test metric per method (mean ± std over seeds)")
    ax.set_ylim(0, max(1.0, float(np.nanmax(np.r_[table["test_mean"] + table["test_std"].fillna(0), 0]))) * 1.08)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def plot_paths(run_dir: Path | str) -> list[Path]:
    """Draw (or redraw) the run's plots into ``run_dir`` and return the files written."""
    return _plots(load_run(run_dir))


def _plots(run: Run, tables: dict[str, pd.DataFrame] | None = None) -> list[Path]:
    """Every plot of every task; with the report's ``tables``, the cost plot reuses their leaderboard."""
    made = []
    for task in _tasks(run):
        board = (tables or {}).get(f"leaderboard/{task}")
        made += [plot_best_so_far(run, task, run.dir / _png("best_so_far", task)),
                 plot_test(run, task, run.dir / _png("test", task)),
                 plot_cost_quality(run, task, run.dir / _png("cost", task), board)]
    return [p for p in made if p is not None]


def md_cell(text: object, width: int | None = PROMPT_WIDTH) -> str:
    """One line of text safe in a Markdown table cell, cut to ``width`` characters."""
    text = " ".join(str(text).split())
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    text = text.replace("\\", "\\\\").replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return re.sub(r"([|`*_\[\]])", r"\\\1", text)


def fmt(x: object, digits: int = 3) -> str:
    v = _number(x)
    return "-" if not math.isfinite(v) else f"{v:,.{digits}f}"


def pm(mean: float, std: float) -> str:
    return "-" if not math.isfinite(mean) else f"{mean:.3f} ± {fmt(std)}"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _summary_md(table: pd.DataFrame) -> str:
    header = ["method", "family", "seeds", "dev (mean ± std)", "test (mean ± std)", "scorer examples", "scorer calls",
              "tokens (scorer+proposer)", "wall s", "best prompt (best-dev seed)"]
    return md_table(header, [[
        md_cell(r.method), r.family, f"{r.seeds}" + (f" (+{r.failed} failed)" if r.failed else ""),
        pm(r.dev_mean, r.dev_std), pm(r.test_mean, r.test_std), fmt(r.scorer_examples, 0), fmt(r.scorer_calls, 0),
        fmt(r.tokens, 0), fmt(r.wall_s, 1), md_cell(r.best_prompt) if r.best_prompt.strip() else "_(no instruction)_",
    ] for r in table.itertuples()])


def pvalue(p: float) -> str:
    if not math.isfinite(p):
        return "-"
    return ("<0.001" if p < 0.001 else f"{p:.3f}") + (" *" if p < 0.05 else "")


def interval(lo: float, hi: float) -> str:
    return "-" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.3f}, {hi:.3f}]"


def _leaderboard_md(board: pd.DataFrame) -> str:
    bases = [b for b in BASELINES if b in set(board["method"])]
    header = ["rank", "method", "seeds", "test", "95% CI (test examples)", "95% CI (seeds)",
              *(f"p vs {b}" for b in bases), "p vs best", "examples used", "anytime", "dev − test", "raw → calibrated"]
    rows = [[
        str(r.rank), md_cell(r.method), str(r.seeds), fmt(r.test), interval(r.ci_lo, r.ci_hi),
        interval(r.seed_lo, r.seed_hi), *(pvalue(getattr(r, f"p_{b}")) for b in bases), pvalue(r.p_best),
        fmt(r.examples, 0), fmt(r.anytime),
        (f"{r.gap:+.3f}" if math.isfinite(r.gap) else "-") + (" ⚠ overfit" if r.overfit else ""),
        f"{fmt(r.raw)} → {fmt(r.calibrated)}" if math.isfinite(_number(r.raw)) else "-",
    ] for r in board.itertuples()]
    return md_table(header, rows)


def _calibration_md(table: pd.DataFrame) -> str:
    rows = [[md_cell(r.method), f"{r.raw:.3f} {interval(r.raw_lo, r.raw_hi)}",
             f"{r.calibrated:.3f} {interval(r.cal_lo, r.cal_hi)}", f"{r.calibrated - r.raw:+.3f}", pvalue(r.p)]
            for r in table.itertuples()]
    return md_table(["method", "raw test (95% CI)", "calibrated test (95% CI)", "change", "p (paired)"], rows)


LEADERBOARD_NOTE = (
    "Ranked by mean test score over seeds. **95% CI (test examples)**: BCa bootstrap (9,999 resamples) of the "
    "mean per-example score, each example's score averaged over the method's seeds; **95% CI (seeds)**: "
    "t-interval over seeds. **p**: two-sided paired permutation test (9,999 resamples) on the same per-example "
    "scores against each baseline (`manual`: the task's instruction; `empty`: no instruction) and against the "
    "top-ranked method, Holm-corrected across the methods in each column; * marks p < 0.05, and 0.0002 before "
    "correction is the smallest p that many resamples can show. **examples used**: scorer example-evaluations per trial (one prompt on one "
    "example = 1), the budget's unit. **anytime**: area under the best-so-far dev curve over the example "
    "budget, divided by it (0 before a method's first full-dev score). **dev − test**: a large positive gap "
    "means selection on the small dev set overfit; ⚠ marks a gap above two standard errors of a dev score. "
    "**raw → calibrated**: test score with and without contextual calibration (label probabilities divided "
    "by those of content-free inputs, Zhao et al. 2021); whichever the task selects with is the test column.")


def _family_md(table: pd.DataFrame) -> str:
    # ids go in a code span: read as numbers, never as Markdown
    rows = [[r.family, md_cell(r.method), md_cell(r.best_seed), fmt(r.best_dev), fmt(r.best_test),
             md_cell(r.found) if str(r.found).strip() else "_(no instruction)_",
             f"`{r.detail}`" if r.detail.startswith("[") else r.detail or "-"] for r in table.itertuples()]
    return md_table(["family", "method", "seed", "dev", "test", "what it found", "token ids / shape"], rows)


def _groups_md(table: pd.DataFrame) -> str:
    methods = [c for c in table.columns if c != "group"]
    rows = [[md_cell(g)] + [fmt(v) for v in vals] for g, *vals in table.itertuples(index=False)]
    rows.append(["**macro mean**"] + [fmt(table[m].mean()) for m in methods])
    return md_table(["group"] + [md_cell(m) for m in methods], rows)


def _details_md(run: Run, task: str) -> list[str]:
    """Every seed's best prompt in full, in a fence no backtick run in the prompt can close."""
    out = [f"### {md_cell(task, None)}"]
    for method, rows in _by_method(run.ok, task).items():
        for r in rows:
            text = with_labels(r)
            fence = "`" * max([3] + [len(m) + 1 for m in re.findall(r"`+", text)])
            out += ["", f"**{md_cell(method, None)}**, seed {md_cell(r.get('seed'))} ({r.get('prompt_kind', '?')}; "
                    f"dev {fmt(r.get('dev_score'))}, test {fmt(r.get('test_score'))})", "", fence, text, fence]
    return out + [""]


WRONG_SHOWN = 3  # wrong test answers shown per method


def _wrong_md(run: Run, task: str) -> list[str]:
    """A few test examples each method's best prompt got wrong, from the trial's saved outputs."""
    out = []
    for method, rows in _by_method(run.ok, task).items():
        row = best_row(rows)
        path = run.dir / str(row.get("outputs", ""))
        if not row.get("outputs") or not path.is_file():
            continue
        wrong = [r for r in read_jsonl(path) if not r.get("correct")]
        if not wrong:
            continue
        out += ["", f"**{md_cell(method, None)}** (seed {md_cell(row.get('seed'))}: {len(wrong)} wrong; "
                f"all outputs in `{md_cell(row['outputs'], None)}`)", "",
                md_table(["input", "output", "gold"], [[md_cell(r.get("input"), 80), md_cell(r.get("output"), 120),
                                                         md_cell(_gold(r.get("gold")), 40)] for r in wrong[:WRONG_SHOWN]])]
    return [f"### Wrong answers: {md_cell(task, None)}", *out, ""] if out else []


def _gold(gold) -> str:
    return " / ".join(map(str, gold)) if isinstance(gold, list) else str(gold)


def _task_md(run: Run, task: str, tables: dict[str, pd.DataFrame], plots: set[str]) -> list[str]:
    out = [f"## {md_cell(task, None)}", ""]
    board = tables.get(f"leaderboard/{task}")
    if board is not None and not board.empty:
        metric = next((r.get("metric") for r in run.ok if r.get("task") == task and r.get("metric")), "")
        note = (f" The task's metric is {metric}: intervals and tests use per-example accuracy." if metric in
                NON_MEAN_METRICS else "")
        out += ["### Leaderboard", "", _leaderboard_md(board), "", LEADERBOARD_NOTE + note, ""]
    if f"calibration/{task}" in tables:
        out += ["### Raw and calibrated test scores", "", _calibration_md(tables[f"calibration/{task}"]), "",
                "A method whose gain disappears under calibration mostly shifted the model's label prior.", ""]
    out += ["### Cost, spread and prompts", "", _summary_md(tables[f"summary/{task}"]), ""]
    for name, alt in ((_png("best_so_far", task), "best-so-far dev score"), (_png("cost", task), "test score against budget"),
                      (_png("test", task), "test metric")):
        link = f"![{alt}: {md_cell(task, None)}]({name})"
        out += [link if name in plots else f"_No {alt} plot: nothing logged._", ""]
    if f"groups/{task}" in tables:
        out += ["### Test score per group (mean over seeds)", "", _groups_md(tables[f"groups/{task}"]), ""]
    return out


def render(run: Run, tables: dict[str, pd.DataFrame], plots: Sequence[Path]) -> str:
    """The whole report as Markdown (plots referenced by file name, next to the report)."""
    tasks = _tasks(run)
    models = sorted({f"{r.get('scorer_model', '?')} / {r.get('proposer_model', '?')}" for r in run.ok})
    out = [f"# promptsweep report: {md_cell(run.dir.name, None)}", "",
           f"{len(run.ok)} finished trial(s), {len(run.failed)} failed"
           + (f", {run.stopped} stopped early by the scheduler" if run.stopped else "")
           + f"; {len(run.evaluations)} evaluations logged; "
           f"sweep wall time {run.wall_s:.0f} s. Scorer / proposer: {', '.join(map(md_cell, models)) or '-'}.", "",
           "Mean ± std over seeds (std with ddof=1, '-' for one seed); NaN scores are left out of means. "
           "Cost columns are means per trial. The best prompt is that of the seed with the best dev score.", ""]
    for task in tasks:
        out += _task_md(run, task, tables, {p.name for p in plots})
    if not tasks:
        out += ["_No trial finished._", ""]
    if entries := transfers(run):
        out += ["## Transfer", "", "The run's prompts scored elsewhere (`python -m pipelines.transfer`). Intervals and "
                "p-values as in the leaderboard, on the target's test examples.", ""]
        for entry in entries:
            out += _transfer_md(entry, tables[f"transfer/{entry['file'].removesuffix('.json')}"])
    if "failures" in tables:
        rows = [[md_cell(v) for v in r] for r in tables["failures"].itertuples(index=False)]
        out += ["## Failed trials", "", md_table(list(tables["failures"].columns), rows), ""]
    out += ["## What each family found", "", "Text methods: instruction text. AutoPrompt: trigger tokens (decoded "
            "text and ids). Soft prompts: nearest vocabulary token of each vector. Prefixes: the text their "
            "key/value states started from (states at every layer have no nearest words).", ""]
    for task in tasks:
        out += [f"### {md_cell(task, None)}", "", _family_md(tables[f"prompts/{task}"]), ""]
    out += ["## Full best prompts", ""]
    for task in tasks:
        out += _details_md(run, task)
    for task in tasks:
        out += _wrong_md(run, task)
    return "\n".join(out).rstrip() + "\n"


def write_report(run_dir: Path | str) -> Path:
    """Write ``report.md`` and the plots into ``run_dir``; returns the report's path."""
    run = load_run(run_dir)
    path = run.dir / "report.md"
    tables = _tables(run)
    path.write_text(render(run, tables, _plots(run, tables)))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if len(argv) != 1:
            raise ReportError("usage: python -m pipelines.report RUN_DIR")
        print(write_report(argv[0]))
    except ReportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
