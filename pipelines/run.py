"""Entry point: ``python -m pipelines.run [overrides]`` runs one sweep through Ray Tune.

The driver checks everything it can before spending compute (one planning pass:
:func:`pipelines.plan.make_plan`), starts the shared LM actor pools once, fans the trials
out with Tune, and ends by writing ``summary.json``, merging the evaluation logs, logging to
W&B and printing the comparison table. Bad input exits with status 2 and one line on stderr.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pipelines.plan import (
    Plan, UserError, capabilities, check_address, check_group_choices, expand_model_shorthand, make_plan,
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


def main_impl(cfg: DictConfig) -> int:
    """Plan, run and summarize one sweep; returns the process exit status."""
    from pipelines import sweep

    if cfg.resume:
        return resume(cfg)
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    plan = make_plan(cfg, search_dirs(), dict(HydraConfig.get().runtime.choices), run_dir)
    print(*plan.lines, sep="\n", flush=True)
    start = time.perf_counter()
    rows = sweep.run(plan, run_dir)
    sweep.finish(plan.cfg, rows, run_dir, time.perf_counter() - start, plan.warnings)
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


def resume(cfg: DictConfig) -> int:
    """Finish a stopped sweep in its own run directory, with the config it was started with.

    Finished trials are kept as they are; unfinished (and failed) ones continue from their
    last checkpoint. Only ``ray.*`` is taken from this command line: the cluster may differ,
    the sweep may not.
    """
    from pipelines import sweep

    run_dir = Path(cfg.resume).expanduser().resolve()
    ray_cfg = OmegaConf.to_container(cfg.ray, resolve=True)
    check_address(ray_cfg)
    saved = sweep.saved_config(run_dir)
    check_resume_overrides(list(HydraConfig.get().overrides.task), OmegaConf.to_container(cfg, resolve=True), saved)
    plain = {**saved, "ray": ray_cfg, "resume": str(run_dir)}
    done = len(list((run_dir / "trials").glob("*.json")))
    print(f"[promptsweep] resuming {run_dir} ({done} trial(s) already finished)", flush=True)
    start = time.perf_counter()
    # The trials' specs are in Tune's saved state: the plan carries only what the pools need.
    rows = sweep.run(Plan(plain, [], {}, capabilities=capabilities(plain)), run_dir)
    sweep.finish(plain, rows, run_dir, time.perf_counter() - start)
    return 0 if rows and all(r.get("status") == "ok" for r in rows) else 1


# What a resume may change: where it runs, not what it runs.
RESUME_MAY_SET = ("resume=", "ray.", "hydra.")


def check_resume_overrides(overrides: list[str], current: dict, saved: dict) -> None:
    """A resume continues the sweep as it was started: an override that changes it is an error.

    Overrides that repeat the saved run's settings (the same command line with ``resume=`` added)
    are accepted; ``ray.*`` may differ (the cluster may).
    """
    for override in overrides:
        bare = override.lstrip("+~")
        if bare.startswith(RESUME_MAY_SET):
            continue
        key = bare.split("=", 1)[0]
        path = key.split("@", 1)[1] if "@" in key else key
        if path == "experiment":  # a whole study: every setting it touches counts
            mine, theirs = ({k: v for k, v in c.items() if k not in ("ray", "resume")} for c in (current, saved))
        else:
            mine, theirs = _at(current, path), _at(saved, path)
        if mine != theirs:
            raise UserError(f"resume continues the sweep as it was started, but {override} changes {path} from "
                            f"its saved config; drop it (only ray.* may differ), or start a new run")


def _at(config: dict, path: str):
    """The value at a dotted ``path`` of a plain config (``None`` where it is missing)."""
    for part in path.split("."):
        if not isinstance(config, dict) or part not in config:
            return None
        config = config[part]
    return config


HYDRA_ONLY = {".hydra", "run.log", "config.json"}


def drop_unused_run_dir() -> None:
    """Remove the run directory Hydra made if the run failed before writing any result.

    Its date folder (``outputs/DATE/TIME``) goes too when that leaves it empty, so a refused
    command leaves nothing behind; folders outside the working directory are never removed.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir).resolve()
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= HYDRA_ONLY:
        shutil.rmtree(run_dir, ignore_errors=True)
        here = Path.cwd().resolve()
        for parent in (run_dir.parent, run_dir.parent.parent):
            if parent == here or here not in parent.parents:
                break
            try:
                parent.rmdir()  # only when empty
            except OSError:
                break


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
