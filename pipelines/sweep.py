"""Ray side of a sweep: start or join Ray, start the LM pools once, run Tune, collect results."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import ray
from ray import tune

from methods.lm import GENERATE, Request
from pipelines.lm.budget import Budget, trial_settings
from pipelines.lm.cache import cache_path, model_key, shared_mode, trial_cache_path
from pipelines.lm.shared_cache import CACHE_ACTOR, start_cache_actors, use_actor
from pipelines.lm.pool import ModelStartError, PoolSpec, start_pool
from pipelines.lm.stack import role_lm
from pipelines.progress import SweepProgress
from pipelines.plan import (
    CONNECT_TIMEOUT_S, ROLES, SECRET_KEY, Plan, UserError, check_address, first_line, redact, task_key,
)
from pipelines.results import merge_evaluations, trial_results, write_json
from pipelines.summary import print_table
from pipelines.trial import TrialContext, apply_samples, run_trial
from tasks.generative import is_generative

ACTOR_STATS = "lm_actors.json"  # what each LM actor did; folded into summary.json
OVERHEAD = "overhead.json"  # the driver's and the cache actor's share; folded into summary.json
LOG_DRAIN_S = 2.0  # how long the driver waits for trials' last lines before shutting Ray down


def start_ray(cfg: dict) -> str:
    """Join the cluster at ``ray.address`` (or ``$RAY_ADDRESS``, as ``ray job submit`` sets it),
    else start a local Ray; returns the run's namespace."""
    # Ray's log deduplication treats lines that differ only in numbers as repeats: every trial's
    # "step N: dev_score=..." line is one, so all but the first were held back and printed, collapsed
    # to the last, only after a window a short sweep could end within. Each step line is a record.
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Tune's newer console output prints an experiment banner and TensorBoard hints even at
    # verbose=0; the legacy reporter at verbose=0 prints nothing. Trials print their own lines.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Every step checkpoints, by design (resume loses at most the step in flight); Tune warns
    # about frequent experiment snapshots on short steps, which is not the user's to fix.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    namespace = cfg["ray"]["namespace"] or f"psw-{uuid.uuid4().hex[:8]}"
    address = check_address(cfg["ray"])
    if address:
        _connect(address, namespace, float(cfg["ray"].get("connect_timeout_s") or CONNECT_TIMEOUT_S))
        return namespace
    # A new local Ray enables token auth and warns that it did on every start: not our user's problem.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        ray.init(namespace=namespace, _temp_dir=cfg["ray"]["temp_dir"], include_dashboard=False,
                 num_cpus=local_cpus(cfg), log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot start a local Ray: {first_line(err)}") from err
    return namespace


def local_cpus(cfg: dict) -> int:
    """Logical CPUs of a local Ray: the machine's, or enough for the LM actors and one trial.

    Ray's CPUs are scheduling tokens, not cores: a scorer and a separate proposer reserving one
    each took both of a 2-core machine's, and the trial waited for a CPU forever. The actors and
    trials share the cores anyway, so the local Ray counts enough tokens for all of them.
    """
    res = cfg.get("resources") or {}
    if "lm" not in cfg or "replicas" not in res:
        return os.cpu_count() or 1
    actors = sum(p.replicas * p.num_cpus for p in pool_specs(cfg) if not p.shared_with)
    return max(os.cpu_count() or 1, math.ceil(actors + float(res.get("trial_cpus", 0))))


class _QuietThreadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _connect(address: str, namespace: str, timeout_s: float) -> None:
    """``ray.init(address)`` with a deadline.

    Something that accepts TCP but never answers as a Ray head (another service on the port,
    a cluster demanding an auth token we lack) makes ``ray.init`` wait forever, so it runs in
    a daemon thread that the driver abandons after ``timeout_s``.
    """
    outcome: dict = {}

    def init() -> None:
        try:
            ray.init(address=address, namespace=namespace, log_to_driver=True, logging_level=logging.WARNING)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            outcome["error"] = err

    # ray.init installs this handler only from the main thread; keep its behaviour.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))
    quiet = _QuietThreadWarning()
    logging.getLogger("ray._private.worker").addFilter(quiet)
    thread = threading.Thread(target=init, name="ray-connect", daemon=True)
    thread.start()
    thread.join(timeout_s)
    logging.getLogger("ray._private.worker").removeFilter(quiet)
    if thread.is_alive():
        err = UserError(f"cannot reach the Ray cluster at {address!r}: no answer within {timeout_s:.0f}s "
                        "(is it a Ray head, and is its auth token in ~/.ray/auth_token or $RAY_AUTH_TOKEN?)")
        err.abandon = True  # the stuck connect thread logs until the process ends: end it at once
        raise err
    if "error" in outcome:
        err = outcome["error"]
        raise UserError(f"cannot reach the Ray cluster at {address!r}: {first_line(err)}") from err


