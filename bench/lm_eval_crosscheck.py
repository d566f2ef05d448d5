"""Letter-form MMLU scored by our backend and by lm-evaluation-harness on the same questions.

Usage:
    python bench/lm_eval_crosscheck.py --lm-eval /path/to/lm-eval-env/bin/lm_eval
        [--subjects abstract_algebra marketing ...] [--n-per-subject 50] [--shots 5]
        [--data-dir ../shared/data] [--model smollm2]

Both sides read the same local MMLU CSV files and the same model directory:

* lm-eval: a custom task per subject (plus a group), written to a temporary folder, that
  loads ``mmlu/data/{dev,test}/<subject>_{dev,test}.csv`` through the ``csv`` dataset
  builder, takes the first ``--shots`` dev rows in file order as the shots and the first
  ``--n-per-subject`` test rows as the questions, and renders them as our ``tasks.loaders.mmlu``
  letter form does. It runs as a subprocess of its own environment (it pins packages
  differently from this project), offline, with ``--log_samples``.
* ours: ``HFBackend.loglikelihood`` on ``requests_for`` of the same questions, in process.

Per subject it prints both accuracies, how many questions get the same predicted letter, how
many prompts are identical character for character, and the largest log-likelihood
difference over the matched (question, letter) pairs; the overall agreement is printed last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The five subjects of conf/task/mmlu_cpu.yaml.
DEFAULT_SUBJECTS = ("abstract_algebra", "high_school_geography", "marketing", "us_foreign_policy", "world_religions")
LETTERS = ("A", "B", "C", "D")
COLUMNS = ("question", *LETTERS, "answer")
GROUP = "xcheck_mmlu"
# Our letter block, in lm-eval's Jinja: no question.strip() (lm-eval's stock MMLU task strips
# the question, our tasks.loaders.mmlu does not, and this script checks our rendering).
DOC_TO_TEXT = "{{question}}\nA. {{A}}\nB. {{B}}\nC. {{C}}\nD. {{D}}\nAnswer:"
DOC_TO_TARGET = "{{['A', 'B', 'C', 'D'].index(answer.strip())}}"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@dataclass(frozen=True)
class Scored:
    """One side's scores for one subject's questions, in test-file order.

    Attributes:
        contexts: the prompt of each question (shots included) ``[n]``.
        loglik: log-likelihood of ``" A"`` .. ``" D"`` after the prompt, float64 ``[n, 4]``.
        labels: the correct letter's index ``[n]``.
    """

    contexts: tuple[str, ...]
    loglik: np.ndarray
    labels: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        """Argmax letter per question ``[n]`` (first maximum on ties, as both scorers break them)."""
        return self.loglik.argmax(axis=1)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predictions == self.labels)) if len(self.labels) else 0.0


# ----------------------------------------------------------------------- lm-eval task files

def task_name(subject: str) -> str:
    return f"{GROUP}_{subject}"


def subject_files(data_dir: Path, subject: str) -> dict[str, str]:
    """Absolute paths of a subject's dev (shots) and test (questions) CSVs, checked to exist."""
    files = {split: (data_dir / "mmlu" / "data" / split / f"{subject}_{split}.csv").resolve() for split in ("dev", "test")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise SystemExit(f"error: MMLU file(s) not found: {', '.join(missing)} (check --data-dir and --subjects)")
    return {split: str(path) for split, path in files.items()}


def task_config(subject: str, files: dict[str, str], shots: int) -> dict:
    """The lm-eval task for one subject: local headerless CSVs, first-n dev shots, letter choices.

    ``keep_default_na: false`` keeps an option that reads "None" or "NA" as text, as our
    reader does; the header is the subject with spaces, like ours.
    """
    return {
        "task": task_name(subject),
        "dataset_path": "csv",
        "dataset_kwargs": {"data_files": files, "column_names": list(COLUMNS), "keep_default_na": False},
        "test_split": "test",
        "fewshot_split": "dev",
        "fewshot_config": {"sampler": "first_n"},
        "num_fewshot": shots,
        "output_type": "multiple_choice",
        "description": f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n",
        "doc_to_text": DOC_TO_TEXT,
        "doc_to_choice": list(LETTERS),
        "doc_to_target": DOC_TO_TARGET,
        "target_delimiter": " ",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }


def group_config(subjects: Sequence[str]) -> dict:
    """The group that runs every subject task; its accuracy is weighted by question count."""
    return {
        "group": GROUP,
        "task": [task_name(s) for s in subjects],
        "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": True}],
        "metadata": {"version": 1.0},
    }


