"""Memory and throughput of concurrent trials sharing one LM actor, against a model per trial.

Usage:
    python bench/shared_lm.py [--trials 4] [--n 40] [--batch 8] [--data-dir ../shared/data]

Three runs in one local Ray session (``--cpus`` CPUs), each scoring SST-2 (GLUE dev) examples
with the task's hand-written instruction, both labels per example:

* one trial: one ``LMActor`` holding the default model and one trial actor that scores
  ``--n`` examples through ``RayLM`` (the baseline: what a single trial costs);
* shared (A): the same single ``LMActor`` and ``--trials`` trial actors scoring ``--n``
  examples each at the same time, ``--batch`` examples per call, as a sweep's trials do;
* own model (B): ``--trials`` actors, each loading its own copy of the model and scoring its
  ``--n`` examples on it.

Peak memory is the largest sum of resident set sizes (RSS) over the run's worker processes
(the LM actor and trial actors, or the own-model actors), sampled every ``--sample-s``
seconds from model load to the end; the driver and Ray's own daemons are the same in every
run and are left out. RSS counts pages shared between processes once per process: the
libraries, and on CPU also the weights, which every own-model process memory-maps from the
same safetensors file (the page cache holds them once; GPU copies would not be shared). Two
more totals are printed beside it: the peak of the anonymous part of RSS (heap, activations,
Python objects; file-backed pages left out, so the mapped weights too), and a proportional
(PSS) total taken at the end of each run, which splits shared pages between their users,
including processes outside the run that map the same files. Every trial
process imports the sweep's trial module, as a real trial does (``--bare-trials``: only the
LM client), and the peak is broken down per worker class. Throughput is scored
examples per second over the scoring calls only, and over the whole run (process starts
and model loads included). Torch threads default to a fair share of the CPUs: all of them
for the one shared model, ``cpus // trials`` (at least 1) for each own model.

Prints the peak memory of each run, the throughputs, checks that A and B give the same
predictions, and prints the memory ratio of A to one trial (the target is at most 1.3x) last.
Before that it prints the floor under a trial process's weight: RSS and PSS of a bare actor
process that imported nothing, only the module Tune wraps every function trainable in, or
what the trials here import, each with the ratio A / one trial would have if every trial
process weighed that much (the LM actor as measured in the one-trial run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from methods.evaluate import predictions, requests_for  # noqa: E402
from methods.lm import TextPrompt  # noqa: E402
from pipelines.lm.pool import PoolSpec, start_pool  # noqa: E402
from tasks.loaders import sst2  # noqa: E402

# Ray titles worker processes "ray::<Class>.<method>"; only these count as the run's processes.
# What a sweep's trial process imports (Tune, Hydra, the methods, the cached and budgeted LM).
TRIAL_MODULES = ("pipelines.trial",)
TITLES = ("ray::LMActor", "ray::SharedTrial", "ray::OwnModelTrial")
# What every Tune trial process imports before any code of this project runs: Tune wraps a
# function trainable in this module, which pulls in ray.air, ray.data, pandas and pyarrow.
TUNE_MODULES = ("ray.tune.trainable.function_trainable",)


@ray.remote
class SharedTrial:
    """A trial that holds no model: every batch goes to the shared LM actor through ``RayLM``."""

    def __init__(self, handles: list, imports: tuple[str, ...]) -> None:
        from pipelines.lm.client import RayLM

        load_modules(imports)
        self.lm = RayLM(handles)

    def pid(self) -> int:
        return os.getpid()

    def run(self, batches: list) -> np.ndarray:
        """Log-likelihoods of every request, one ``loglikelihood`` call per batch: float64 ``[n]``."""
        return np.concatenate([self.lm.loglikelihood(b) for b in batches])


@ray.remote
class OwnModelTrial:
    """A trial that loads its own copy of the model in its own process."""

    def __init__(self, backend: dict, imports: tuple[str, ...]) -> None:
        import hydra.utils

        load_modules(imports)
        self.lm = hydra.utils.instantiate(backend, _convert_="all")

    def pid(self) -> int:
        return os.getpid()

    def run(self, batches: list) -> np.ndarray:
        return np.concatenate([self.lm.loglikelihood(b) for b in batches])


@ray.remote
class Probe:
    """A bare actor that imports ``imports`` and does nothing else: a per-process baseline."""

    def __init__(self, imports: tuple[str, ...]) -> None:
        load_modules(imports)

    def pid(self) -> int:
        return os.getpid()


def load_modules(names: tuple[str, ...]) -> None:
    """Import what a sweep's trial process imports, so a trial here weighs what a real one does."""
    import importlib

    for name in names:
        importlib.import_module(name)