def pool_specs(cfg: dict) -> list[PoolSpec]:
    """Scorer and proposer pools; the proposer shares the scorer's actors when the model is the same."""
    res = cfg["resources"]
    scorer, proposer = cfg["lm"]["scorer"], cfg["lm"]["proposer"]
    threads = {"threads": res["threads"]} if res.get("threads") else {}
    common = dict(replicas=res["replicas"], num_cpus=res["lm_cpus"], num_gpus=res["lm_gpus"])
    specs = [PoolSpec("scorer", {**scorer, **threads}, **common)]
    if proposer == scorer:
        specs.append(PoolSpec("proposer", proposer, shared_with="scorer", **common))
    else:
        specs.append(PoolSpec("proposer", {**proposer, **threads}, **{**common, "replicas": 1}))
    return specs


def _serving(spec: PoolSpec) -> tuple[str, int]:
    return (spec.shared_with or spec.role, spec.replicas)


def scheduler(name: str, space: dict | None = None, interval: int = 2):
    """Tune's scheduler by name. PBT perturbs the sampled method arguments (``search.params``) every
    ``interval`` steps and exploits by migration: a weak island takes a strong one's population."""
    if name == "fifo":
        return None
    if name == "asha":
        return tune.schedulers.ASHAScheduler(time_attr="step", grace_period=2, reduction_factor=2)
    if name == "pbt":
        return tune.schedulers.PopulationBasedTraining(
            time_attr="step", perturbation_interval=interval, hyperparam_mutations={"sample": space or {}},
            quantile_fraction=0.25, resample_probability=0.25, synch=False)
    raise UserError(f"unknown search.scheduler {name!r}; expected fifo, asha or pbt")


def run(plan: Plan, run_dir: Path) -> list[dict]:
    """Run (or resume) the planned sweep; returns one row per trial, failures included."""
    cfg = plan.cfg
    run_dir.mkdir(parents=True, exist_ok=True)
    # Fixed before the first trial and saved with the config: a resumed sweep's runs join the same group.
    cfg["logger"]["group"] = cfg["logger"].get("group") or sweep_group(run_dir)
    write_json(run_dir / "config.json", redact(cfg))
    namespace = start_ray(cfg)
    try:
        if service(cfg) and not (cfg["ray"].get("address") or os.environ.get("RAY_ADDRESS")):
            print(f"[promptsweep] warning: lm.service={service(cfg)!r} on a Ray started for this sweep ends with it; "
                  "start a cluster (ray start --head) and pass ray.address=auto to keep it for later sweeps", flush=True)
        pools = pool_specs(cfg)
        # Held for the whole sweep: an actor whose last handle is dropped is killed.
        try:
            handles = [start_pool(p, namespace, service=service(cfg)) for p in pools]
        except ModelStartError as err:
            raise UserError(str(err)) from err
        cache_actor, _cache_handles = _cache_actors(cfg, namespace)
        lms = {pool.role: _driver_lm(cfg, plan, pool.role, h) for pool, h in zip(pools, handles) if h}
        check_context(plan, lms["scorer"])
        if "proposer" in lms and GENERATE in plan.capabilities["proposer"]:
            check_proposer(lms["proposer"])
        ctx = TrialContext(
            run_dir=str(run_dir), namespace=namespace, scorer=_serving(pools[0]), proposer=_serving(pools[1]),
            models={"scorer": cfg["lm"]["scorer"].get("model", ""), "proposer": cfg["lm"]["proposer"].get("model", "")},
            max_steps=int(cfg["search"]["max_steps"]),
            cache_path=trial_cache_path(cfg.get("cache")), cache_actor=cache_actor, cache_actors=len(_cache_handles),
            service=service(cfg),
            islands=cfg["search"]["scheduler"] == "pbt",
            model_keys={r: model_key(cfg["lm"][r]) for r in ROLES},
            capabilities=plan.capabilities, logger=cfg["logger"], **trial_settings(cfg),
        )
        fit_start, driver_cpu = time.perf_counter(), time.process_time()
        grid = _fit(cfg, plan.specs, plan.space, run_dir, ctx)
        _save_actor_stats(run_dir, pools, handles)
        _save_overhead(run_dir, time.perf_counter() - fit_start, time.process_time() - driver_cpu, _cache_handles)
        _check_finished(run_dir)
        return _rows(run_dir, grid)
    finally:
        # Trials' lines reach this console through Ray's log monitor, which tails their files a
        # little behind them: shutting down at once dropped the last lines of trials that ended
        # within the final second (a short sweep lost whole trials' step and done lines).
        time.sleep(LOG_DRAIN_S)
        ray.shutdown()


