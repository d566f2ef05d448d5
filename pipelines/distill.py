"""Distil what sweeps learned into a small prompt rewriter (Promptimal's recipe, from this project's own logs).

Usage::

    python -m pipelines.distill build RUN_DIR [RUN_DIR ...] out=pairs.jsonl
    python -m pipelines.distill rounds pairs.jsonl out=DIR rounds=2 -- +experiment=distill_sources
    python -m pipelines.distill train pairs.jsonl base=smollm2 out=REWRITER_DIR
    python -m pipelines.run method=promptimal model@lm.proposer=hf lm.proposer.model=REWRITER_DIR ...
    python -m pipelines.distill compare base:RUN_DIR rewriter:RUN_DIR

``build`` turns runs' evaluation logs into training pairs: a child candidate and the parent it
was written from (every text method records the link), kept when the child scored higher on
the dev examples both were scored on. The pair's input is what ``method=promptimal`` shows its
rewriter (:func:`methods.promptimal.rewrite_request`: the task, the parent, its score and the
examples it gets wrong, the run's most-missed first); its output is the child. Dropped, and
counted: children no better than their parent, near-duplicates of their parent or of a pair
already kept, pairs scored on any test example, and children that copy an example's text.

``rounds`` is Promptimal's steps 2-4: the lowest-scoring prompts of each task are rewritten by
the proposer through ``method=promptimal`` (a sweep, so the rewrites are scored by the shared
scorer pool under one cache), the improvements become pairs, and each round's pairs are kept in
``DIR/round_K/pairs.jsonl`` next to the merged ``DIR/pairs.jsonl``.

``train`` fine-tunes a causal LM on the pairs with LoRA (PEFT) and transformers' ``Trainer``,
inside a Ray task that asks for a GPU when the cluster has one; it resumes from the newest
checkpoint in ``OUT/checkpoints``, shows the trainer's progress bar, logs the loss to
``OUT/loss.jsonl`` (and W&B with ``logger=wandb``) and saves the merged model in ``OUT``, a
directory ``model@lm.proposer=hf lm.proposer.model=OUT`` loads like any other. Only the
completion (the improved prompt) is trained on; the request is context.

``compare`` puts the methods of several runs side by side (runs whose proposers differ cannot
share one sweep): each method's test score with its 95% interval over the test examples, and a
paired permutation test against ``manual`` and ``ape`` on the same examples.

Bad input is one ``error:`` line and exit status 2, before Ray starts.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from methods.promptimal import failure_lines, rewrite_request, task_description
from pipelines.plan import UserError, task_configs
from pipelines.results import read_jsonl, write_json, write_jsonl
from tasks.core import example_key

USAGE = """usage:
  python -m pipelines.distill build RUN_DIR [RUN_DIR ...] out=PAIRS.jsonl [min_gain=0] [max_similarity=0.9] [min_common=8] [n_failures=3] [data_dir=DIR]
  python -m pipelines.distill rounds PAIRS.jsonl out=DIR [rounds=2] [per_task=3] [steps=1] -- SWEEP_OVERRIDES...
  python -m pipelines.distill train PAIRS.jsonl out=DIR [base=smollm2] [epochs=2] [lr=2e-4] [lora_r=16] [batch_size=4] [max_len=512] [logger=none|wandb]
  python -m pipelines.distill compare [LABEL:]RUN_DIR [LABEL:]RUN_DIR ...   (methods of runs with different proposers, paired)"""

COPY_CHARS = 24  # a child holding this much of an example's text verbatim copies it
RAY_TEMP_DIR = "/tmp/psw"  # a local Ray's, as the sweep's default (AF_UNIX socket paths stay short)


# ---------------------------------------------------------------------------- build


@dataclass
class Counts:
    """What ``build`` read and why it dropped what it dropped (printed and saved with the pairs)."""

    runs: int = 0
    records: int = 0
    with_parent: int = 0
    no_parent_record: int = 0
    too_few_common: int = 0
    not_better: int = 0
    near_duplicate: int = 0
    repeated: int = 0
    scored_on_test: int = 0
    copies_example: int = 0
    kept: int = 0
    by_task: dict = field(default_factory=dict)


def run_tasks(run_dir: Path, data_dir: str | None = None, logged: frozenset[str] = frozenset()) -> dict[str, object]:
    """A finished run's tasks by the name its logs use (``logged``: the names its records carry),
    rebuilt from its saved config."""
    import hydra.utils

    saved = run_dir / "config.json"
    if not saved.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    cfg = json.loads(saved.read_text())
    # a single-task run's logs name the task by Hydra's task choice, as the trial specs did
    default = next(iter(logged)) if len(logged) == 1 else "task"
    configs = task_configs(cfg["task"], cfg["search"].get("tasks") or {}, default)
    tasks = {}
    for name, conf in configs.items():
        conf = {**conf, "data_dir": data_dir} if data_dir and "data_dir" in conf else conf
        try:
            tasks[name] = hydra.utils.instantiate(conf, _convert_="all")
        except Exception as err:  # noqa: BLE001 - one line for the user, whatever the loader raised
            cause = err.__cause__ or err
            raise UserError(f"{run_dir}: cannot rebuild task {name!r}: {cause}") from err
    return tasks


def similarity(a: str, b: str) -> float:
    """Word-level similarity of two prompts in [0, 1]: 1 for the same words, in any order.

    GRIPS's swaps reorder a prompt's phrases; a reordering that scored higher teaches a
    rewriter nothing it could say why, so it counts as a near-duplicate.
    """
    wa, wb = _words(a), _words(b)
    if sorted(wa) == sorted(wb):
        return 1.0
    return difflib.SequenceMatcher(None, wa, wb).ratio()


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def copies_any(text: str, inputs: Sequence[str]) -> bool:
    """True when ``text`` holds ``COPY_CHARS`` or more consecutive characters of one of ``inputs``."""
    low = " ".join(text.lower().split())
    for inp in inputs:
        s = " ".join(inp.lower().split())
        if len(s) < COPY_CHARS:
            if len(s) >= 12 and s in low:
                return True
            continue
        if any(s[i:i + COPY_CHARS] in low for i in range(0, len(s) - COPY_CHARS + 1, 4)):
            return True
    return False


def _inputs(examples) -> list[str]:
    return [" ".join(str(v) for v in ex.inputs.values()) for ex in examples]


def pairs_of_trial(records: list[dict], task, misses: dict[str, int], *, min_gain: float, max_similarity: float,
                   min_common: int, n_failures: int, test_keys: set[str], example_texts: list[str],
                   counts: Counts) -> list[dict]:
    """The improvement pairs of one trial's log (see the module docstring for the filters)."""
    by_text: dict[str, list[dict]] = {}
    for r in records:
        if r.get("examples"):
            by_text.setdefault(r["prompt"], []).append(r)
    by_key = {example_key(ex): ex for ex in task.train + task.dev}
    description = task_description(task)
    out = []
    for child in records:
        parent_text = child.get("parent")
        if not parent_text or not child.get("examples"):
            continue
        counts.with_parent += 1
        parents = [p for p in by_text.get(parent_text, []) if p is not child]
        if not parents:
            counts.no_parent_record += 1
            continue
        parent, common = _best_overlap(child, parents)
        if len(common) < min_common:
            counts.too_few_common += 1
            continue
        c_out, p_out = dict(zip(child["examples"], child["outcomes"])), dict(zip(parent["examples"], parent["outcomes"]))
        child_score = sum(c_out[k] for k in common) / len(common)
        parent_score = sum(p_out[k] for k in common) / len(common)
        gain = child_score - parent_score
        if gain <= min_gain:
            counts.not_better += 1
            continue
        if similarity(parent_text, child["prompt"]) >= max_similarity:
            counts.near_duplicate += 1
            continue
        if any(k in test_keys for k in common):
            counts.scored_on_test += 1
            continue
        if copies_any(child["prompt"], example_texts):
            counts.copies_example += 1
            continue
        wrong = sorted((k for k in common if p_out[k] < 1.0 and k in by_key), key=lambda k: -misses.get(k, 0))
        failures = failure_lines(task, [by_key[k] for k in wrong], n_failures)
        out.append({
            "task": task.name, "method": child.get("method", ""), "trial": child.get("trial", ""),
            "step": child.get("step", 0), "parent": parent_text, "child": child["prompt"],
            "parent_score": round(parent_score, 4), "child_score": round(child_score, 4), "gain": round(gain, 4),
            "n": len(common), "input": rewrite_request(description, parent_text, parent_score, failures),
            "output": child["prompt"],
        })
    return out


