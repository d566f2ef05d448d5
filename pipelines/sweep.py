"""Ray side of a sweep: start or join Ray, start the LM pools once, run Tune, collect results."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray
from ray import tune

from pipelines.lm.budget import trial_settings
from pipelines.lm.cache import cache_path, model_key
from pipelines.lm.pool import ModelStartError, PoolSpec, start_pool
from pipelines.plan import UserError, redact
from pipelines.results import merge_evaluations, trial_results, write_json
from pipelines.summary import print_table
from pipelines.trial import TrialContext, run_trial


def start_ray(cfg: dict) -> str:
    """Join the cluster at ``ray.address`` or start a local Ray; returns the run's namespace."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    namespace = cfg["ray"]["namespace"] or f"psw-{uuid.uuid4().hex[:8]}"
    address = cfg["ray"]["address"]
    try:
        if address:
            ray.init(address=address, namespace=namespace, log_to_driver=True)
        else:
            ray.init(namespace=namespace, _temp_dir=cfg["ray"]["temp_dir"], include_dashboard=False,
                     num_cpus=os.cpu_count(), log_to_driver=True)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot reach the Ray cluster at {address!r}: {err}") from err
    return namespace


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


def scheduler(name: str):
    if name == "fifo":
        return None
    if name == "asha":
        return tune.schedulers.ASHAScheduler(time_attr="step", grace_period=2, reduction_factor=2)
    if name == "pbt":
        return tune.schedulers.PopulationBasedTraining(time_attr="step", perturbation_interval=2)
    raise UserError(f"unknown search.scheduler {name!r}; expected fifo, asha or pbt")


def run(cfg: dict, specs: list[dict], space: dict, run_dir: Path, choices: dict) -> list[dict]:
    """Run (or resume) the sweep; returns one row per trial, failures included."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", redact(cfg))
    namespace = start_ray(cfg)
    try:
        pools = pool_specs(cfg)
        # Held for the whole sweep: an actor whose last handle is dropped is killed.
        try:
            handles = [start_pool(p, namespace) for p in pools]  # noqa: F841
        except ModelStartError as err:
            raise UserError(str(err)) from err
        ctx = TrialContext(
            run_dir=str(run_dir), namespace=namespace, scorer=_serving(pools[0]), proposer=_serving(pools[1]),
            models={"scorer": cfg["lm"]["scorer"].get("model", ""), "proposer": cfg["lm"]["proposer"].get("model", "")},
            max_steps=int(cfg["search"]["max_steps"]),
            cache_path=cache_path(cfg.get("cache")), model_keys={r: model_key(cfg["lm"][r]) for r in cfg["lm"]},
            **trial_settings(cfg),
        )
        grid = _fit(cfg, specs, space, run_dir, ctx)
        return _rows(run_dir, grid)
    finally:
        ray.shutdown()


def _trainable(cfg: dict, ctx: TrialContext):
    fn = tune.with_parameters(run_trial, ctx=ctx)
    return tune.with_resources(fn, {"cpu": float(cfg["resources"]["trial_cpus"])})


def _fit(cfg: dict, specs: list[dict], space: dict, run_dir: Path, ctx: TrialContext):
    search = cfg["search"]
    trainable = _trainable(cfg, ctx)
    tune_dir = run_dir / "tune"
    if cfg.get("resume") and tune.Tuner.can_restore(str(tune_dir)):
        tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_unfinished=True, resume_errored=True)
        return tuner.fit()
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(specs), "sample": space},
        tune_config=tune.TuneConfig(
            num_samples=int(search["num_samples"]), metric="dev_score", mode="max",
            max_concurrent_trials=int(cfg["resources"]["max_concurrent_trials"]),
            scheduler=scheduler(search["scheduler"]),
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            # Tune's own tables print every trial's whole config; trials print one line per step instead.
            name="tune", storage_path=str(run_dir), verbose=0,
            failure_config=tune.FailureConfig(max_failures=int(search["max_failures"])),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        ),
    )
    return tuner.fit()


def _trial_name(trial) -> str:
    spec = trial.config.get("trial", {})
    return f"{spec.get('method_name', 'trial')}_s{spec.get('seed', 0)}_{trial.trial_id}"


def _rows(run_dir: Path, grid) -> list[dict]:
    """Finished trials from their result files, plus one row per failed trial with its error."""
    rows = [{**r, "status": "ok"} for r in trial_results(run_dir)]
    done = {r["trial"] for r in rows}
    for result in grid:
        trial_id = result.path.rstrip("/").split("/")[-1] if result.path else "?"
        spec = result.config.get("trial", {}) if result.config else {}
        if result.error is not None and not any(t in trial_id for t in done):
            rows.append({
                "trial": trial_id, "method": spec.get("method_name", "?"), "task": spec.get("task_name", "?"),
                "seed": spec.get("seed", "?"), "status": "failed", "error": _one_line(result.error),
            })
    return rows


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[-1] if text else ''}"[:300]


def finish(cfg: dict, rows: list[dict], run_dir: Path, wall_s: float) -> None:
    """Summary file, merged evaluation log, W&B tables, and the table on stdout."""
    n_records = merge_evaluations(run_dir)
    write_json(run_dir / "summary.json", {"trials": rows, "wall_s": wall_s, "evaluations": n_records})
    from pipelines.report import write_report

    report = write_report(run_dir)
    if cfg["logger"]["enabled"]:
        from pipelines.wandb_log import log_run

        log_run(redact(cfg), rows, run_dir)
    print_table(rows, run_dir, wall_s)
    print(f"report: {report}", flush=True)
