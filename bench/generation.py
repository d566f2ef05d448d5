"""Greedy generation throughput of the local backend against a per-example ``model.generate`` loop.

Usage:
    python bench/generation.py [--n 32] [--k-shot 2] [--max-new-tokens 96] [--data-dir ../shared/data]
        [--model smollm2] [--threads 0]

Both contenders run side by side in one process on the same GSM8K test prompts (few-shot CoT,
the shots shared by every prompt, as ``tasks.gen_loaders.gsm8k`` renders them):

* per-example: transformers' ``model.generate`` on one prompt at a time (greedy, the task's
  stop strings, KV cache on), the usual way to run a generative benchmark by hand;
* backend: ``HFBackend.generate`` on all prompts in one call: the shared few-shot prefix run
  once, suffixes left-padded into batches, finished rows dropped from the batch.

It checks that both write the same answers, reports examples/s and generated tokens/s of each,
the fraction of the machine's fp32 matmul rate each reaches (weights' FLOPs on the tokens each
actually ran; attention not counted), and prints the speedup last.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backends.hf import HFBackend  # noqa: E402
from backends.sampling import cut  # noqa: E402
from bench.scoring import param_counts, peak_matmul_flops, timed  # noqa: E402
from tasks.gen_loaders import gsm8k  # noqa: E402


def per_example(lm: HFBackend, prompts: list[str], max_new_tokens: int, stop) -> tuple[list[str], int, int]:
    """``model.generate`` one prompt at a time; returns texts, tokens run, and tokens generated."""
    texts, run, made = [], 0, 0
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([list(lm.encoder.context(p, None))], device=lm.device)
            out = lm.model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                stop_strings=list(stop), tokenizer=lm.tokenizer, pad_token_id=lm.tokenizer.eos_token_id,
            )
            new = out[0, ids.shape[1]:]
            texts.append(cut(lm.tokenizer.decode(new, skip_special_tokens=True), stop))
            run += ids.shape[1] + len(new) - 1
            made += len(new)
    return texts, run, made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="GSM8K test questions")
    parser.add_argument("--k-shot", type=int, default=2, help="worked train solutions shared by every prompt")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()

    task = gsm8k(str(args.data_dir), n_train=1, n_dev=1, n_test=args.n, k_shot=args.k_shot, position="before",
                 instruction="Solve the problem step by step and end with 'The answer is N.'")
    prompts = [task.render(task.instruction, ex) for ex in task.test]
    stop = task.stop
    lm = HFBackend(args.model, threads=args.threads)
    non_embedding, head = param_counts(lm)
    peak = peak_matmul_flops()
    lengths = [len(lm.encoder.context(p, None)) for p in prompts]
    print(f"model {args.model}: {non_embedding / 1e6:.1f}M non-embedding params; {len(prompts)} GSM8K prompts of "
          f"{min(lengths)}-{max(lengths)} tokens ({args.k_shot}-shot CoT), up to {args.max_new_tokens} new tokens; "
          f"torch threads {torch.get_num_threads()}")
    print(f"peak fp32 matmul: {peak / 1e9:.1f} GFLOP/s; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

    lm.generate(prompts[:2], max_new_tokens=4, temperature=0.0, stop=stop)  # warm-up for both
    per_example(lm, prompts[:1], 4, stop)
    (ref, ref_run, ref_made), t_ref = timed(lambda: per_example(lm, prompts, args.max_new_tokens, stop))
    before = lm.usage()
    fast, t_fast = timed(lambda: [o[0] for o in lm.generate(prompts, max_new_tokens=args.max_new_tokens,
                                                            temperature=0.0, stop=stop)])
    fast_run = lm.usage()["forward_tokens"] - before["forward_tokens"]
    fast_made = sum(len(lm.tokenize(t)) for t in fast)  # about the tokens generated (stop text excluded)

    same = sum(a == b for a, b in zip(ref, fast))
    print(f"same outputs: {same}/{len(prompts)}; GSM8K accuracy {task.score(fast, task.test):.3f} (backend), "
          f"{task.score(ref, task.test):.3f} (per-example)")
    for name, secs, run, made in (("per-example", t_ref, ref_run, ref_made), ("backend", t_fast, fast_run, fast_made)):
        flops = 2 * non_embedding * run + 2 * head * made
        print(f"{name:12s} {len(prompts) / secs:7.2f} examples/s  {made / secs:7.1f} new tokens/s  {secs:7.1f} s  "
              f"tokens run {run:7d}  {flops / secs / 1e9:6.1f} GFLOP/s = {flops / secs / peak:.1%} of peak")
    if same < 0.95 * len(prompts):
        raise SystemExit("the two generators disagree on more than 5% of the prompts")
    print(f"speedup {t_ref / t_fast:.1f}x")


if __name__ == "__main__":
    main()