def _best_overlap(child: dict, parents: list[dict]) -> tuple[dict, list[str]]:
    """The parent record sharing the most examples with the child, and those examples (child's order)."""
    best, common = parents[0], []
    for p in parents:
        keys = set(p["examples"])
        shared = [k for k in child["examples"] if k in keys]
        if len(shared) > len(common):
            best, common = p, shared
    return best, common


def build(run_dirs: Sequence[Path], out: Path, *, min_gain: float = 0.0, max_similarity: float = 0.9,
          min_common: int = 8, n_failures: int = 3, data_dir: str | None = None, quiet: bool = False) -> Counts:
    """Write the improvement pairs of ``run_dirs`` to ``out`` (hardest parents first); returns the counts."""
    counts, pairs = Counts(), []
    for run_dir in run_dirs:
        logs = sorted((run_dir / "evaluations").glob("*.jsonl"))
        if not logs:
            raise UserError(f"{run_dir}: no evaluation logs (evaluations/*.jsonl)")
        trials = {p.stem: read_jsonl(p) for p in logs}
        tasks = run_tasks(run_dir, data_dir, frozenset(r["task"] for rs in trials.values() for r in rs if r.get("task")))
        counts.runs += 1
        for name, task in tasks.items():
            records = {t: [r for r in rs if r.get("task") == name] for t, rs in trials.items()}
            misses = _misses(r for rs in records.values() for r in rs)
            test_keys = {example_key(ex) for ex in task.test}
            texts = _inputs(task.train + task.dev + task.test)
            for rs in records.values():
                counts.records += len(rs)
                pairs += [{**p, "run": run_dir.name} for p in pairs_of_trial(
                    rs, task, misses, min_gain=min_gain, max_similarity=max_similarity, min_common=min_common,
                    n_failures=n_failures, test_keys=test_keys, example_texts=texts, counts=counts)]
    pairs = _dedupe(pairs, max_similarity, counts)
    # Hard first, as Promptimal ordered its data: the parents the scorer did worst with lead.
    pairs.sort(key=lambda p: (p["parent_score"], -p["gain"]))
    counts.kept = len(pairs)
    for p in pairs:
        counts.by_task[p["task"]] = counts.by_task.get(p["task"], 0) + 1
    write_jsonl(out, pairs)
    write_json(out.with_suffix(".stats.json"), vars(counts))
    if not quiet:
        _print_counts(counts, out)
    return counts