def service(cfg: dict) -> str:
    """The standing model service the sweep's pools belong to (``lm.service``), or ``""``."""
    return str((cfg.get("lm") or {}).get("service") or "")


def _cache_actors(cfg: dict, namespace: str) -> tuple[str, list]:
    """Start the cluster's cache actors when the cache is to be shared that way: ``(the first's name,
    their handles)`` (held for the sweep: an actor whose last handle is dropped is killed), or ``("", [])``."""
    path = cache_path(cfg.get("cache"))
    try:
        mode = shared_mode(cfg.get("cache"))  # checked by the plan too; a resumed run's saved config is not
    except ValueError as err:
        raise UserError(str(err)) from err
    if not path or not use_actor(mode):
        return "", []
    count = int(cfg["cache"].get("actors", 1))
    handles = start_cache_actors(path, namespace, count)
    who = "one actor" if count == 1 else f"{count} actors"
    print(f"[promptsweep] evaluation cache: served to every node by {who} on this node ({path})", flush=True)
    return CACHE_ACTOR, handles


def sweep_group(run_dir: Path) -> str:
    """The W&B group of a sweep's runs: its run directory's last two parts (``outputs/DATE/TIME``)."""
    return f"{run_dir.parent.name}-{run_dir.name}"


def _driver_lm(cfg: dict, plan: Plan, role: str, handles: list):
    """A role's LM as the driver uses it: behind the evaluation cache, like a trial's, with no budget."""
    stack = role_lm(handles, plan.capabilities[role], cache_path=cache_path(cfg.get("cache")),
                    model_key=model_key(cfg["lm"][role]), role=role)
    return stack.unbudgeted


def _model_error(err: ray.exceptions.RayTaskError, what: str) -> UserError:
    """One line for a failed check: the load error as it is, anything else prefixed with ``what``."""
    from pipelines.lm.actor import ModelLoadFailed

    cause = getattr(err, "cause", None) or err
    return UserError(first_line(cause) if isinstance(cause, ModelLoadFailed) else f"{what}: {first_line(cause)}")


def check_context(plan: Plan, scorer) -> None:
    """Score each task's longest example once, with the hand-written instruction.

    Data longer than the model's context window then fails here, in one line, instead of in
    every trial; the backend refuses such requests (see ``HFBackend._check_length``). The
    check goes through the evaluation cache: a request found there was scored before, so it
    fits, and a re-run answered from the cache loads no model for it. Otherwise this is the
    scorer's first request: a model that cannot load fails here, in one line, too. The
    tasks are the plan's, built once.
    """
    names = {task_key(s): s["task_name"] for s in plan.specs}
    for key, task in plan.tasks.items():
        examples = task.train + task.dev + task.test
        if not examples:
            continue
        longest = max(examples, key=lambda ex: len(task.render(task.instruction, ex)))
        context = task.render(task.instruction, longest)
        try:
            if is_generative(task):  # the backend counts the answer's max_new_tokens against the window
                scorer.generate([context], max_new_tokens=task.max_new_tokens, temperature=0.0, stop=task.stop)
            else:
                scorer.loglikelihood([Request(context, max(task.choices(longest), key=len))])
        except ray.exceptions.RayTaskError as err:
            raise _model_error(err, f"task {names.get(key, '?')}") from err


def check_proposer(proposer) -> None:
    """One greedy token from a proposer that is a model of its own, through the cache.

    Its first request, so a proposer that cannot load fails here in one line rather than in
    every trial that asks it for prompts; a re-run finds the answer cached and loads nothing.
    """
    try:
        proposer.generate(["Hello"], max_new_tokens=1, temperature=0.0)
    except ray.exceptions.RayTaskError as err:
        raise _model_error(err, "proposer") from err


