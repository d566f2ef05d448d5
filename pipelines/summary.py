"""The comparison table printed at the end of a sweep."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

COLUMNS = ("method", "seed", "best prompt", "dev", "test", "examples", "LM calls", "tokens", "wall s")


def format_params(params: dict) -> str:
    """Sampled hyperparameters as ``k=v`` words (floats to 3 significant digits)."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def trial_label(spec: dict) -> str:
    """How a trial names itself in progress lines: method, seed and any sampled hyperparameters."""
    sampled = format_params(spec.get("sampled", {}))
    return f"{spec['method_name']} seed={spec['seed']}" + (f" {sampled}" if sampled else "")


def _fmt(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _prompt(text: str, width: int = 60) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def table_rows(rows: Sequence[dict]) -> list[tuple[str, ...]]:
    """One printable row per trial: scorer example-evaluations (the budget's unit); LM calls and tokens
    add the scorer's and the proposer's."""
    out = []
    for r in rows:
        if r.get("status") == "stopped":
            params = format_params(r.get("params") or {})
            out.append((r["method"], str(r["seed"]), _prompt(f"stopped early at step {r.get('steps')} {params}".strip()),
                        _fmt(r.get("dev_score")), "-", "-", "-", "-", "-"))
            continue
        if r.get("status") != "ok":
            out.append((r["method"], str(r["seed"]), f"FAILED: {_prompt(r.get('error', ''), 70)}", "-", "-", "-", "-", "-", "-"))
            continue
        calls = int(r.get("scorer_calls", 0) + r.get("proposer_calls", 0))
        tokens = int(r.get("scorer_tokens", 0) + r.get("proposer_tokens", 0))
        out.append((
            r["method"], str(r["seed"]), _prompt(with_labels(r)), _fmt(r.get("dev_score")),
            _fmt(r.get("test_score")), f"{int(r.get('scorer_examples', 0)):,}", str(calls), f"{tokens:,}",
            f"{r.get('wall_s', 0):.0f}",
        ))
    return out


def with_labels(row: dict) -> str:
    """A trial's best prompt, and the label words it is read with when its method chose them."""
    words = row.get("label_words")
    labels = f" [labels: {'/'.join(str(w).strip() for w in words)}]" if words else ""
    return f"{row.get('best_prompt', '')}{labels}"


def format_table(rows: Sequence[dict]) -> str:
    body = table_rows(rows)
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths]), *(line(b) for b in body)])


def print_table(rows: Sequence[dict], run_dir: Path, wall_s: float) -> None:
    """One table per task (a sweep over ``search.tasks`` has several), then where the results are."""
    for task in sorted({r.get("task", "?") for r in rows}):
        mine = [r for r in rows if r.get("task", "?") == task]
        n_test = sorted({r.get("n_test") for r in mine if r.get("n_test")})
        print(f"\n== promptsweep: {task} (test n={'/'.join(map(str, n_test)) or '?'}) ==")
        print(format_table(mine))
    print(f"\nrun directory: {run_dir}\nsweep wall time: {wall_s:.0f}s", flush=True)