def write_tasks(folder: Path, data_dir: Path, subjects: Sequence[str], shots: int) -> list[Path]:
    """Write one YAML per subject and the group YAML into ``folder`` (lm-eval's ``--include_path``)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for subject in subjects:
        path = folder / f"{task_name(subject)}.yaml"
        path.write_text(yaml.safe_dump(task_config(subject, subject_files(data_dir, subject), shots), sort_keys=False))
        written.append(path)
    group = folder / f"_{GROUP}.yaml"
    group.write_text(yaml.safe_dump(group_config(subjects), sort_keys=False))
    return [*written, group]


def lm_eval_command(
    exe: str, model_dir: Path, include: Path, shots: int, n: int, out: Path, batch_size: int
) -> list[str]:
    """The lm_eval command line: fp32 on CPU, the first ``n`` questions of each subject task."""
    return [
        exe, "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", GROUP, "--include_path", str(include), "--device", "cpu", "--num_fewshot", str(shots),
        "--limit", str(n), "--batch_size", str(batch_size), "--log_samples", "--output_path", str(out),
    ]


def offline_env(work: Path) -> dict[str, str]:
    """The subprocess environment: nothing from the hub, a private datasets cache (no stale CSV builds)."""
    return {**os.environ, **OFFLINE, "HF_DATASETS_CACHE": str(work / "hf_datasets"), "TOKENIZERS_PARALLELISM": "false"}


# ----------------------------------------------------------------- reading lm-eval's output

def parse_sample(record: dict) -> tuple[int, str, list[str], list[float], int]:
    """``(doc_id, context, continuations, logliks, target)`` of one ``--log_samples`` line.

    lm-eval writes each request's arguments as ``{"gen_args_i": {"arg_0": context,
    "arg_1": continuation}}`` (older versions: a list of pairs) and each filtered response
    as ``[loglik, is_greedy]`` with the numbers as strings.
    """
    args = record["arguments"]
    if isinstance(args, dict):
        args = [args[k] for k in sorted(args, key=lambda k: int(k.rsplit("_", 1)[1]))]
        args = [(a["arg_0"], a["arg_1"]) for a in args]
    contexts = {a[0] for a in args}
    if len(contexts) != 1:
        raise ValueError(f"doc {record['doc_id']}: {len(contexts)} different contexts in one multiple-choice sample")
    logliks = [float(r[0] if isinstance(r, (list, tuple)) else r) for r in record["filtered_resps"]]
    return int(record["doc_id"]), contexts.pop(), [a[1] for a in args], logliks, int(record["target"])


def scored_from_samples(lines: Sequence[str]) -> Scored:
    """One subject's lm-eval scores from its samples JSONL lines, ordered by ``doc_id``."""
    rows = sorted((parse_sample(json.loads(line)) for line in lines if line.strip()), key=lambda r: r[0])
    ids = [r[0] for r in rows]
    if ids != list(range(len(rows))):
        raise ValueError(f"doc ids {ids[:5]}... are not the first {len(rows)} test rows")
    expected = [" " + x for x in LETTERS]
    bad = [r[0] for r in rows if r[2] != expected]
    if bad:
        raise ValueError(f"docs {bad[:5]}: continuations are not {expected}")
    return Scored(
        contexts=tuple(r[1] for r in rows),
        loglik=np.array([r[3] for r in rows], dtype=np.float64).reshape(len(rows), len(LETTERS)),
        labels=np.array([r[4] for r in rows], dtype=np.int64),
    )


