"""How a sweep's orchestration scales with trials and replicas, on a 3-node Ray cluster on this machine.

Usage:
    python bench/scaling.py [--grid full|quick] [--concurrent 32] [--batch-s 0.05] [--cache-actors 1] [--out DIR]

Each row is one real sweep (``python -m pipelines.run``: Hydra, Tune, the LM actor pool, the
cluster's cache actor, checkpoints) of EvoPrompt GA on SST-2, one trial per seed, every trial
capped at the same scorer example-evaluations, on a ``ray start`` cluster made of a head (the
driver, the LM replicas, the cache actor) and two worker nodes that run the trials.

The replicas stand in for GPUs: ``backends.simulated`` sleeps ``--batch-s`` per batch of up to
256 items (plus ``--token-s`` per generated token) and answers with hashed text, so a replica
costs no CPU and every CPU second the bench measures is orchestration: the trials' processes,
the LM actors' serving, the cache actor, the driver, Ray's own daemons. The scores mean nothing.
The three nodes share this machine's cores, and a node's logical CPUs are only slots: a
concurrent trial here is a process time-sharing 2 cores, which is why the table reports CPU
seconds per 1,000 example-evaluations (what a cluster would have to supply) beside the
throughput this machine reached.

Columns:
    evals/s     scorer example-evaluations the methods asked for, per second of Tune's fit.
    latency     mean seconds a trial waited per LM call (queueing, batching, the simulated
                model, Ray's transport); batch = the replicas' mean seconds per merged batch.
    req/batch   requests per merged batch at the replicas (the actor merges trials' calls).
    busy        share of the fit the replicas spent inside the model.
    CPU per 1k  CPU seconds per 1,000 example-evaluations: trial = the trial function (data,
                method, requests, checkpoints); start = the rest of the trial processes (process
                start, imports, Tune's worker side); lm = the LM actors; cache = the cache actor;
                driver = the driver during the fit; ray = raylets, GCS and Ray's other daemons.
    rss         peak memory of the trial processes alive at once, and their peak count.
    reuse       ``search.reuse_actors``: a finished trial's process runs the next trial.

Writes every measurement to ``OUT/scaling.json`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests._fault_cluster import LocalCluster  # noqa: E402
from tests._fault_sweeps import start_cli, summary_rows  # noqa: E402

GRIDS = {  # (trials, replicas, search.reuse_actors)
    "full": [(16, 2, False), (64, 2, False), (256, 2, False), (64, 1, False), (64, 4, False), (64, 2, True)],
    "quick": [(8, 1, False), (16, 2, True)],
}
BUDGET = 384  # scorer example-evaluations per trial
METHOD = ["method=evoprompt", "search=single", "+search.method_overrides.evoprompt.n_eval=16",
          "+search.method_overrides.evoprompt.init_pool=4", "+search.method_overrides.evoprompt.pop_size=4",
          "+search.method_overrides.evoprompt.max_new_tokens=32"]
TASK = ["task=sst2", "task.n_train=50", "task.n_dev=32", "task.n_test=64"]


def _kind(cmd: str) -> str:
    """Which part of the sweep a process of the cluster is, from its title (Ray retitles its workers)."""
    if cmd.startswith("ray::"):
        for name, kind in (("LMActor", "lm"), ("CacheActor", "cache"), ("ImplicitFunc", "trial"),
                           ("Agent", "ray")):
            if name in cmd:
                return kind
        return "worker"  # a worker not seen doing anything yet (ray::IDLE)
    return "ray"  # raylet, gcs_server, log monitor, `ray start` itself


class Sampler:
    """Polls the cluster's processes: CPU seconds per kind, peak trial memory and count."""

    def __init__(self, pgids: set[int], interval_s: float = 0.5) -> None:
        self.pgids, self.interval_s = pgids, interval_s
        self.first: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self.peak_rss = self.peak_trials = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._poll(initial=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._poll()

    def _poll(self, initial: bool = False) -> None:
        rss = trials = 0
        for proc in psutil.process_iter():
            try:
                cmd = " ".join(proc.cmdline())
                # Ray's workers start sessions of their own; the node daemons stay in their node's.
                if not cmd.startswith("ray::") and os.getpgid(proc.pid) not in self.pgids:
                    continue
                with proc.oneshot():
                    kind, t = _kind(cmd), proc.cpu_times()
                    cpu = t.user + t.system
                    if kind == "trial":
                        rss += proc.memory_info().rss
                        trials += 1
            except (psutil.Error, ProcessLookupError):
                continue
            # A process alive before the sweep counts from then; one born during it from zero.
            self.first.setdefault(proc.pid, cpu if initial else 0.0)
            # An idle worker that later runs a trial is a trial process for all of its life.
            seen = self.last.get(proc.pid, ("worker", 0.0))[0]
            self.last[proc.pid] = (kind if kind != "worker" else seen, cpu)
        self.peak_rss, self.peak_trials = max(self.peak_rss, rss), max(self.peak_trials, trials)

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for pid, (kind, cpu) in self.last.items():
            out[kind] += cpu - self.first[pid]
        return dict(out)


def sweep(cluster: LocalCluster, out: Path, data_dir: Path, trials: int, replicas: int, reuse: bool, concurrent: int,
          batch_s: float, token_s: float, cache_actors: int = 1) -> dict:
    name = f"t{trials}_r{replicas}" + ("_reuse" if reuse else "")
    run_dir = out / name
    model = [f"model@lm.{r}=simulated" for r in ("scorer", "proposer")] + [
        f"lm.{r}.{k}={v}" for r in ("scorer", "proposer") for k, v in (("batch_s", batch_s), ("token_s", token_s))]
    args = [*model, *METHOD, *TASK, f"search.seeds=[{','.join(map(str, range(trials)))}]",
            f"budget.scorer.examples={BUDGET}", "logger=none", "progress.mode=plain", "progress.interval_s=60",
            f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", f"ray.address={cluster.address}",
            f"cache.path={run_dir}.sqlite", "cache.shared=actor", f"cache.actors={cache_actors}",
            f"resources.replicas={replicas}", "resources.lm_cpus=1", "resources.lm_gpus=0", "resources.trial_cpus=0.01",
            "+resources.trial_resources={psw_trial: 1}", f"resources.max_concurrent_trials={min(trials, concurrent)}",
            f"search.reuse_actors={str(reuse).lower()}"]
    machine0, children0 = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    with Sampler({p.pid for p in cluster.nodes.values()}) as sampler:
        start = time.perf_counter()
        proc = start_cli(args, out / f"{name}.log", env=cluster.env)
        rc = proc.wait(timeout=3600)
        wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"sweep {name} failed ({rc}); see {out}/{name}.log")
    machine1, children1 = psutil.cpu_times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = summary_rows(run_dir)
    actors = summary["lm_actors"]["scorer"]
    over = summary["overhead"]
    cpu = sampler.cpu_by_kind()
    busy = lambda t: sum(t[f] for f in ("user", "system", "nice", "irq", "softirq"))  # noqa: E731
    return {
        "trials": trials, "replicas": replicas, "reuse": reuse, "concurrent": min(trials, concurrent), "ok": sum(r["status"] == "ok" for r in rows),
        "wall_s": wall, "fit_s": over["fit_s"],
        "examples": sum(r["scorer_examples"] for r in rows), "results": sum(int(r["steps"]) + 1 for r in rows),  # a report per step, one at the end
        "calls": sum(r["scorer_calls"] + r["proposer_calls"] for r in rows),
        "wait_s": sum(r["scorer_wait_s"] + r["proposer_wait_s"] for r in rows),
        "actor_requests": sum(a["requests"] for a in actors), "actor_calls": sum(a["calls"] for a in actors),
        "batches": sum(a["batches"] for a in actors), "busy_s": sum(a["busy_s"] for a in actors),
        "cpu": {"trial": sum(r.get("cpu_s", 0.0) for r in rows),
                "start": max(0.0, cpu.get("trial", 0.0) - sum(r.get("cpu_s", 0.0) for r in rows)) + cpu.get("worker", 0.0),
                "lm": sum(a["cpu_s"] for a in actors), "cache": over["cache_actor"].get("cpu_s", 0.0),
                "driver": over["driver_cpu_s"], "ray": cpu.get("ray", 0.0),
                "driver_process": (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime),
                "machine": busy(machine1._asdict()) - busy(machine0._asdict())},
        "cache_actor": over["cache_actor"], "peak_trial_rss": sampler.peak_rss, "peak_trials": sampler.peak_trials,
    }