def _misses(records) -> dict[str, int]:
    """Per example key: how many recorded prompts got it wrong (the run's hard examples)."""
    out: dict[str, int] = {}
    for r in records:
        for k, o in zip(r.get("examples") or (), r.get("outcomes") or ()):
            out[k] = out.get(k, 0) + (o < 1.0)
    return out


def _dedupe(pairs: list[dict], max_similarity: float, counts: Counts) -> list[dict]:
    """One pair per (task, parent, near-same child): the one with the largest gain."""
    kept: list[dict] = []
    for p in sorted(pairs, key=lambda p: -p["gain"]):
        if any(k["task"] == p["task"] and _words(k["parent"]) == _words(p["parent"])
               and similarity(k["child"], p["child"]) >= max_similarity for k in kept):
            counts.repeated += 1
            continue
        kept.append(p)
    return kept


def _print_counts(c: Counts, out: Path) -> None:
    print(f"[distill] {c.runs} run(s), {c.records} logged candidates, {c.with_parent} with a parent and "
          f"per-example outcomes -> {c.kept} pairs in {out}", flush=True)
    print(f"[distill] dropped: {c.not_better} no better than the parent, {c.near_duplicate} near-duplicates of it, "
          f"{c.repeated} repeats, {c.scored_on_test} scored on test examples, {c.copies_example} copying an example, "
          f"{c.too_few_common} under min_common shared examples, {c.no_parent_record} parent never scored", flush=True)
    if c.by_task:
        print("[distill] pairs by task: " + ", ".join(f"{k} {v}" for k, v in sorted(c.by_task.items())), flush=True)


