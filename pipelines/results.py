"""The run directory: append-only evaluation logs, per-trial results, and the summary.

Layout::

    RUN_DIR/config.yaml              resolved config, secrets redacted
    RUN_DIR/evaluations/<trial>.jsonl every candidate scored, written as it happens
    RUN_DIR/trials/<trial>.json      one trial's final result (written once, atomically)
    RUN_DIR/outputs/<trial>.jsonl    the final prompt's prediction on every test example
    RUN_DIR/prompts/<trial>.npz      a soft prompt's or prefix's vectors (for pipelines.transfer)
    RUN_DIR/summary.json             every trial's result, plus failures
    RUN_DIR/evaluations.jsonl        all evaluation logs merged, after the sweep

A crash loses at most the step in flight: each record is one ``write`` of one line
to a file opened for appending, and a resumed trial first drops records newer than its
checkpoint so nothing is counted twice.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from methods.evaluate import headline
from methods.text import input_texts
from tasks.generative import is_generative


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON atomically (temp file + rename): readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a torn last line (crash mid-write) is skipped."""
    if not path.exists():
        return []
    out = []
    # "\n" only: written with ensure_ascii=False, a record may hold U+2028, which splitlines() splits on
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


class EvalLog:
    """One trial's append-only evaluation log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            for rec in records:
                os.write(fd, (json.dumps(rec, default=str) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate_after(self, step: int) -> int:
        """Drop records of steps after ``step`` (work a checkpoint does not cover); returns how many."""
        records = read_jsonl(self.path)
        keep = [r for r in records if r.get("step", 0) <= step]
        lines = [ln for ln in self.path.read_text(encoding="utf-8").split("\n") if ln] if self.path.exists() else []
        # Also rewrite to drop a torn last line: the next append would be glued onto it and lost.
        if len(keep) != len(lines):
            write_jsonl(self.path, keep)
        return len(records) - len(keep)


def example_records(task, raw, calibrated=None) -> list[dict]:
    """One record per test example: its input, what the prompt made of it, the gold, and the verdict.

    On a generative task ``output`` is what the model wrote, ``answer`` what the task's
    extractor read out of it and ``score`` its metric value. On a label task ``output`` is
    the predicted label word, ``score`` is 1 or 0, and with ``calibrated`` predictions each
    record also has ``score_raw`` and ``score_calibrated``; ``output``/``score`` are then
    those the task selects with (its ``calibration`` setting). The report's intervals and
    paired tests are computed from these per-example scores.
    """
    out = []
    for i, (ex, pred) in enumerate(zip(task.test, headline(task, raw, calibrated))):
        rec = {"input": "\n".join(input_texts([ex])), "output": task.shown(pred, ex)}
        if is_generative(task):
            rec["answer"] = task.extract(pred)
            rec["gold"] = list(ex.answers)
            rec["score"] = float(task.example_score(pred, ex))
        else:
            rec["gold"] = task.answer_text(ex)
            rec["pred"], rec["label"] = int(pred), int(ex.label)
            rec["score"] = float(task.is_correct(pred, ex))
            if calibrated is not None:
                rec["score_raw"] = float(task.is_correct(raw[i], ex))
                rec["score_calibrated"] = float(task.is_correct(calibrated[i], ex))
        rec["correct"] = bool(task.is_correct(pred, ex))
        out.append(rec)
    return out


def test_scores(task, raw, calibrated=None) -> dict:
    """A final prompt's test metric as the task selects (``test_score``), and raw and calibrated
    (``None`` where there are no calibrated predictions)."""
    return {
        "test_score": task.score(headline(task, raw, calibrated), task.test),
        "test_score_raw": task.score(raw, task.test) if calibrated is not None else None,
        "test_score_calibrated": task.score(calibrated, task.test) if calibrated is not None else None,
    }


def save_vectors(path: Path, prompt) -> None:
    """A soft prompt's or prefix's arrays as ``.npz`` (no pickle: a shared run directory must not
    run code when it is read); the nearest words or the init text ride along as strings."""
    from methods.lm import PrefixPrompt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    if isinstance(prompt, PrefixPrompt):
        np.savez(tmp, kind=np.array("prefix"), key_values=prompt.key_values, origin=np.array(prompt.origin))
    else:
        np.savez(tmp, kind=np.array("soft"), embeddings=prompt.embeddings, nearest=np.array(list(prompt.nearest), dtype=str))
    os.replace(tmp, path)


def load_vectors(path: Path):
    """The prompt :func:`save_vectors` wrote."""
    from methods.lm import PrefixPrompt, SoftPrompt

    with np.load(path, allow_pickle=False) as z:
        if str(z["kind"]) == "prefix":
            return PrefixPrompt(np.asarray(z["key_values"], dtype=np.float32), str(z["origin"]))
        return SoftPrompt(np.asarray(z["embeddings"], dtype=np.float32), tuple(str(w) for w in z["nearest"]))


def write_jsonl(path: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Write records as JSONL atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # UTF-8 as written: a translation task's outputs stay readable in the file
    tmp.write_text("".join(json.dumps(r, default=str, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def merge_evaluations(run_dir: Path) -> int:
    """Concatenate every trial's log into ``evaluations.jsonl``; returns the record count."""
    records = [r for p in sorted((run_dir / "evaluations").glob("*.jsonl")) for r in read_jsonl(p)]
    write_jsonl(run_dir / "evaluations.jsonl", records)
    return len(records)


def trial_results(run_dir: Path) -> list[dict]:
    """Every finished trial's result, ordered by method, task and seed."""
    rows = [json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*.json"))]
    return sorted(rows, key=lambda r: (r.get("task", ""), r.get("method", ""), r.get("seed", 0)))