def request_bytes(data_dir: Path) -> int:
    """Pickled size of one EvoPrompt scoring call here (16 dev examples x 2 labels x 4 children):
    what one trial ships to a replica per call (Ray passes arguments under 100 KiB inline, not
    through the object store)."""
    from methods.lm import Request
    from tasks.loaders import sst2

    task = sst2(str(data_dir), n_train=50, n_dev=32, n_test=64)
    reqs = [Request(task.render(task.instruction, ex), w) for _ in range(4) for ex in task.dev[:16] for w in task.verbalizer]
    return len(pickle.dumps(reqs))


def table(results: list[dict]) -> str:
    head = (f"{'trials':>6} {'repl':>4} {'reuse':>5} {'conc':>4} {'fit s':>6} {'evals':>7} {'evals/s':>7} {'latency':>8} "
            f"{'batch':>6} {'req/batch':>9} {'busy':>5} | {'CPU s per 1k evals: trial':>25} {'start':>6} {'lm':>5} "
            f"{'cache':>5} {'driver':>6} {'ray':>5} {'machine':>7} | {'rss GiB':>7} {'procs':>5}")
    lines = [head]
    for r in results:
        k = 1000.0 / max(r["examples"], 1)
        c = r["cpu"]
        lines.append(
            f"{r['trials']:>6} {r['replicas']:>4} {'yes' if r['reuse'] else 'no':>5} {r['concurrent']:>4} {r['fit_s']:>6.0f} {r['examples']:>7.0f} "
            f"{r['examples'] / r['fit_s']:>7.1f} {r['wait_s'] / max(r['calls'], 1):>7.2f}s "
            f"{r['busy_s'] / max(r['batches'], 1):>5.2f}s {r['actor_requests'] / max(r['batches'], 1):>9.1f} "
            f"{r['busy_s'] / (r['replicas'] * r['fit_s']):>5.0%} | {c['trial'] * k:>25.1f} {c['start'] * k:>6.1f} "
            f"{c['lm'] * k:>5.1f} {c['cache'] * k:>5.1f} {c['driver'] * k:>6.1f} {c['ray'] * k:>5.1f} "
            f"{c['machine'] * k:>7.1f} | {r['peak_trial_rss'] / 2**30:>7.1f} {r['peak_trials']:>5}")
    return "\n".join(lines)