# ---------------------------------------------------------------------------- rounds


def hardest_prompts(pairs: list[dict], per_task: int) -> dict[str, list[str]]:
    """Per task, the ``per_task`` lowest-scoring distinct prompts of the pairs (parents and children)."""
    scores: dict[str, dict[str, float]] = {}
    for p in pairs:
        for text, s in ((p["parent"], p["parent_score"]), (p["child"], p["child_score"])):
            known = scores.setdefault(p["task"], {})
            known[text] = min(s, known.get(text, s))
    return {task: [t for _, t in sorted((s, t) for t, s in by_text.items() if len(_words(t)) >= 2)[:per_task]]
            for task, by_text in scores.items()}


def next_starts(last: list[dict], pairs: list[dict], used: set, per_task: int) -> dict[str, list[str]]:
    """A round's start prompts per task: the last round's improvements (weakest first), then the
    hardest prompts of all the pairs, never one already started from."""
    out: dict[str, list[str]] = {}
    improved = sorted(last, key=lambda p: p["child_score"])
    hardest = hardest_prompts(pairs, len(pairs) * 2 or 1)
    for task in dict.fromkeys([p["task"] for p in improved] + list(hardest)):
        pool = [p["child"] for p in improved if p["task"] == task] + hardest.get(task, [])
        fresh = [t for t in dict.fromkeys(pool) if (task, t) not in used and len(_words(t)) >= 2]
        if fresh:
            out[task] = fresh[:per_task]
    return out


def rounds(dataset: Path, out: Path, overrides: Sequence[str], *, n_rounds: int = 2, per_task: int = 3,
           steps: int = 1, build_args: dict | None = None) -> Path:
    """Promptimal's improvement rounds, each a ``method=promptimal`` sweep from the hardest prompts."""
    pairs = read_jsonl(dataset)
    if not pairs:
        raise UserError(f"{dataset}: no pairs to start rounds from")
    out.mkdir(parents=True, exist_ok=True)
    merged, used, last = list(pairs), set(), []
    for k in range(1, n_rounds + 1):
        rdir = out / f"round_{k}"
        # Round 1 rewrites the hardest prompts; later rounds improve what the round before wrote
        # (Promptimal's "rounds of incremental improvements"), topped up with the hardest prompts
        # not yet tried. Keyed by Task.name, as the pairs are: what the method looks starts up by.
        starts = next_starts(last, merged, used, per_task)
        used |= {(t, p) for t, ps in starts.items() for p in ps}
        write_json(rdir / "starts.json", starts)
        run_dir = rdir / "run"
        # ++search.method_overrides: an experiment's own promptimal overrides must not undo these
        cmd = [sys.executable, "-m", "pipelines.run", *overrides, "method=promptimal", "search.methods=[promptimal]",
               f"++search.method_overrides.promptimal.starts_file={(rdir / 'starts.json').resolve()}",
               f"++search.method_overrides.promptimal.steps={steps}", f"search.seeds=[{k - 1}]",
               f"hydra.run.dir={run_dir.resolve()}"]
        print(f"[distill] round {k}/{n_rounds}: rewriting {sum(map(len, starts.values()))} hard prompts of "
              f"{len(starts)} task(s)", flush=True)
        done = subprocess.run(cmd, check=False)
        if done.returncode not in (0, 1) or not (run_dir / "evaluations").is_dir():
            raise UserError(f"round {k}: the sweep failed (exit {done.returncode}); see its output above")
        new = build([run_dir], rdir / "pairs.jsonl", **(build_args or {}))
        print(f"[distill] round {k}: {new.kept} new pairs", flush=True)
        last = [{**p, "round": k} for p in read_jsonl(rdir / "pairs.jsonl")]
        write_jsonl(rdir / "pairs.jsonl", last)  # each round's own data, tagged with its round
        merged += last
    merged_counts = Counts()
    # the starting pairs are round 0
    merged = _dedupe([{**p, "round": p.get("round", 0)} for p in merged], (build_args or {}).get("max_similarity", 0.9),
                     merged_counts)
    merged.sort(key=lambda p: (p["parent_score"], -p["gain"]))
    write_jsonl(out / "pairs.jsonl", merged)
    print(f"[distill] {len(merged)} pairs after {n_rounds} round(s) ({len(pairs)} to start) -> {out / 'pairs.jsonl'}",
          flush=True)
    return out / "pairs.jsonl"


