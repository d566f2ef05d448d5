"""GSM8K and one BBH task answered by our backend and by lm-evaluation-harness, on the same prompts.

Usage:
    python bench/lm_eval_gen_crosscheck.py --lm-eval ~/.venvs/lm-eval/bin/lm_eval
        [--n 100] [--bbh-task boolean_expressions] [--gsm8k-tokens 128] [--data-dir ../shared/data]
        [--model smollm2] [--batch-size 1] [--bbh-cot] [--bbh-tokens 0] [--gsm8k-shots 0] [--only gsm8k|bbh]

Both sides read the same local files and model directory and decode greedily:

* lm-eval: two ``generate_until`` tasks written to a temporary folder. GSM8K reads
  ``gsm8k/test.jsonl`` through the ``json`` builder, the instruction (and, with
  ``--gsm8k-shots``, the worked train solutions our loader draws) as the task description; BBH reads ``bbh/bbh/<task>.json`` (field ``examples``), answer-only, with the
  task's 3 exemplars (cut to their answers, as ``tasks.gen_loaders.bbh_gen`` cuts them, or worked
  with ``--bbh-cot``) in the description. Same stop strings and token cap as ours. ``--limit`` takes the first N documents.
* ours: ``HFBackend.generate`` on the same first N examples rendered by ``tasks.gen_loaders``,
  in one batched call per task (shared prefix, left-padded batches).

Per task it prints how many prompts are identical, how many outputs are identical, the
accuracy of each side's outputs under our metric and lm-eval's own reported metric, and the
wall time of each side; the overall output agreement is printed last.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.lm_eval_crosscheck import model_directory, run_lm_eval  # noqa: E402

GSM8K_INSTRUCTION = "Solve the math problem step by step, then write 'The answer is' and the number."


def tasks_for(data_dir: Path, bbh_task: str, gsm8k_tokens: int, bbh_cot: bool = False, bbh_tokens: int = 0,
              gsm8k_shots: int = 0):
    """Our two tasks, rendered as the crosscheck compares them."""
    from tasks.gen_loaders import bbh_gen, gsm8k

    math = gsm8k(str(data_dir), n_train=1, n_dev=1, n_test=0, k_shot=gsm8k_shots, position="before",
                 instruction=GSM8K_INSTRUCTION, max_new_tokens=gsm8k_tokens)
    bbh = bbh_gen(str(data_dir), bbh_task, cot=bbh_cot, n_train=1, n_dev=1, n_test=0, seed=0,
                  max_new_tokens=bbh_tokens)
    return math, bbh


def lm_eval_configs(data_dir: Path, bbh_task: str, math, bbh) -> dict[str, dict]:
    """The lm-eval task YAMLs (as dicts), rendering exactly our prompts."""
    until = {"do_sample": False, "temperature": 0.0}
    shots = bbh.test[0].inputs["shots"]
    return {
        "xcheck_gsm8k": {
            "task": "xcheck_gsm8k", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((data_dir / "gsm8k" / "test.jsonl").resolve())}},
            "test_split": "test", "output_type": "generate_until",
            "description": f"{math.instruction}\n\n{math.test[0].inputs['shots']}", "doc_to_text": "Q: {{question}}\nA:",
            "doc_to_target": "{{answer.split('####')[-1].strip()}}",
            "generation_kwargs": {**until, "until": list(math.stop), "max_gen_toks": math.max_new_tokens},
            "filter_list": [{"name": "flexible-extract", "filter": [
                {"function": "regex", "group_select": -1, "regex_pattern": r"(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "regexes_to_ignore": [",", "\\$", "\\.$"]}],
            "metadata": {"version": 1.0},
        },
        "xcheck_bbh": {
            "task": "xcheck_bbh", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((data_dir / "bbh" / "bbh" / f"{bbh_task}.json").resolve())},
                               "field": "examples"},
            "test_split": "test", "output_type": "generate_until",
            "description": f"{bbh.instruction}\n\n{shots}",
            "doc_to_text": "Q: {{input}}\nA:" + (" Let's think step by step." if bbh.template.endswith("step.") else ""),
            "doc_to_target": "{{target}}",
            "generation_kwargs": {**until, "until": list(bbh.stop), "max_gen_toks": bbh.max_new_tokens},
            "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": True, "ignore_punctuation": False}],
            "metadata": {"version": 1.0},
        },
    }


def read_samples(out: Path, task: str) -> list[tuple[str, str]]:
    """``(prompt, output)`` per document, by ``doc_id``, from lm-eval's ``--log_samples`` file."""
    files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
    if not files:
        raise SystemExit(f"error: lm-eval wrote no samples for {task} under {out}")
    rows = [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines() if line.strip()]
    rows.sort(key=lambda r: int(r["doc_id"]))
    out_rows = []
    for r in rows:
        args = r["arguments"]
        first = args[next(iter(args))] if isinstance(args, dict) else args[0]
        prompt = first["arg_0"] if isinstance(first, dict) else first[0]
        resp = r["resps"][0]
        out_rows.append((prompt, resp[0] if isinstance(resp, list) else resp))
    return out_rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lm-eval", required=True, help="the lm_eval executable of its own environment")
    parser.add_argument("--n", type=int, default=100, help="first N documents of each task")
    parser.add_argument("--bbh-task", default="boolean_expressions")
    parser.add_argument("--gsm8k-tokens", type=int, default=128, help="generation cap for GSM8K")
    parser.add_argument("--gsm8k-shots", type=int, default=0, help="worked train solutions before each GSM8K problem")
    parser.add_argument("--bbh-cot", action="store_true", help="BBH with its 3-shot chain-of-thought prompt")
    parser.add_argument("--only", choices=("gsm8k", "bbh"), default=None, help="run one of the two tasks")
    parser.add_argument("--bbh-tokens", type=int, default=0, help="generation cap for BBH (0: 256 CoT, 32 answer-only)")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch size (1: one prompt at a time)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)

    from backends.hf import HFBackend

    model_dir = model_directory(args.model)
    math, bbh = tasks_for(args.data_dir, args.bbh_task, args.gsm8k_tokens, args.bbh_cot, args.bbh_tokens,
                          args.gsm8k_shots)
    chosen = [(n, t) for n, t in (("xcheck_gsm8k", math), ("xcheck_bbh", bbh)) if args.only in (None, n[7:])]
    ours: dict[str, tuple[list[str], list[str], float]] = {}
    lm = HFBackend(str(model_dir), threads=args.threads)
    for name, task in chosen:
        examples = task.test[: args.n]
        prompts = [task.render(task.instruction, ex) for ex in examples]
        start = time.perf_counter()
        outs = [o[0] for o in lm.generate(prompts, max_new_tokens=task.max_new_tokens, temperature=0.0, stop=task.stop)]
        ours[name] = (prompts, outs, time.perf_counter() - start)

    with tempfile.TemporaryDirectory(prefix="xcheck-gen-") as tmp:
        work = Path(tmp)
        include = work / "tasks"
        include.mkdir()
        for name, cfg in lm_eval_configs(args.data_dir, args.bbh_task, math, bbh).items():
            if name in ours:
                (include / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        cmd = [args.lm_eval, "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
               "--tasks", ",".join(ours), "--include_path", str(include), "--device", "cpu",
               "--limit", str(args.n), "--batch_size", str(args.batch_size), "--log_samples",
               "--output_path", str(work / "out")]
        t_theirs = run_lm_eval(cmd, work)
        results = json.loads(sorted((work / "out").rglob("results_*.json"))[-1].read_text())
        theirs = {name: read_samples(work / "out", name) for name in ours}

    total_same = total = 0
    for name, task in chosen:
        prompts, outs, secs = ours[name]
        their_prompts = [p for p, _ in theirs[name]]
        their_outs = [o for _, o in theirs[name]]
        examples = task.test[: len(their_outs)]
        same_prompt = sum(a == b for a, b in zip(prompts, their_prompts))
        same_out = sum(a.strip() == b.strip() for a, b in zip(outs, their_outs))
        reported = results.get("results", {}).get(name, {})
        metric = next((v for k, v in reported.items() if k.startswith("exact_match")), float("nan"))
        print(f"{name}: {len(examples)} docs; same prompt {same_prompt}/{len(examples)}; same output "
              f"{same_out}/{len(examples)}; accuracy (our metric) ours {task.score(outs[: len(examples)], examples):.3f}, "
              f"lm-eval's outputs {task.score(their_outs, examples):.3f}; lm-eval's own exact_match {metric:.3f}; "
              f"ours {secs:.1f} s")
        for a, b, p in zip(outs, their_outs, prompts):
            if a.strip() != b.strip():
                print(f"  differs: ours {a.strip()[:80]!r} vs lm-eval {b.strip()[:80]!r}")
                break
        total_same, total = total_same + same_out, total + len(examples)
    print(f"wall: lm-eval {t_theirs:.1f} s for {len(ours)} task(s) (whole subprocess: start-up, data, model load, generation); "
          f"ours {sum(v[2] for v in ours.values()):.1f} s (generation only)")
    print(f"identical greedy outputs: {total_same}/{total} = {total_same / max(total, 1):.1%}")


if __name__ == "__main__":
    main()
