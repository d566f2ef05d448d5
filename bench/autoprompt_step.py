"""Time per AutoPrompt step (gradient + k candidates) against naive candidate scoring.

Usage:
    python bench/autoprompt_step.py [--k 16] [--batch 8] [--steps 2] [--threads 1] [--data-dir ../shared/data]

Runs the real ``AutoPrompt.step`` on SST-2 with the default model (``HFBackend``, no Ray)
three ways, from the same state with the same random generator seed, so each draws the same
batch, the same gradient, the same trigger position and the same ``k`` candidates:

* batched: the step as written, every candidate (and the current triggers) scored in ONE
  ``loglikelihood`` call with a per-request prompt list;
* per candidate: the same step, but the LM splits that call into one call per candidate;
* per example: one call per candidate *and* per example, each a single unbatched request.

Only how candidates are scored differs; gradient, ranking and filtering are the same code.
It checks that all three keep the same candidate and that every candidate's loss agrees
within ``--tol``, then prints the mean wall and CPU time per step of each (and the scoring
part alone) and the ratio of the per-example loop's step time to the batched one last.
``--steps`` steps are timed, each from the state the batched step left; one untimed step
warms up first. CPU time suffers less than wall time from other processes competing for the
cores, and one torch thread (``--threads 1``) gives the steadiest times on a shared machine;
the load average is printed beside them.

Where the slot sits decides what one call can share. With the task's template the triggers
come first, so candidates share almost no token prefix and the backend runs each one's rows
as a group of its own. ``--template`` moves the slot, e.g. after the review (the paper's
layout): ``$'Review: {sentence}\\n{instruction}\\nSentiment:'``; then every candidate reuses
the review's prefix KV cache inside the one batched call.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods.autoprompt import AutoPrompt  # noqa: E402
from backends.hf import HFBackend  # noqa: E402
from tasks.loaders import sst2  # noqa: E402

MODES = ("batched", "per candidate", "per example")


@dataclass
class SplitLM:
    """An LM that forwards to ``lm`` but scores a batch in pieces, and records what it scored.

    Args:
        lm: the backend.
        mode: "batched" (one call), "per candidate" (one call per run of requests sharing a
            prompt) or "per example" (one call per request).
    """

    lm: HFBackend
    mode: str
    scores: list = field(default_factory=list)  # each loglikelihood call's result
    score_s: float = 0.0  # seconds spent in loglikelihood

    def loglikelihood(self, requests) -> np.ndarray:
        start = time.perf_counter()
        requests = list(requests)
        parts = {"batched": [(0, len(requests))], "per candidate": runs([r.prompt for r in requests]),
                 "per example": [(i, i + 1) for i in range(len(requests))]}[self.mode]
        out = np.concatenate([self.lm.loglikelihood(requests[a:b]) for a, b in parts])
        self.score_s += time.perf_counter() - start
        self.scores.append(out)
        return out

    def __getattr__(self, name):  # prompt_grad, token_embeddings, tokenize, decode: unchanged
        return getattr(self.lm, name)


def runs(prompts: list) -> list[tuple[int, int]]:
    """``(start, stop)`` of each maximal run of equal consecutive prompts."""
    bounds = [0] + [i for i in range(1, len(prompts)) if prompts[i] != prompts[i - 1]] + [len(prompts)]
    return list(zip(bounds[:-1], bounds[1:]))


def timed_step(method: AutoPrompt, state, task, lm: HFBackend, mode: str, seed: int) -> dict:
    """One step through a :class:`SplitLM`; its new state, wall and CPU seconds, scoring seconds and scores."""
    split = SplitLM(lm, mode)
    start, cpu = time.perf_counter(), time.process_time()
    new, report = method.step(state, task, split, split, np.random.default_rng(seed))
    return {"state": new, "s": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "score_s": split.score_s,
            "scores": split.scores[-1], "n_cands": int(report.metrics["n_candidates"])}


def check_same(results: dict, n_prompts: int, tol: float) -> float:
    """Raise unless every mode kept the same triggers; the largest per-candidate loss difference."""
    base = results["batched"]
    worst = 0.0
    for mode, r in results.items():
        if r["state"].ids != base["state"].ids:
            raise SystemExit(f"{mode} kept {r['state'].ids}, batched kept {base['state'].ids}")
        losses = -r["scores"].reshape(n_prompts, -1).mean(axis=1)
        worst = max(worst, float(np.abs(losses + base["scores"].reshape(n_prompts, -1).mean(axis=1)).max()))
    if worst > tol:
        raise SystemExit(f"candidate losses differ by {worst:.2e} (> {tol:.0e})")
    return worst


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=16, help="candidates per step")
    parser.add_argument("--batch", type=int, default=8, help="train examples per step")
    parser.add_argument("--triggers", type=int, default=4, help="trigger tokens")
    parser.add_argument("--steps", type=int, default=2, help="timed steps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed candidate loss difference")
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--template", default="",
                        help="SST-2 template with {instruction} and {sentence} (default: the task's, slot first)")
    parser.add_argument("--min-prefix", type=int, default=8, help="the backend's min_prefix (0: no prefix reuse)")
    return parser.parse_args()


def run_steps(method: AutoPrompt, state, task, lm: HFBackend, steps: int, tol: float) -> dict:
    """Time ``steps`` steps in every mode; summed seconds per mode. Exits on any disagreement."""
    totals = {m: {"s": 0.0, "cpu_s": 0.0, "score_s": 0.0} for m in MODES}
    worst = 0.0
    for step in range(steps):
        results = {m: timed_step(method, state, task, lm, m, seed=step) for m in MODES}
        worst = max(worst, check_same(results, results["batched"]["n_cands"] + 1, tol))
        for m in MODES:
            for key in totals[m]:
                totals[m][key] += results[m][key]
        state = results["batched"]["state"]
        print(f"step {step}: kept {state.text!r} (loss {state.loss:.4f}); "
              + ", ".join(f"{m} {results[m]['s']:.2f} s" for m in MODES)
              + f"; load average {os.getloadavg()[0]:.2f}", flush=True)
    print(f"same kept triggers in every step and mode; largest candidate loss difference {worst:.1e}")
    return totals


def report(totals: dict, steps: int) -> None:
    for m in MODES:
        t = totals[m]
        print(f"{m:14s} {t['s'] / steps:6.2f} s per step (CPU {t['cpu_s'] / steps:6.2f} s), "
              f"of which scoring {t['score_s'] / steps:6.2f} s")
    fast, mid, slow = (totals[m] for m in MODES)
    print(f"per candidate / batched: {mid['score_s'] / fast['score_s']:.2f}x scoring; {mid['s'] / fast['s']:.2f}x per step")
    print(f"per example / batched: {slow['score_s'] / fast['score_s']:.2f}x scoring, "
          f"{slow['cpu_s'] / fast['cpu_s']:.2f}x CPU time per step; {slow['s'] / fast['s']:.2f}x per step")


def main() -> None:
    args = parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    lm = HFBackend(args.model, min_prefix=args.min_prefix)
    task = sst2(str(args.data_dir), **({"template": args.template} if args.template else {}))
    # The first step of a run also evaluates on dev; starting at step 1 with no evaluation
    # schedule keeps the timed work to the gradient and the candidates.
    method = AutoPrompt(n_triggers=args.triggers, n_candidates=args.k, batch_size=args.batch, eval_every=10**9)
    state = replace(method.init(task, lm, lm, np.random.default_rng(0)), step=1)
    print(f"model {args.model}; AutoPrompt k={args.k}, batch {args.batch}, {args.triggers} triggers; "
          f"template {task.template!r}; {args.steps} timed steps; min_prefix {args.min_prefix}; "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs",
          flush=True)
    timed_step(method, state, task, lm, "batched", seed=10**6)  # warm-up
    report(run_steps(method, state, task, lm, args.steps, args.tol), args.steps)


if __name__ == "__main__":
    main()