def _save_actor_stats(run_dir: Path, pools: list[PoolSpec], handles: list[list]) -> None:
    """What each LM actor did (calls, batches, model loads), for ``summary.json``.

    A re-run answered wholly from the cache shows ``loaded: false`` for every actor.
    """
    stats = {}
    for spec, pool in zip(pools, handles):
        if spec.shared_with:
            continue
        try:
            stats[spec.role] = ray.get([h.stats.remote() for h in pool], timeout=30)
        except (ray.exceptions.RayError, TimeoutError):  # a dead actor must not fail a finished sweep
            stats[spec.role] = []
    write_json(run_dir / ACTOR_STATS, stats)


def _save_overhead(run_dir: Path, fit_s: float, driver_cpu_s: float, cache_handles: list) -> None:
    """What orchestrating the trials cost the driver (Tune's loop, its callbacks, checkpoints it
    registers) and what the cluster's cache actors did, summed, for ``summary.json`` (``bench/scaling.py``)."""
    cache: dict = {}
    try:
        stats = ray.get([h.stats.remote() for h in cache_handles], timeout=30)
    except (ray.exceptions.RayError, TimeoutError):
        stats = []
    for one in stats:
        for key, value in one.items():
            summed = isinstance(value, (int, float)) and key != "stored"  # every actor counts the same file
            cache[key] = cache.get(key, 0) + value if summed else value
    if stats:
        cache["actors"] = len(stats)
    write_json(run_dir / OVERHEAD, {"fit_s": fit_s, "driver_cpu_s": driver_cpu_s, "cache_actor": cache})


def _trainable(cfg: dict, ctx: TrialContext):
    fn = tune.with_parameters(run_trial, ctx=ctx)
    # Optional custom resources pin trials to some nodes (e.g. CPU workers, keeping GPU nodes for the LM).
    extra = {k: float(v) for k, v in (cfg["resources"].get("trial_resources") or {}).items()}
    return tune.with_resources(fn, {"cpu": float(cfg["resources"]["trial_cpus"]), **extra})


def progress_view(cfg: dict, ctx: TrialContext) -> SweepProgress:
    progress = cfg.get("progress") or {}
    return SweepProgress(Budget.parse(ctx.budget).scorer.examples, ctx.max_steps,
                         mode=progress.get("mode", "auto"), interval_s=progress.get("interval_s", 30))


def _fit(cfg: dict, specs: list[dict], space: dict, run_dir: Path, ctx: TrialContext):
    search = cfg["search"]
    trainable = _trainable(cfg, ctx)
    tune_dir = run_dir / "tune"
    if cfg.get("resume"):
        # Same trial ids, so each trial finds its checkpoint and its own evaluation log again.
        # The progress view comes back with the run config Tune saved (it keeps only its settings).
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(specs), "sample": space, **_islands(search)},
        tune_config=tune.TuneConfig(
            num_samples=int(search["num_samples"]), metric="dev_score", mode="max",
            max_concurrent_trials=int(cfg["resources"]["max_concurrent_trials"]),
            reuse_actors=bool(search.get("reuse_actors", False)),
            scheduler=scheduler(search["scheduler"], space, int(search.get("pbt_interval", 2))),
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            # Tune's own tables print every trial's whole config; trials print one line per step instead.
            name="tune", storage_path=str(run_dir), verbose=0, callbacks=[progress_view(cfg, ctx)],
            failure_config=tune.FailureConfig(max_failures=int(search["max_failures"])),
            # PBT clones an island's checkpoint some steps after it was taken: keep them all (small pickles)
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if search["scheduler"] == "pbt" else 2),
        ),
    )
    return tuner.fit()


def _islands(search: dict) -> dict:
    """One trial per island of each (method, task, seed): ``island`` seeds each one's own start."""
    n = int(search.get("islands", 1))
    return {"island": tune.grid_search(list(range(n)))} if n > 1 else {}


class Interrupted(UserError):
    """The sweep stopped (Ctrl+C / SIGINT) with trials unfinished; their state is saved."""

    exit_status = 130


