"""Entry point: ``python -m pipelines.run [overrides]`` runs one sweep through Ray Tune.

The driver validates everything it can before spending compute (task data, method
arguments), starts the shared LM actor pools once, fans the trials out with Tune, and ends
by writing ``summary.json``, merging the evaluation logs, logging to W&B and printing the
comparison table. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipelines.plan import UserError, check_arguments, check_group_choices, sample_space, trial_specs

REPO_CONF = Path(__file__).resolve().parents[1] / "conf"


def default_data_dir() -> str:
    """The ``shared/data`` folder beside the checkout (where the benchmark files live)."""
    return str(Path(__file__).resolve().parents[2] / "shared" / "data")


OmegaConf.register_new_resolver("promptsweep.default_data_dir", default_data_dir, replace=True)


def search_dirs() -> list[Path]:
    """Config directories Hydra composed from (the project's own plus any user search path)."""
    dirs = [Path(s.path.split("://", 1)[-1]) for s in HydraConfig.get().runtime.config_sources if s.provider != "schema"]
    return [d for d in dirs if d.is_dir()] or [REPO_CONF]


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause: Hydra wraps constructor errors in InstantiationException."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def validate(specs: list[dict]) -> None:
    """Build every distinct task and method once in the driver, so a typo fails before Ray starts."""
    from pipelines.trial import build

    for spec in {s["method_name"]: s for s in specs}.values():
        try:
            build(spec)
        except Exception as err:  # noqa: BLE001 - reported to the user as one line
            cause = root_cause(err)
            raise UserError(f"{spec['method_name']} on {spec['task_name']}: {cause}") from err


def main_impl(cfg: DictConfig) -> int:
    """Plan, validate, run and summarize one sweep; returns the process exit status."""
    from pipelines import sweep
    from pipelines.lm import budget, cache

    choices = dict(HydraConfig.get().runtime.choices)
    run_dir = Path(cfg.resume or HydraConfig.get().runtime.output_dir).resolve()
    specs = trial_specs(cfg, search_dirs(), choices)
    space = sample_space(OmegaConf.to_container(cfg.search.params, resolve=True))
    for role in ("scorer", "proposer"):
        model = OmegaConf.to_container(cfg.lm[role], resolve=True)
        check_arguments(model.pop("_target_"), model)
    validate(specs)
    sweep.scheduler(cfg.search.scheduler)
    plain = OmegaConf.to_container(cfg, resolve=True)
    n = len(specs) * int(cfg.search.num_samples)
    print(f"[promptsweep] {n} trial(s): methods={[s for s in cfg.search.methods]} task={specs[0]['task_name']} "
          f"seeds={list(cfg.search.seeds)} -> {run_dir}", flush=True)
    try:
        print(budget.projection(plain, n), cache.describe(plain.get("cache")), sep="\n", flush=True)
    except ValueError as err:
        raise UserError(str(err)) from err
    start = time.perf_counter()
    rows = sweep.run(plain, specs, space, run_dir, choices)
    sweep.finish(plain, rows, run_dir, time.perf_counter() - start)
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


HYDRA_ONLY = {".hydra", "run.log", "config.json"}


def drop_unused_run_dir() -> None:
    """Remove the run directory Hydra made if the run failed before writing any result."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> int:
    try:
        status = main_impl(cfg)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        if not cfg.resume:
            drop_unused_run_dir()
        sys.exit(2)
    if status:
        sys.exit(status)
    return status


if __name__ == "__main__":
    try:
        check_group_choices(sys.argv[1:], REPO_CONF)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
