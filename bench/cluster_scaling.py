"""A 16-trial sweep on a one-node and on a two-node Ray cluster started on this machine.

Usage:
    python bench/cluster_scaling.py [--data-dir ../shared/data] [--step-sleep 1.0] [--out DIR]

Both runs are real ``ray start`` clusters (the one-node run is a head alone, so the driver
joins a cluster the same way both times) with the same sweep: ``manual`` and a slowed APE
(8 seeds each: 16 trials) on the tiny model, one LM replica, one CPU per trial. The head has
2 CPUs (one for the LM actor), the worker 2 more, so one node runs one trial at a time and
two nodes run three. The evaluation cache is off, so the second run recomputes everything.

A trial here mostly waits: for its LM calls (one shared replica) and for the per-step sleep
standing in for a slow proposer or scorer. Adding a node adds trial slots, not compute; on a
machine with 2 cores the two "nodes" share them. What scales is the waiting, the way API-bound
or GPU-bound trials wait on a real cluster.

Prints the wall time of each run, how many of the 16 results each has, how the trials spread
over the nodes, and the one-node / two-node wall-time ratio last.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._fault_cluster import LocalCluster  # noqa: E402
from tests._fault_sweeps import extra_conf, run_cli, summary_rows, sweep_args  # noqa: E402

SEEDS = "[0,1,2,3,4,5,6,7]"


def one_run(nodes: int, out: Path, conf: Path, data_dir: Path, step_sleep: float) -> dict:
    """Start a cluster of ``nodes`` nodes, run the sweep on it, stop it; wall time and results."""
    run_dir = out / f"{nodes}node"
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=2)
        if nodes == 2:
            cluster.add_node("worker", num_cpus=2, resources={"psw_worker": 2})
        args = sweep_args(run_dir, conf, data_dir, step_sleep_s=step_sleep, seeds=SEEDS) + [
            f"ray.address={cluster.address}", "resources.trial_cpus=1", "resources.max_concurrent_trials=16"]
        start = time.perf_counter()
        proc = run_cli(args, env=cluster.env, timeout=1800)
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{nodes}-node sweep failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = summary_rows(run_dir)
    sweep_s = json.loads((run_dir / "summary.json").read_text())["wall_s"]
    return {"wall": wall, "sweep": sweep_s, "ok": sum(r["status"] == "ok" for r in rows), "rows": len(rows),
            "per_node": sorted(collections.Counter(r["node"] for r in rows).values(), reverse=True),
            "scores": sorted((r["method"], r["seed"], r["test_score"]) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--step-sleep", type=float, default=1.0, help="seconds slept before each APE step")
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="cluster_scaling_"))
    conf = extra_conf(out / "conf")
    results = {}
    for nodes in (1, 2):
        results[nodes] = r = one_run(nodes, out, conf, args.data_dir, args.step_sleep)
        print(f"{nodes} node(s): {r['wall']:6.1f} s wall (driver start to exit; Tune sweep {r['sweep']:.1f} s), "
              f"{r['ok']}/16 results ok, "
              f"trials per node {r['per_node']}", flush=True)
    same = results[1]["scores"] == results[2]["scores"]
    print(f"same 16 test scores on both: {same}")
    print(f"run directories: {out}")
    print(f"wall-time ratio, one node / two nodes: {results[1]['wall'] / results[2]['wall']:.2f}x")


if __name__ == "__main__":
    main()