# ---------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainArgs:
    """LoRA fine-tuning settings (Promptimal's: r 80, alpha 16, dropout 0.1, lr 2e-4, cosine, warmup 0.1, 2 epochs)."""

    base: str = "smollm2"
    epochs: float = 2.0
    lr: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 512
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    save_steps: int = 20
    seed: int = 0
    logger: str = "none"
    threads: int = 0


def training_texts(pairs: list[dict], eos: str) -> list[tuple[str, str]]:
    """``(context, completion)`` per pair: the rewriter's request, and the prompt it should write then a newline.

    The request ends at "Improved instruction:"; the completion starts with a space, as the
    method's generation continues the request, and ends where the method stops reading (a newline).
    """
    return [(p["input"], " " + p["output"].strip() + "\n" + eos) for p in pairs]


def train(dataset: Path, out: Path, args: TrainArgs, address: str | None = None) -> Path:
    """Fine-tune in a Ray task (a GPU worker when the cluster has one); returns the model directory."""
    import ray

    from pipelines.sweep import LOG_DRAIN_S, start_ray

    pairs = read_jsonl(dataset)
    if not pairs:
        raise UserError(f"{dataset}: no pairs to train on")
    if args.logger not in ("none", "wandb"):
        raise UserError(f"logger={args.logger!r}; expected none or wandb")
    out.mkdir(parents=True, exist_ok=True)
    # joined or started as a sweep's driver does: a dead address fails in one line, in seconds
    start_ray({"ray": {"address": address, "temp_dir": RAY_TEMP_DIR, "namespace": None}})
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        cpus = max(1, args.threads or (os.cpu_count() or 1))
        task = ray.remote(num_gpus=gpus, num_cpus=min(cpus, int(ray.cluster_resources().get("CPU", 1))))(_train_worker)
        print(f"[distill] training on {len(pairs)} pairs from {args.base} ({'GPU' if gpus else 'CPU'}) -> {out}",
              flush=True)
        summary = ray.get(task.remote(pairs, str(out.resolve()), args))
    finally:
        time.sleep(LOG_DRAIN_S)  # the worker's last lines reach the console through Ray's log monitor
        ray.shutdown()
    print(f"[distill] trained {summary['steps']} steps in {summary['train_s']:.0f}s; loss "
          f"{summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; model in {out}", flush=True)
    return out