def per_unit(r: dict) -> dict:
    """What each part costs per unit of its own work: the figures that carry to another cluster."""
    c = r["cpu"]
    return {
        "start_s_per_trial": c["start"] / r["trials"],  # process start, imports, Tune's worker side
        "trial_s_per_1k_evals": 1000 * c["trial"] / r["examples"],  # the trial function's own work
        "lm_ms_per_call": 1000 * c["lm"] / max(r["actor_calls"], 1),  # serving one trial's call at a replica
        "cache_us_per_key": 1e6 * c["cache"] / max(r["cache_actor"].get("keys", 0), 1),
        "keys_per_eval": r["cache_actor"].get("keys", 0) / r["examples"],
        "driver_ms_per_result": 1000 * c["driver"] / r["results"],  # Tune's loop: results, checkpoints, launches
        "ray_s_per_trial": c["ray"] / r["trials"],
        "evals_per_result": r["examples"] / r["results"],
        "calls_per_eval": r["actor_calls"] / r["examples"],
    }


def unit_table(results: list[dict]) -> str:
    head = (f"{'trials':>6} {'repl':>4} {'reuse':>5} | {'start s/trial':>13} {'trial s/1k evals':>16} {'lm ms/call':>10} "
            f"{'cache us/key':>12} {'driver ms/result':>16} {'ray s/trial':>11}")
    lines = [head]
    for r in results:
        u = per_unit(r)
        lines.append(f"{r['trials']:>6} {r['replicas']:>4} {'yes' if r['reuse'] else 'no':>5} | {u['start_s_per_trial']:>13.2f} "
                     f"{u['trial_s_per_1k_evals']:>16.2f} {u['lm_ms_per_call']:>10.1f} {u['cache_us_per_key']:>12.0f} "
                     f"{u['driver_ms_per_result']:>16.1f} {u['ray_s_per_trial']:>11.2f}")
    return "\n".join(lines)