def read_lm_eval(out: Path, subjects: Sequence[str]) -> tuple[dict[str, Scored], dict]:
    """Per-subject scores from the samples files and the results JSON under ``out``."""
    scored = {}
    for subject in subjects:
        files = sorted(out.rglob(f"samples_{task_name(subject)}_*.jsonl"))
        if not files:
            raise SystemExit(f"error: lm-eval wrote no samples for {task_name(subject)} under {out}")
        scored[subject] = scored_from_samples(files[-1].read_text(encoding="utf-8").splitlines())
    results = sorted(out.rglob("results_*.json"))
    return scored, json.loads(results[-1].read_text(encoding="utf-8")) if results else {}


def reported_accuracy(results: dict, subject: str) -> float:
    """lm-eval's own ``acc`` for a subject task (NaN when the results JSON lacks it)."""
    return float(results.get("results", {}).get(task_name(subject), {}).get("acc,none", float("nan")))


def run_lm_eval(cmd: list[str], work: Path) -> float:
    """Run lm_eval with its output in ``work/lm_eval.log``; wall seconds. Exits with the log's tail on failure."""
    log = work / "lm_eval.log"
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=offline_env(work), cwd=work)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{tail}\nerror: lm_eval exited {proc.returncode}: {' '.join(cmd)}")
    return time.perf_counter() - start


# ------------------------------------------------------------------------------------ ours

def model_directory(model: str) -> Path:
    """The local model directory both sides load: the converted default model or a given folder."""
    from backends import loading  # imports torch: kept out of the helpers the tests import

    path = loading.default_model_dir() if model == loading.DEFAULT_MODEL else Path(model).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise SystemExit(f"error: {path} is not a local model directory (lm-eval must not reach the hub)")
    return path


def score_ours(
    data_dir: Path, subjects: Sequence[str], n: int, shots: int, model_dir: Path, threads: int
) -> tuple[dict[str, Scored], float]:
    """Our scores of the first ``n`` test questions per subject, and the wall seconds they took."""
    from methods.evaluate import requests_for
    from methods.lm import TextPrompt
    from backends.hf import HFBackend
    from tasks.loaders import mmlu

    task = mmlu(str(data_dir), list(subjects), form="letter", k_shot=shots)
    lm = HFBackend(str(model_dir), dtype="float32", device="cpu", threads=threads)
    prompt = TextPrompt(task.instruction)
    start = time.perf_counter()
    scored = {}
    for subject in subjects:
        examples = [ex for ex in task.test if ex.group == subject][:n]
        requests = requests_for(task, prompt, examples)
        scored[subject] = Scored(
            contexts=tuple(r.context for r in requests[:: len(LETTERS)]),
            loglik=lm.loglikelihood(requests).reshape(len(examples), len(LETTERS)),
            labels=np.array([ex.label for ex in examples], dtype=np.int64),
        )
    return scored, time.perf_counter() - start


# ------------------------------------------------------------------------------ comparison

def first_difference(a: str, b: str, width: int = 30) -> str:
    """Where two prompts first differ, as ``repr`` snippets around that character."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"char {i}: lm-eval {a[max(0, i - width): i + width]!r} vs ours {b[max(0, i - width): i + width]!r}"


def compare(theirs: Scored, ours: Scored) -> dict:
    """Agreement of one subject's two score sets (same questions in the same order)."""
    if len(theirs.labels) != len(ours.labels) or not np.array_equal(theirs.labels, ours.labels):
        raise SystemExit("error: lm-eval and ours scored different questions (labels differ)")
    same_ctx = [a == b for a, b in zip(theirs.contexts, ours.contexts)]
    return {
        "n": len(ours.labels),
        "same_pred": int(np.sum(theirs.predictions == ours.predictions)),
        "same_context": int(sum(same_ctx)),
        "max_dll": float(np.abs(theirs.loglik - ours.loglik).max()) if len(ours.labels) else 0.0,
        "first_diff": None if all(same_ctx) else first_difference(
            theirs.contexts[same_ctx.index(False)], ours.contexts[same_ctx.index(False)]),
    }