def _train_worker(pairs: list[dict], out: str, args: TrainArgs) -> dict:
    """LoRA with PEFT under transformers' Trainer; merged weights and tokenizer saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from backends.loading import load_pretrained

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    model, tok = load_pretrained(args.base, dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    rows = [_encode(tok, c, t, args.max_len) for c, t in training_texts(pairs, tok.eos_token or "")]
    out_dir = Path(out)
    losses = out_dir / "loss.jsonl"

    class LossLog(TrainerCallback):
        def on_log(self, targs, state, control, logs=None, **kw):  # noqa: ANN001 - Trainer's signature
            if logs and "loss" in logs:
                with losses.open("a", encoding="utf-8") as f:
                    f.write(json.dumps({"step": state.global_step, "epoch": round(state.epoch or 0, 3),
                                        "loss": logs["loss"], "time": time.time()}) + "\n")

    ckpts = out_dir / "checkpoints"
    resume = any(ckpts.glob("checkpoint-*"))
    targs = TrainingArguments(
        output_dir=str(ckpts), num_train_epochs=args.epochs, learning_rate=args.lr,
        per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        lr_scheduler_type="cosine", warmup_steps=args.warmup_ratio,  # < 1: a fraction of the steps weight_decay=args.weight_decay,
        logging_steps=1, save_strategy="steps", save_steps=args.save_steps, save_total_limit=2,
        report_to=["wandb"] if args.logger == "wandb" else "none", run_name=out_dir.name, seed=args.seed,
        use_cpu=not torch.cuda.is_available(), bf16=dtype == torch.bfloat16, disable_tqdm=False,
        remove_unused_columns=False, dataloader_num_workers=0,
    )
    if args.logger == "wandb":  # offline unless the user set a mode: no network or key needed; `wandb sync` later
        os.environ.setdefault("WANDB_MODE", "offline")
        os.environ.setdefault("WANDB_PROJECT", "promptsweep")
        os.environ.setdefault("WANDB_DIR", out)
    trainer = Trainer(model=model, args=targs, train_dataset=_ListDataset(rows), data_collator=_Collate(tok.pad_token_id),
                      callbacks=[LossLog()])
    if not resume and losses.exists():
        losses.unlink()  # a fresh start: the old curve belongs to another run
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    train_s = time.perf_counter() - start
    if args.logger == "wandb":  # the trainer's callback leaves its run open: close it, its files complete
        import wandb

        wandb.finish()
    merged = model.merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    curve = read_jsonl(losses)
    summary = {"steps": result.global_step, "train_s": train_s, "pairs": len(pairs), "resumed": resume,
               "first_loss": curve[0]["loss"] if curve else float("nan"),
               "last_loss": curve[-1]["loss"] if curve else float("nan"), "args": asdict(args)}
    write_json(out_dir / "distill.json", summary)
    return summary


def _encode(tok, context: str, completion: str, max_len: int) -> dict:
    """Token ids with labels on the completion only (-100 on the request: it is read, not learned)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    comp = tok(completion, add_special_tokens=False)["input_ids"]
    ctx = ctx[-max(1, max_len - len(comp)):]  # keep the request's end: the prompt and the cue
    ids = (ctx + comp)[:max_len]
    return {"input_ids": ids, "labels": ([-100] * len(ctx) + comp)[:max_len]}