def projection(r: dict, gpus: int, gpu_evals_s: float, trial_evals: float, step_evals: float) -> str:
    """Cores each part would need at ``gpus`` x ``gpu_evals_s`` example-evaluations/s, from ``r``'s unit costs.

    Parts that are one process (the cache actor, the driver) cannot use more than one core, so
    the throughput at which each reaches one core is what caps the cluster."""
    u = per_unit(r)
    evals_s = gpus * gpu_evals_s
    trials_s, results_s = evals_s / trial_evals, evals_s / step_evals
    parts = [  # (part, cores needed, one process?)
        ("trial processes: start", trials_s * u["start_s_per_trial"], False),
        ("trial processes: work", evals_s * u["trial_s_per_1k_evals"] / 1000, False),
        ("LM actors: serving", evals_s * u["calls_per_eval"] * u["lm_ms_per_call"] / 1000, False),
        ("Ray daemons", trials_s * u["ray_s_per_trial"], False),
        ("cache actor", evals_s * u["keys_per_eval"] * u["cache_us_per_key"] / 1e6, True),
        ("driver (Tune)", results_s * u["driver_ms_per_result"] / 1000, True),
    ]
    lines = [f"projection: {gpus} GPUs x {gpu_evals_s:.0f} example-evaluations/s = {evals_s:,.0f}/s; trials of "
             f"{trial_evals:.0f} example-evaluations in steps of {step_evals:.0f} ({trials_s:.1f} trials/s, "
             f"{results_s:.0f} results/s); unit costs of the {r['trials']}-trial, {r['replicas']}-replica row"]
    for name, cores, single in parts:
        cap = f"saturates at {evals_s / cores:,.0f} example-evaluations/s" if single else ""
        lines.append(f"  {name:<24} {cores:>7.1f} cores  {cap}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--concurrent", type=int, default=32, help="trials running at once, at most")
    parser.add_argument("--batch-s", type=float, default=0.05, help="simulated seconds per batch (one forward pass)")
    parser.add_argument("--token-s", type=float, default=0.002, help="simulated seconds per generated token per pass")
    parser.add_argument("--out", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--cache-actors", type=int, default=1, help="cache.actors for every sweep")
    parser.add_argument("--gpus", type=int, default=64, help="projection: GPUs (one replica each)")
    parser.add_argument("--gpu-evals-s", type=float, default=400.0,
                        help="projection: example-evaluations/s one GPU scores (an assumption; see README)")
    parser.add_argument("--trial-evals", type=float, default=1000.0, help="projection: example-evaluations per trial")
    parser.add_argument("--step-evals", type=float, default=128.0, help="projection: example-evaluations per step")
    parser.add_argument("--table", type=Path, default=None, help="print the tables of an earlier run's scaling.json")
    args = parser.parse_args()
    if args.table:
        return report(json.loads(args.table.read_text()), args)
    out = args.out or Path(tempfile.mkdtemp(prefix="scaling_"))
    out.mkdir(parents=True, exist_ok=True)
    grid = GRIDS[args.grid]
    slots = max(min(t, args.concurrent) for t, _, _ in grid)
    results = []
    with LocalCluster() as cluster:
        # Logical CPUs are slots, not cores: the head takes the replicas (1 each), the workers the trials.
        cluster.start_head(num_cpus=max(r for _, r, _ in grid) + 1)
        for name in ("worker1", "worker2"):
            cluster.add_node(name, num_cpus=slots, resources={"psw_trial": -(-slots // 2)})
        for trials, replicas, reuse in grid:
            print(f"[scaling] {trials} trials, {replicas} replica(s), reuse_actors={reuse} ...", flush=True)
            results.append(r := sweep(cluster, out, args.data_dir, trials, replicas, reuse, args.concurrent,
                                      args.batch_s, args.token_s, args.cache_actors))
            print(f"[scaling] {r['ok']}/{trials} trials ok in {r['fit_s']:.0f} s: "
                  f"{r['examples'] / r['fit_s']:.1f} example-evaluations/s", flush=True)
            (out / "scaling.json").write_text(json.dumps(results, indent=1))
    print(f"\nsimulated replica: {args.batch_s:.3f} s per batch of up to 256 items, {args.token_s:.4f} s per generated "
          f"token; {BUDGET} scorer example-evaluations per trial; cores: {os.cpu_count()}")
    print(f"one scoring call's arguments: {request_bytes(args.data_dir) / 1024:.1f} KiB pickled")
    report(results, args)
    print(f"run directories and scaling.json: {out}")


def report(results: list[dict], args: argparse.Namespace) -> None:
    print(table(results))
    print()
    print(unit_table(results))
    print()
    base = max((r for r in results if not r["reuse"]), key=lambda r: (r["trials"], r["replicas"]))
    print(projection(base, args.gpus, args.gpu_evals_s, args.trial_evals, args.step_evals))


if __name__ == "__main__":
    main()
