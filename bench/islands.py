"""PBT islands against the same islands run independently, at the same budget per island, over seeds.

Usage::

    python bench/islands.py                      # 3 seeds x {pbt, fifo} of +experiment=sst2_islands
    python bench/islands.py --seeds 0 --extra resources.threads=2

Each (seed, form) is one sweep of ``+experiment=sst2_islands``: 4 EvoPrompt-GA islands, each held
to the same scorer budget, so the total is equal and the forms differ only in PBT's migrations
(exploit: a weak island takes a strong island's population; explore: its mutation temperature
is perturbed). Per form it prints, over the seeds, the test score of each sweep's best-dev
island (what a researcher would keep) with a 95% interval over the test sentences (seeds
averaged per sentence), the mean over all islands, the migrations, and a paired permutation
test between the two forms' best islands.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.report import example_scores, load_run  # noqa: E402
from pipelines.stats import bootstrap_interval, paired_p  # noqa: E402


def sweep(out: Path, seed: int, form: str, extra: list[str]) -> Path:
    run_dir = out / f"{form}_s{seed}"
    if not (run_dir / "summary.json").is_file():
        cmd = [sys.executable, "-m", "pipelines.run", "+experiment=sst2_islands", f"search.seeds=[{seed}]",
               f"search.scheduler={form}", f"hydra.run.dir={run_dir}", "logger=none", *extra]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, check=True)
    return run_dir


def best_island(run_dir: Path) -> tuple[dict, tuple[dict, ...], list[float]]:
    """The sweep's best-dev island, all its islands, and the best one's per-sentence test scores."""
    run = load_run(run_dir)
    best = max(run.ok, key=lambda r: (r["dev_score"], -r["island"]))
    return best, run.ok, list(example_scores(run, best))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "bench_islands")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every sweep")
    args = parser.parse_args()
    table, per_example = {}, {}
    for form in ("pbt", "fifo"):
        bests, scores, all_islands, migrations, spent = [], [], [], 0, []
        for seed in args.seeds:
            run_dir = sweep(args.out, seed, form, args.extra)
            best, rows, per = best_island(run_dir)
            bests.append(best["test_score"])
            scores.append(per)
            all_islands += [r["test_score"] for r in rows]
            migrations += sum(int(r.get("migrations", 0)) for r in rows)
            spent.append(sum(r["scorer_examples"] for r in rows))
        mat = np.array(scores, dtype=float).T
        per_example[form] = mat
        table[form] = {"best": float(np.mean(bests)), "per_seed": bests, "ci": bootstrap_interval(mat),
                       "all_islands": float(np.mean(all_islands)), "migrations": migrations,
                       "scorer_examples_per_sweep": spent}
    p = paired_p(per_example["pbt"], per_example["fifo"])
    for form, r in table.items():
        lo, hi = r["ci"]
        print(f"{form:<5} best-dev island test {r['best']:.3f} [{lo:.3f}, {hi:.3f}] (per seed "
              f"{', '.join(f'{x:.3f}' for x in r['per_seed'])}); mean over islands {r['all_islands']:.3f}; "
              f"migrations {r['migrations']}; scorer example-evaluations per sweep {r['scorer_examples_per_sweep']}")
    print(f"paired permutation p (pbt vs fifo best islands, {per_example['pbt'].shape[0]} test sentences): {p:.3f}")
    (args.out / "islands.json").write_text(json.dumps({**table, "p": p}, indent=1, default=list))


if __name__ == "__main__":
    main()