def _check_finished(run_dir: Path) -> None:
    """Raise :class:`Interrupted` when Tune returned early: a partial summary would mislead.

    After Ctrl+C, Tune stops the running trials and reports them as terminated; only the
    experiment state it saved just before (what ``Tuner.restore`` reads) still shows them
    unfinished, so that is what is checked.
    """
    saved = tune.ExperimentAnalysis(str(run_dir / "tune")).trials
    unfinished = [t for t in saved if t.status not in ("TERMINATED", "ERROR")]
    if unfinished:
        raise Interrupted(f"interrupted with {len(unfinished)} of {len(saved)} trial(s) unfinished; "
                          f"continue with: python -m pipelines.run resume={run_dir}")


def saved_config(run_dir: Path) -> dict:
    """The config a run directory was started with, checked to be resumable."""
    saved = run_dir / "config.json"
    if not saved.is_file() or not tune.Tuner.can_restore(str(run_dir / "tune")):
        raise UserError(f"nothing to resume in {run_dir}: no config.json and Tune state (tune/) from a started sweep")
    cfg = json.loads(saved.read_text())
    if _redacted(cfg):
        raise UserError(f"cannot resume {run_dir}: its config.json holds redacted secrets; "
                        "pass keys through the environment")
    return cfg


def _redacted(obj) -> bool:
    """True when ``redact`` replaced a value somewhere in ``obj`` (the saved config lacks it)."""
    if isinstance(obj, dict):
        return any((v == "***" and SECRET_KEY.search(str(k))) or _redacted(v) for k, v in obj.items())
    return isinstance(obj, list) and any(_redacted(v) for v in obj)


def _trial_name(trial) -> str:
    spec = trial.config.get("trial", {})
    return f"{spec.get('method_name', 'trial')}_s{spec.get('seed', 0)}_{trial.trial_id}"


def _rows(run_dir: Path, grid) -> list[dict]:
    """Finished trials from their result files, plus one row per failed trial (with its error)
    and per trial the scheduler stopped early (ASHA, PBT: with its last dev score, no test score)."""
    rows = [{**r, "status": "ok"} for r in trial_results(run_dir)]
    done = {r["trial"] for r in rows}
    for result in grid:
        trial_id = result.path.rstrip("/").split("/")[-1] if result.path else "?"
        if any(t in trial_id for t in done):
            continue
        config = result.config or {}
        spec = config.get("trial", {})
        row = {"trial": trial_id, "method": spec.get("method_name", "?"), "task": spec.get("task_name", "?"),
               "seed": spec.get("seed", "?")}
        if result.error is not None:
            rows.append({**row, "status": "failed", "error": _one_line(result.error)})
        else:
            metrics = result.metrics or {}
            sampled = apply_samples(spec, config.get("sample", {}))["sampled"] if spec else {}
            rows.append({**row, "status": "stopped", "params": sampled, "steps": metrics.get("step"),
                         "dev_score": metrics.get("dev_score"), "scorer_calls": metrics.get("scorer_calls")})
    return rows


def _one_line(err: BaseException) -> str:
    err = getattr(err, "cause", None) or err  # a RayTaskError carries the trial's own exception
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


def finish(cfg: dict, rows: list[dict], run_dir: Path, wall_s: float, warnings: tuple[str, ...] = ()) -> None:
    """Summary file (with the plan's data warnings), merged evaluation log, W&B tables, and the table on stdout."""
    n_records = merge_evaluations(run_dir)
    failed = sum(r.get("status") == "failed" for r in rows)
    actors = run_dir / ACTOR_STATS
    lm = json.loads(actors.read_text()) if actors.is_file() else {}
    overhead = json.loads((run_dir / OVERHEAD).read_text()) if (run_dir / OVERHEAD).is_file() else {}
    write_json(run_dir / "summary.json", {"trials": rows, "failed": failed, "wall_s": wall_s, "evaluations": n_records,
                                          "lm_actors": lm, "overhead": overhead, "warnings": list(warnings)})
    from pipelines.report import write_report

    report = write_report(run_dir)
    if cfg["logger"]["enabled"]:
        from pipelines.wandb_log import log_run

        log_run(redact(cfg), rows, run_dir)
    print_table(rows, run_dir, wall_s)
    if failed:
        print(f"{failed} of {len(rows)} trial(s) FAILED; their errors are in summary.json", flush=True)
    print(f"report: {report}", flush=True)