class _ListDataset:
    def __init__(self, rows: list[dict]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class _Collate:
    """Right-pads a batch; padding is masked out of attention and labels."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        import torch

        width = max(len(b["input_ids"]) for b in batch)
        ids = [b["input_ids"] + [self.pad_id] * (width - len(b["input_ids"])) for b in batch]
        labels = [b["labels"] + [-100] * (width - len(b["labels"])) for b in batch]
        mask = [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


# ---------------------------------------------------------------------------- compare


def compare(runs: Sequence[Path], labels: Sequence[str], baselines: Sequence[str] = ("manual", "ape")) -> list[dict]:
    """Every method of several runs (each with its own proposer) on their shared tasks: test score,
    95% interval over the test examples, and paired p against each baseline method found.

    The runs must have scored the same test examples (the same task settings); each method's
    seeds are averaged per example first, as the report does (its readers are used here).
    """
    import numpy as np

    from pipelines.report import ReportError, load_run, score_matrix
    from pipelines.stats import bootstrap_interval, paired_p

    mats: dict[tuple[str, str], np.ndarray] = {}
    for run_dir, label in zip(runs, labels):
        try:
            run = load_run(run_dir)
        except ReportError as err:
            raise UserError(str(err)) from err
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in run.ok:
            groups.setdefault((row["task"], f"{row['method']}@{label}" if label else row["method"]), []).append(row)
        mats.update({k: m for k, rows in groups.items() if (m := score_matrix(run, rows)) is not None})
    table = []
    for (task, name), mat in sorted(mats.items()):
        lo, hi = bootstrap_interval(mat)
        row = {"task": task, "method": name, "test": float(mat.mean()), "ci": (lo, hi), "n": mat.shape[0]}
        for base in baselines:
            other = [k for k in mats if k[0] == task and k[1].split("@")[0] == base and k[1] != name]
            if other:
                ref = mats[other[0]]
                row[f"p_vs_{other[0][1]}"] = paired_p(mat, ref) if ref.shape[0] == mat.shape[0] else float("nan")
        table.append(row)
    return table


def _print_compare(table: list[dict]) -> None:
    for r in table:
        ps = ", ".join(f"{k[5:]} {v:.3f}" for k, v in r.items() if k.startswith("p_vs_"))
        print(f"{r['task']:<10} {r['method']:<24} {r['test']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] n={r['n']}"
              + (f"  p vs {ps}" if ps else ""), flush=True)


# ---------------------------------------------------------------------------- command line


def _options(args: Sequence[str], allowed: dict[str, type]) -> tuple[list[str], dict]:
    """Positional arguments and ``key=value`` options, typed; an unknown key is an error."""
    positional, opts = [], {}
    for a in args:
        if "=" not in a:
            positional.append(a)
            continue
        key, value = a.split("=", 1)
        if key not in allowed:
            raise UserError(f"unknown option {key!r}; expected one of {', '.join(sorted(allowed))}")
        try:
            opts[key] = allowed[key](value)
        except ValueError as err:
            raise UserError(f"{key}={value!r}: expected {allowed[key].__name__}") from err
    return positional, opts


BUILD_OPTS = {"out": str, "min_gain": float, "max_similarity": float, "min_common": int, "n_failures": int, "data_dir": str}
ROUND_OPTS = {"out": str, "rounds": int, "per_task": int, "steps": int, "min_gain": float, "max_similarity": float,
              "min_common": int, "n_failures": int}
TRAIN_OPTS = {"out": str, "address": str, **{k: type(v) for k, v in asdict(TrainArgs()).items()}}


def _run_dirs(paths: Sequence[str]) -> list[Path]:
    if not paths:
        raise UserError("name at least one run directory")
    dirs = [Path(p).expanduser().resolve() for p in paths]
    for d in dirs:
        if not (d / "config.json").is_file():
            raise UserError(f"{d} is not a run directory (no config.json)")
    return dirs


def _dataset(paths: Sequence[str]) -> Path:
    if len(paths) != 1:
        raise UserError("name one pairs file (JSONL from `distill build`)")
    path = Path(paths[0]).expanduser()
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    try:
        read_jsonl(path)
    except ValueError as err:
        raise UserError(f"{path} is not JSONL: {err}") from err
    return path


def _out(opts: dict) -> Path:
    if "out" not in opts:
        raise UserError("out=... is required")
    return Path(opts.pop("out")).expanduser()


def _check_train(args: TrainArgs) -> None:
    for name in ("epochs", "lr", "lora_r", "lora_alpha", "batch_size", "grad_accum", "max_len", "save_steps"):
        if getattr(args, name) <= 0:
            raise UserError(f"{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.lora_dropout < 1:
        raise UserError(f"lora_dropout must be in [0, 1), got {args.lora_dropout}")
    if args.base != "smollm2" and args.base.startswith(("/", "./", "../", "~")) and not Path(args.base).expanduser().is_dir():
        raise UserError(f"base={args.base!r} is not a directory")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or argv[0] not in ("build", "rounds", "train", "compare"):
            print(USAGE, flush=True)
            raise UserError("name a command: build, rounds, train or compare (usage above)")
        command, rest = argv[0], argv[1:]
        if command == "build":
            paths, opts = _options(rest, BUILD_OPTS)
            out = _out(opts)
            build(_run_dirs(paths), out, **opts)
        elif command == "rounds":
            mine, sweep = (rest[: rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
            paths, opts = _options(mine, ROUND_OPTS)
            out, dataset = _out(opts), _dataset(paths)
            n_rounds, per_task, steps = opts.pop("rounds", 2), opts.pop("per_task", 3), opts.pop("steps", 1)
            if n_rounds < 1 or per_task < 1 or steps < 1:
                raise UserError("rounds, per_task and steps must be >= 1")
            rounds(dataset, out, sweep, n_rounds=n_rounds, per_task=per_task, steps=steps, build_args=opts)
        elif command == "compare":
            paths, _ = _options(rest, {})
            dirs = _run_dirs([p.split(":", 1)[-1] for p in paths])
            _print_compare(compare(dirs, [p.split(":", 1)[0] if ":" in p else "" for p in paths]))
        else:
            paths, opts = _options(rest, TRAIN_OPTS)
            out, dataset = _out(opts), _dataset(paths)
            address = opts.pop("address", None)
            args = TrainArgs(**opts)
            _check_train(args)
            train(dataset, out, args, address)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