def print_table(subjects: Sequence[str], theirs: dict[str, Scored], ours: dict[str, Scored], results: dict) -> None:
    """Per-subject rows, an overall row, and the agreement line last."""
    print(f"{'subject':24s} {'n':>4s} {'lm-eval acc':>11s} {'(reported)':>10s} {'ours acc':>8s} "
          f"{'same pred':>9s} {'same prompt':>11s} {'max |dll|':>9s}")
    rows = {s: compare(theirs[s], ours[s]) for s in subjects}
    for s, r in rows.items():
        print(f"{s:24s} {r['n']:4d} {theirs[s].accuracy:11.3f} {reported_accuracy(results, s):10.3f} "
              f"{ours[s].accuracy:8.3f} {r['same_pred']:9d} {r['same_context']:11d} {r['max_dll']:9.2e}")
        if r["first_diff"]:
            print(f"  first prompt difference: {r['first_diff']}")
    n = sum(r["n"] for r in rows.values())
    acc_theirs = sum(theirs[s].accuracy * rows[s]["n"] for s in subjects) / n
    acc_ours = sum(ours[s].accuracy * rows[s]["n"] for s in subjects) / n
    reported = results.get("results", {}).get(GROUP, {}).get("acc,none", float("nan"))
    same = sum(r["same_pred"] for r in rows.values())
    print(f"{'overall':24s} {n:4d} {acc_theirs:11.3f} {float(reported):10.3f} {acc_ours:8.3f} {same:9d} "
          f"{sum(r['same_context'] for r in rows.values()):11d} {max(r['max_dll'] for r in rows.values()):9.2e}")
    print(f"agreement: same predicted letter on {same}/{n} questions ({same / n:.1%}); "
          f"accuracy lm-eval {acc_theirs:.3f} vs ours {acc_ours:.3f} (difference {acc_ours - acc_theirs:+.3f})")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", default="lm_eval", help="the lm_eval executable of its own environment")
    parser.add_argument("--subjects", nargs="+", default=list(DEFAULT_SUBJECTS))
    parser.add_argument("--n-per-subject", type=int, default=50, help="first N test questions of each subject")
    parser.add_argument("--shots", type=int, default=5, help="first K dev rows of each subject")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", default="smollm2", help="smollm2 (the converted default) or a local model directory")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval's --batch_size")
    parser.add_argument("--threads", type=int, default=0, help="torch threads for our side; 0: torch's default")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep task files and lm-eval output here")
    args = parser.parse_args(argv)
    if args.n_per_subject < 1 or not 0 <= args.shots <= 5:
        parser.error("--n-per-subject must be >= 1 and --shots between 0 and 5")
    exe = shutil.which(args.lm_eval)
    if exe is None:
        parser.error(f"lm_eval executable {args.lm_eval!r} not found; install lm-eval in its own venv (bench/README.md)")
    args.lm_eval = exe
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lm_eval_crosscheck."))
    work = work.resolve()
    try:
        model_dir = model_directory(args.model)
        write_tasks(work / "tasks", args.data_dir, args.subjects, args.shots)
        ours, t_ours = score_ours(args.data_dir, args.subjects, args.n_per_subject, args.shots, model_dir, args.threads)
        cmd = lm_eval_command(args.lm_eval, model_dir, work / "tasks", args.shots, args.n_per_subject,
                              work / "out", args.batch_size)
        t_theirs = run_lm_eval(cmd, work)
        theirs, results = read_lm_eval(work / "out", args.subjects)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    import transformers

    print(f"model {model_dir.name}; lm-eval {results.get('lm_eval_version', '?')} with transformers "
          f"{results.get('transformers_version', '?')}; ours with transformers {transformers.__version__}")
    print(f"{len(args.subjects)} subjects x first {args.n_per_subject} test questions, {args.shots} shots "
          f"(first dev rows); fp32 on CPU; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"wall: lm-eval {t_theirs:.1f} s (whole subprocess: start-up, data, model load, scoring), "
          f"ours {t_ours:.1f} s (scoring only)")
    print_table(args.subjects, theirs, ours, results)


if __name__ == "__main__":
    main()