class PeakRSS:
    """Samples, in a thread, the summed RSS of this driver's descendant worker processes.

    Only processes whose title starts with one of :data:`TITLES` count, so Ray's daemons
    and idle pooled workers are left out.
    """

    def __init__(self, period_s: float) -> None:
        self.period_s, self.peak, self.pids = period_s, 0, set()
        self.by_class: dict[str, int] = {}  # RSS per worker class at the peak
        self.anon_peak = 0  # peak of the summed anonymous (not file-backed) RSS
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            sums: dict[str, int] = {}
            anon = 0
            for proc, cls in run_processes():
                try:
                    info = proc.memory_info()
                except psutil.Error:  # exited between listing and reading
                    continue
                sums[cls] = sums.get(cls, 0) + info.rss
                anon += info.rss - info.shared  # Linux: shared is RssFile + RssShmem
                self.pids.add(proc.pid)
            self.anon_peak = max(self.anon_peak, anon)
            if sum(sums.values()) > self.peak:
                self.peak, self.by_class = sum(sums.values()), sums
            self._stop.wait(self.period_s)


def run_processes() -> list[tuple[psutil.Process, str]]:
    """Live descendants of this process that are the run's workers, with their class name."""
    out = []
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if title.startswith(TITLES):
            out.append((proc, title.split()[0].removeprefix("ray::").split(".")[0]))
    return out


def pss_total(pids: set[int]) -> int:
    """Summed proportional set size of ``pids`` (shared pages split between their users)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            pass
    return total


def wait_gone(pids: set[int], timeout_s: float = 60.0) -> None:
    """Block until the processes of a finished run have exited, so the next run samples alone."""
    procs = []
    for pid in pids:
        try:
            procs.append(psutil.Process(pid))
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=timeout_s)


def baselines(imports: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """``(what, RSS, PSS)`` of one actor process that imported nothing, only Tune's trainable
    module, or what the trials here import: the floor under a trial's weight."""
    out = []
    for what, mods in (("an idle Ray actor", ()), ("Tune's trainable imports", TUNE_MODULES),
                       (f"the trials' imports {list(imports)}", imports)):
        probe = Probe.remote(mods)
        proc = psutil.Process(ray.get(probe.pid.remote()))
        info = proc.memory_full_info()
        out.append((what, info.rss, info.pss))
        ray.kill(probe)
        wait_gone({proc.pid})
    return out


def backend_conf(model: str, threads: int) -> dict:
    return {"_target_": "backends.hf.HFBackend", "model": model, "threads": threads}


def trial_batches(requests: list, n_trials: int, per_trial: int, batch: int) -> list[list[list]]:
    """Per trial, its examples' requests cut into calls of ``batch`` examples (2 requests each)."""
    per_ex = 2  # SST-2: one request per label
    out = []
    for t in range(n_trials):
        mine = requests[t * per_trial * per_ex : (t + 1) * per_trial * per_ex]
        out.append([mine[i : i + batch * per_ex] for i in range(0, len(mine), batch * per_ex)])
    return out


def score_all(actors: list, work: list) -> tuple[np.ndarray, float]:
    """Start every trial's scoring at once; ``(log-likelihoods in request order, seconds)``."""
    start = time.perf_counter()
    outs = ray.get([a.run.remote(w) for a, w in zip(actors, work)])
    return np.concatenate(outs), time.perf_counter() - start


def measured(sample_s: float, start_actors) -> dict:
    """Run ``start_actors() -> (actors to kill, trial actors, their work)`` under the sampler.

    Returns peak RSS (total and per worker class), PSS at the end, scoring and total
    seconds, the log-likelihoods, and the load average after the run.
    """
    with PeakRSS(sample_s) as mem:
        start = time.perf_counter()
        owned, trials, work = start_actors()
        ray.get([t.pid.remote() for t in trials])  # every process started, every model loaded
        scores, score_s = score_all(trials, work)
        total_s = time.perf_counter() - start
        pss = pss_total(mem.pids)
    for actor in owned:
        ray.kill(actor)
    wait_gone(mem.pids)
    return {"peak": mem.peak, "by_class": mem.by_class, "anon": mem.anon_peak, "pss": pss, "score_s": score_s, "total_s": total_s,
            "scores": scores, "procs": len(mem.pids), "load": os.getloadavg()[0]}


def run_shared(work: list, backend: dict, imports: tuple, sample_s: float, namespace: str) -> dict:
    """One LM actor (1 CPU) and ``len(work)`` trial actors (sharing 1 CPU) that score through it."""

    def start():
        handles = start_pool(PoolSpec("scorer", backend, num_cpus=1.0, max_restarts=0), namespace)
        # Actors load lazily; load now so that, as for the own-model trials, the scoring clock
        # starts with every model in memory.
        ray.get([h.load.remote() for h in handles])
        trials = [SharedTrial.options(num_cpus=1.0 / len(work)).remote(handles, imports) for _ in work]
        return [*handles, *trials], trials, work

    return measured(sample_s, start)


