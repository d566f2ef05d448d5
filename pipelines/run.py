"""Entry point: ``python -m pipelines.run [overrides]`` runs one sweep through Ray Tune.

The driver validates everything it can before spending compute (task data, method
arguments), starts the shared LM actor pools once, fans the trials out with Tune, and ends
by writing ``summary.json``, merging the evaluation logs, logging to W&B and printing the
comparison table. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipelines.plan import (
    UserError, check_arguments, check_group_choices, expand_model_shorthand, sample_space, trial_specs,
)

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

    # A cluster that is not there fails now, not after the data and methods are built.
    sweep.check_address(OmegaConf.to_container(cfg.ray, resolve=True))
    check_numbers(cfg)
    if cfg.resume:
        return resume(cfg)
    choices = dict(HydraConfig.get().runtime.choices)
    run_dir = Path(cfg.resume or HydraConfig.get().runtime.output_dir).resolve()
    specs = trial_specs(cfg, search_dirs(), choices)
    space = sample_space(OmegaConf.to_container(cfg.search.params, resolve=True))
    for role in ("scorer", "proposer"):
        model = OmegaConf.to_container(cfg.lm[role], resolve=True)
        check_arguments(model.pop("_target_"), model)
        check_model_dir(role, model)
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


def check_model_dir(role: str, model: dict) -> None:
    """A model given as a local path must be a readable model directory; checked before Ray starts.

    Also refuses a model that ships its own Python code (``auto_map`` in its config) unless
    ``trust_remote_code`` is on: transformers would refuse too, but only inside the LM actor.
    """
    name = model.get("model")
    if not isinstance(name, str) or not name.startswith(("/", "./", "../", "~")):
        return  # the packaged default, a hub id, or an API model name
    path = Path(name).expanduser()
    if not path.is_dir() or not os.access(path, os.R_OK | os.X_OK):
        raise UserError(f"lm.{role}.model: {name!r} is not a readable directory")
    try:
        meta = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"lm.{role}.model: {name!r} has no readable config.json ({type(err).__name__})") from err
    if isinstance(meta, dict) and meta.get("auto_map") and not model.get("trust_remote_code"):
        raise UserError(f"lm.{role}.model: {name!r} runs its own code (auto_map); set lm.{role}.trust_remote_code=true "
                        "only if you trust it")


# Smallest allowed value of each count or resource (max_failures=-1: retry without limit, as in Tune).
NUMBERS = {"search.max_steps": 0, "search.num_samples": 0, "search.max_failures": -1,
           "resources.replicas": 0, "resources.lm_cpus": 0, "resources.lm_gpus": 0,
           "resources.trial_cpus": 0, "resources.max_concurrent_trials": 0}


def check_numbers(cfg: DictConfig) -> None:
    """Counts and resources must be numbers in range (``search.max_steps=abc`` fails here, in one line)."""
    for key, least in NUMBERS.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < least:
            raise UserError(f"{key}={value!r}: expected a number >= {least}")
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in cfg.search.seeds):
        raise UserError(f"search.seeds={list(cfg.search.seeds)}: expected a list of integers")


def resume(cfg: DictConfig) -> int:
    """Finish a stopped sweep in its own run directory, with the config it was started with.

    Finished trials are kept as they are; unfinished (and failed) ones continue from their
    last checkpoint. Only ``ray.*`` is taken from this command line: the cluster may differ,
    the sweep may not.
    """
    from pipelines import sweep

    run_dir = Path(cfg.resume).expanduser().resolve()
    ray_cfg = OmegaConf.to_container(cfg.ray, resolve=True)
    plain = {**sweep.saved_config(run_dir), "ray": ray_cfg, "resume": str(run_dir)}
    done = len(list((run_dir / "trials").glob("*.json")))
    print(f"[promptsweep] resuming {run_dir} ({done} trial(s) already finished)", flush=True)
    start = time.perf_counter()
    rows = sweep.run(plain, [], {}, run_dir, {})
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
        drop_unused_run_dir()
        if getattr(err, "abandon", False):
            os._exit(2)
        sys.exit(getattr(err, "exit_status", 2))
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    if cfg.resume:
        drop_unused_run_dir()  # the resumed run wrote into its own directory, not Hydra's new one
    if status:
        sys.exit(status)
    return status


def check_overrides(argv: list[str]) -> None:
    """Compose the config once up front so a bad override is one line, not Hydra's page.

    Catches syntax errors (``seeds=[0,``) and unknown keys (``seed=1`` for ``search.seeds``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if not a.startswith("-")]
    for arg in overrides:
        try:
            OverridesParser.create().parse_override(arg)
        except HydraException as err:
            raise UserError(f"bad override {arg!r}: {str(err).strip().splitlines()[0]}") from err
    try:
        with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
            compose("config", overrides=overrides, return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise UserError("bad override: " + " ".join(lines[:2])) from err


if __name__ == "__main__":
    sys.argv[1:] = expand_model_shorthand(sys.argv[1:])
    try:
        check_group_choices(sys.argv[1:], REPO_CONF)
        check_overrides(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
