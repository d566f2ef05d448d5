"""Label-scoring throughput of the local backend against a naive per-example scorer.

Usage:
    python bench/scoring.py [--n 200] [--data-dir ../shared/data] [--model smollm2]

Both scorers run side by side in one process on the same SST-2 (GLUE dev) examples:

* naive: one unbatched forward per example *and* per label over context + label, full logits;
* backend: ``HFBackend.loglikelihood`` on all requests at once (deduplicated contexts,
  shared-prefix KV cache, length-sorted batches, LM head only where needed).

It checks that both predict the same labels, reports examples/s, the fraction of the
machine's measured fp32 matmul rate each achieves, and prints the speedup last.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.hf import HFBackend  # noqa: E402
from methods.lm import Request  # noqa: E402

TEMPLATE = "{instruction}\n\nReview: {sentence}\nSentiment:"
INSTRUCTION = (
    "Read the movie review below and decide whether the overall opinion of the reviewer "
    "about the film is positive or negative."
)
VERBALIZER = (" negative", " positive")


def load_sst2_dev(data_dir: Path, n: int) -> list[tuple[str, int]]:
    """The first ``n`` (sentence, label) pairs of the GLUE SST-2 dev split."""
    with open(data_dir / "sst2" / "glue" / "dev.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(r["sentence"], int(r["label"])) for r in rows[:n]]


def peak_matmul_flops(size: int = 2048, reps: int = 5) -> float:
    """Best observed fp32 FLOP/s of a square ``torch.matmul`` (the machine's practical peak)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * size**3 / best


def param_counts(lm: HFBackend) -> tuple[int, int]:
    """(non-embedding parameters, LM-head parameters) of the backend's model."""
    embed, head = lm.embed.weight, lm.head.weight
    total = sum(p.numel() for p in lm.model.parameters())  # a tied head is counted once here
    tied = embed.data_ptr() == head.data_ptr()
    return total - embed.numel() - (0 if tied else head.numel()), head.numel()


def naive_scores(lm: HFBackend, requests: list[tuple[str, str]]) -> tuple[np.ndarray, int]:
    """One full forward per request with full logits; returns scores and tokens run."""
    out, tokens = np.zeros(len(requests)), 0
    with torch.inference_mode():
        for k, (context, cont) in enumerate(requests):
            ctx_ids, cont_ids = lm.tokenize(context), lm.tokenize(cont)
            ids = torch.tensor([ctx_ids + cont_ids])
            logp = torch.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[0].float(), dim=-1)
            pos = torch.arange(len(ctx_ids) - 1, ids.shape[1] - 1)
            out[k] = float(logp[pos, torch.tensor(cont_ids)].double().sum())
            tokens += ids.shape[1]
    return out, tokens


def timed(fn):
    """``(result, seconds)`` of ``fn()``."""
    t = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="SST-2 dev examples")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--max-batch-tokens", type=int, default=0, help="0: the backend's default")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    examples = load_sst2_dev(args.data_dir, args.n)
    requests = [(TEMPLATE.format(instruction=INSTRUCTION, sentence=s), v) for s, _ in examples for v in VERBALIZER]
    lm = HFBackend(args.model, max_batch_tokens=args.max_batch_tokens, threads=args.threads)
    non_embedding, head = param_counts(lm)
    peak = peak_matmul_flops()
    print(f"model {args.model}: {non_embedding / 1e6:.1f}M non-embedding params, head {head / 1e6:.1f}M; "
          f"{len(examples)} examples, {len(requests)} requests; torch threads {torch.get_num_threads()}")
    print(f"peak fp32 matmul: {peak / 1e9:.1f} GFLOP/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(other processes slow both scorers, the unbatched one most)")

    lm.loglikelihood(Request.batch(requests[:8]))  # warm-up (allocator, thread pool) for both scorers
    naive_scores(lm, requests[:2])
    (naive, naive_tokens), t_naive = timed(lambda: naive_scores(lm, requests))
    before = lm.usage()
    fast, t_fast = timed(lambda: lm.loglikelihood(Request.batch(requests)))
    after = lm.usage()
    fast_tokens = after["padded_tokens"] - before["padded_tokens"]
    fast_head = after["head_positions"] - before["head_positions"]

    pred_naive, pred_fast = naive.reshape(-1, 2).argmax(1), fast.reshape(-1, 2).argmax(1)
    labels = np.array([y for _, y in examples])
    same = bool((pred_naive == pred_fast).all())
    print(f"max |loglik difference|: {np.abs(naive - fast).max():.2e}; same predictions: {same}; "
          f"accuracy {np.mean(pred_fast == labels):.3f}")
    for name, secs, tokens, head_pos in (
        ("naive", t_naive, naive_tokens, naive_tokens),
        ("backend", t_fast, fast_tokens, fast_head),
    ):
        flops = 2 * non_embedding * tokens + 2 * head * head_pos
        print(f"{name:8s} {len(examples) / secs:8.2f} examples/s  {secs:7.2f} s  tokens {tokens:6d}  "
              f"head positions {head_pos:6d}  {flops / secs / 1e9:6.1f} GFLOP/s = {flops / secs / peak:.1%} of peak")
    if not same:
        raise SystemExit("the two scorers disagree on some prediction")
    print(f"speedup {t_naive / t_fast:.1f}x")


if __name__ == "__main__":
    main()