def run_own(work: list, backend: dict, imports: tuple, sample_s: float, cpus: float) -> dict:
    """``len(work)`` actors, each loading its own model and scoring its own share."""

    def start():
        actors = [OwnModelTrial.options(num_cpus=cpus / len(work)).remote(backend, imports) for _ in work]
        return actors, actors, work

    return measured(sample_s, start)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4, help="concurrent trials")
    parser.add_argument("--n", type=int, default=40, help="SST-2 examples scored by each trial")
    parser.add_argument("--batch", type=int, default=8, help="examples per loglikelihood call")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs given to Ray")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per model; 0: a fair share")
    parser.add_argument("--bare-trials", action="store_true",
                        help="trial processes import only the LM client, not the sweep's trial module")
    parser.add_argument("--sample-s", type=float, default=0.2, help="memory sampling period")
    parser.add_argument("--temp-dir", default=os.path.join(tempfile.gettempdir(), "psw-bench"),
                        help="Ray's temp dir (short: its socket paths must stay under 107 bytes)")
    return parser.parse_args()


def mib(n: float) -> str:
    return f"{n / 2**20:7.0f} MiB"


def main() -> None:
    args = parse_args()
    task = sst2(str(args.data_dir), n_test=args.trials * args.n)
    examples = task.test
    requests = requests_for(task, TextPrompt(task.instruction), examples)
    work = trial_batches(requests, args.trials, args.n, args.batch)
    shared_threads = args.threads or args.cpus
    own_threads = args.threads or max(1, args.cpus // args.trials)
    # Workers import this repository's packages; they inherit the driver's environment.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    imports = () if args.bare_trials else TRIAL_MODULES
    namespace = f"psw-bench-{os.getpid()}"
    ray.init(num_cpus=args.cpus, _temp_dir=args.temp_dir, include_dashboard=False, namespace=namespace,
             log_to_driver=False)
    print(f"{args.trials} trials x {args.n} examples ({len(requests)} requests, {args.batch} examples per call); "
          f"model {args.model}; {args.cpus} Ray CPUs; torch threads: shared model {shared_threads}, "
          f"own models {own_threads} each; trials import {list(imports) or 'the LM client only'}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs", flush=True)
    try:
        shared_conf, own_conf = backend_conf(args.model, shared_threads), backend_conf(args.model, own_threads)
        one = run_shared(work[:1], shared_conf, imports, args.sample_s, namespace + "-one")
        shared = run_shared(work, shared_conf, imports, args.sample_s, namespace + "-a")
        own = run_own(work, own_conf, imports, args.sample_s, args.cpus)
        floor = baselines(imports)
    finally:
        ray.shutdown()
    report(args, examples, task, one, shared, own, floor)


def report_floor(args, one: dict, floor: list[tuple[str, int, int]]) -> None:
    """What A / one trial would be if each trial process weighed only a baseline process."""
    lm = one["by_class"].get("LMActor", 0)
    for what, rss, pss in floor:
        ratio = (lm + args.trials * rss) / (lm + rss)
        print(f"one process with {what}: RSS {mib(rss)}, PSS {mib(pss)}; "
              f"{args.trials} trials of that weight: A / one trial {ratio:.2f}x")


def report(args, examples, task, one: dict, shared: dict, own: dict, floor: list) -> None:
    n_all = len(examples)
    for name, r, n in (("one trial", one, args.n), ("A shared", shared, n_all), ("B own model", own, n_all)):
        print(f"{name:12s} peak RSS {mib(r['peak'])} (anonymous {mib(r['anon'])}, PSS at end {mib(r['pss'])}; "
              f"{r['procs']} processes)  "
              f"{n / r['score_s']:6.2f} examples/s scoring, {n / r['total_s']:6.2f} examples/s with start-up  "
              f"({r['score_s']:.1f} s scoring, {r['total_s']:.1f} s in all; load average after {r['load']:.2f})")
        parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in sorted(r["by_class"].items()))
        print(f"{'':12s}   at the peak, MiB: {parts}")
    same = bool((predictions(task, examples, shared["scores"]) == predictions(task, examples, own["scores"])).all())
    diff = float(np.abs(shared["scores"] - own["scores"]).max())
    print(f"A and B: same predictions {same}, max |loglik difference| {diff:.1e}")
    print(f"throughput A / B: scoring {own['score_s'] / shared['score_s']:.2f}x, "
          f"with start-up {own['total_s'] / shared['total_s']:.2f}x")
    print(f"peak RSS B / A: {own['peak'] / shared['peak']:.2f}x  "
          f"(anonymous {own['anon'] / shared['anon']:.2f}x, PSS {own['pss'] / shared['pss']:.2f}x)")
    report_floor(args, one, floor)
    if not same:
        raise SystemExit("shared and own-model scoring disagree on some prediction")
    print(f"peak RSS A / one trial: {shared['peak'] / one['peak']:.2f}x  "
          f"(anonymous {shared['anon'] / one['anon']:.2f}x, PSS {shared['pss'] / one['pss']:.2f}x; target <= 1.3x)")


if __name__ == "__main__":
    main()
