"""The planning pass: every check that needs no model, in one place, before Ray starts.

:func:`make_plan` turns the composed config into plain trial specs and a Tune search space,
and refuses bad input on the way with one :class:`UserError` line: numbers, group choices,
constructor arguments, model directories, the task data, every method built once, each
method's needs against what the configured backends declare, the scheduler, the budget and
the evaluation cache. Everything a trial needs travels as plain data (dicts of ``_target_``
plus arguments), so trials are picklable, resumable and independent of Hydra at run time.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra.utils
from omegaconf import DictConfig, OmegaConf

from pipelines.lm import budget, cache
from pipelines.lm.stack import backend_capabilities
from methods.lm import GENERATE
from tasks.core import Task, TaskError, data_warnings
from tasks.generative import is_generative

ROLES = ("scorer", "proposer")
SCHEDULERS = ("fifo", "asha", "pbt")

# Keys whose values are credentials; "max_batch_tokens" or "api_key_env" (a variable's name) are not.
SECRET_KEY = re.compile(r"(^|_)(api_?key|access_?token|auth_?token|token|secret|password|authorization)$", re.IGNORECASE)


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


@dataclass(frozen=True)
class Plan:
    """A checked sweep, ready to run.

    Attributes:
        cfg: the resolved config as plain data.
        specs: one trial spec per (method, seed); Tune's grid.
        space: Tune domains of the sampled hyperparameters.
        tasks: every distinct task, built once, by :func:`task_key`.
        capabilities: what each role's backend declares.
        lines: what to print before the sweep starts.
        warnings: data problems that do not stop the sweep (printed, and kept in ``summary.json``).
    """

    cfg: dict
    specs: list[dict]
    space: dict
    tasks: dict[str, Task] = field(default_factory=dict)
    capabilities: dict[str, frozenset[str]] = field(default_factory=dict)
    lines: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()


def make_plan(cfg: DictConfig, search_dirs: list[Path], choices: dict, run_dir: Path) -> Plan:
    """Check everything that needs no model, once, in order of cost; build each task and method once."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    check_address(plain["ray"])  # a cluster that is not there fails first, in seconds
    check_numbers(cfg)
    task_args = dict(plain["task"])
    check_arguments(task_args.pop("_target_"), task_args, where="task")
    specs = trial_specs(cfg, search_dirs, choices)
    space = sample_space(plain["search"]["params"])
    for role in ROLES:
        model = dict(plain["lm"][role])
        check_arguments(model.pop("_target_"), model)
        check_model_dir(role, model)
    caps = capabilities(plain)
    tasks = build_all(specs, caps, choices)
    if plain["search"]["scheduler"] not in SCHEDULERS:
        raise UserError(f"unknown search.scheduler {plain['search']['scheduler']!r}; expected {', '.join(SCHEDULERS)}")
    check_islands(plain["search"], specs)
    check_progress(plain.get("progress") or {})
    n = len(specs) * int(plain["search"]["num_samples"])
    task_names = ",".join(dict.fromkeys(spec["task_name"] for spec in specs))
    try:
        lines = (
            f"[promptsweep] {n} trial(s): methods={list(plain['search']['methods'])} task={task_names} "
            f"seeds={list(plain['search']['seeds'])} -> {run_dir}",
            budget.projection(plain, n),
            cache.describe(plain.get("cache")),
        )
    except ValueError as err:
        raise UserError(str(err)) from err
    warnings = tuple(w for task in tasks.values() for w in data_warnings(task))
    return Plan(plain, specs, space, tasks, caps, lines + tuple(f"warning: {w}" for w in warnings), warnings)


def check_islands(search: dict, specs: list[dict]) -> None:
    """``search.islands`` and PBT: islands of one (method, task, seed), evolved by perturbing ``search.params``.

    PBT's exploit hands a trial another trial's checkpoint and config; across methods, tasks or
    seeds that would swap a population into a search it does not belong to, so a PBT sweep is
    the islands of one of them (run seeds as separate sweeps).
    """
    islands = search.get("islands", 1)
    if not isinstance(islands, int) or islands < 1:
        raise UserError(f"search.islands must be an integer >= 1, got {islands!r}")
    if search["scheduler"] != "pbt":
        return
    if len(specs) != 1:
        raise UserError(f"search.scheduler=pbt evolves the islands of one method on one task and seed; this sweep "
                        f"has {len(specs)} (method, task, seed) combinations: run one per sweep (e.g. -m search.seeds=[0],[1])")
    if islands < 2 and int(search.get("num_samples", 1)) < 2:
        raise UserError("search.scheduler=pbt needs a population: search.islands >= 2")
    if not search.get("params"):
        raise UserError("search.scheduler=pbt perturbs search.params: name at least one, "
                        "e.g. search.params={evoprompt: {temperature: {uniform: [0.3, 1.2]}}}")


def check_progress(progress: dict) -> None:
    """The progress settings, checked by the view itself (built once here, before Ray starts)."""
    from pipelines.progress import SweepProgress

    try:
        SweepProgress(None, 1, mode=progress.get("mode", "auto"), interval_s=progress.get("interval_s", 30))
    except ValueError as err:
        raise UserError(str(err)) from err


def capabilities(plain: dict) -> dict[str, frozenset[str]]:
    """What each role's backend declares (imported, not built: no model is loaded)."""
    try:
        return {role: backend_capabilities(plain["lm"][role]["_target_"]) for role in ROLES}
    except ValueError as err:
        raise UserError(str(err)) from err


def task_key(spec: dict) -> str:
    """Identity of a spec's task config: trials of equal tasks share one built task."""
    return json.dumps(spec["task"], sort_keys=True)


@functools.lru_cache(maxsize=8)
def _task(key: str) -> Task:
    # Trials of the same task in one worker process parse the data once.
    return hydra.utils.instantiate(json.loads(key), _convert_="all")


def build(spec: dict) -> tuple[Task, Any]:
    """A spec's task and method, from its plain config."""
    return _task(task_key(spec)), hydra.utils.instantiate(spec["method"], _convert_="all")


def root_cause(err: BaseException) -> BaseException:
    """The innermost cause: Hydra wraps constructor errors in InstantiationException."""
    while err.__cause__ is not None:
        err = err.__cause__
    return err


def build_all(specs: list[dict], caps: dict[str, frozenset[str]], choices: dict) -> dict[str, Task]:
    """Build every distinct method and task once, and check each method's needs against the backends.

    Methods first: they are cheap to build, and a method the backends cannot serve is refused
    before any data is read.

    Returns:
        the built tasks by :func:`task_key`.
    """
    methods = {}
    for spec in {s["method_name"]: s for s in specs}.values():
        method = _built(spec["method_name"], lambda: hydra.utils.instantiate(spec["method"], _convert_="all"))
        check_needs(spec["method_name"], method, caps, choices)
        methods[spec["method_name"]] = method
    tasks: dict[str, Task] = {}
    for spec in specs:
        key = task_key(spec)
        if key not in tasks:
            tasks[key] = _built(f"task {spec['task_name']}", lambda: _task(key))
        check_fit(spec["method_name"], methods[spec["method_name"]], tasks[key], caps, choices)
    return tasks


def check_fit(name: str, method: Any, task: Any, caps: dict[str, frozenset[str]], choices: dict) -> None:
    """A method that cannot run on this task (its own ``check_task`` says why), or a generative task
    whose scorer cannot generate, fails here in one line."""
    if is_generative(task) and GENERATE not in caps["scorer"]:
        model = choices.get("model@lm.scorer") or "?"
        raise UserError(f"task {task.name!r} is scored on generated answers, but model@lm.scorer={model} cannot "
                        "generate; choose a model that can (smollm2, hf, openai)")
    check = getattr(method, "check_task", None)
    if check is not None:
        try:
            check(task)
        except ValueError as err:
            raise UserError(f"{name} on task {task.name!r}: {err}") from err


def _built(what: str, make):
    """``make()``, its failure reported as one line: a task's own error as it is (it names the task
    or the file), anything else after ``what``."""
    try:
        return make()
    except Exception as err:  # noqa: BLE001 - reported to the user as one line
        cause = root_cause(err)
        raise UserError(str(cause) if isinstance(cause, TaskError) else f"{what}: {cause}") from err


def check_needs(name: str, method: Any, caps: dict[str, frozenset[str]], choices: dict) -> None:
    """A method whose needs a role's backend does not declare fails here, naming what is missing."""
    needs = method.needs()
    for role in ROLES:
        missing = needs.missing(role, caps[role])
        if missing:
            provided = ", ".join(sorted(caps[role])) or "scoring only"
            model = choices.get(f"model@lm.{role}") or "?"
            raise UserError(f"{name} needs the {role} to provide {', '.join(missing)}, but model@lm.{role}={model} "
                            f"provides {provided}; choose a local model for the {role} (smollm2, hf)")


def redact(obj: Any) -> Any:
    """A copy of a plain config with every secret-looking value replaced by ``***``."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    return obj


def method_config(name: str, cfg: DictConfig, search_dirs: list[Path], chosen: str | None) -> dict:
    """The constructor config of method ``name``: the composed one if it is the chosen method
    (so command-line overrides apply), else its YAML from the config search path."""
    if name == chosen:
        base = OmegaConf.to_container(cfg.method, resolve=True)
    else:
        base = _load_group_yaml("method", name, search_dirs)
    overrides = OmegaConf.to_container(cfg.search.method_overrides, resolve=True).get(name, {})
    merged = {**base, **overrides}
    check_arguments(merged["_target_"], {k: v for k, v in merged.items() if k != "_target_"})
    return merged


def _load_group_yaml(group: str, name: str, search_dirs: list[Path]) -> dict:
    """A group option's YAML as plain data, honouring a ``defaults`` list of sibling options
    (``evoprompt_de.yaml`` is ``evoprompt`` with ``variant: de``)."""
    path = next((d / group / f"{name}.yaml" for d in search_dirs if (d / group / f"{name}.yaml").exists()), None)
    if path is None:
        known = sorted({p.stem for d in search_dirs for p in (d / group).glob("*.yaml")})
        raise UserError(f"unknown {group} {name!r}; known: {', '.join(known)}")
    own = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    merged: dict = {}
    for parent in own.pop("defaults", []):
        merged.update(own if parent == "_self_" else _load_group_yaml(group, parent, search_dirs))
    return {**merged, **own}


def trial_specs(cfg: DictConfig, search_dirs: list[Path], choices: dict) -> list[dict]:
    """One spec per (task, method, seed): the grid Tune expands. ``choices`` are Hydra's group choices.

    ``search.tasks`` (name -> overrides of the task config, e.g. ``{navigate: {task_name: navigate}}``)
    runs every method on several variants of the task in one sweep; empty means the task alone.
    """
    methods = list(dict.fromkeys(cfg.search.methods))
    if not methods:
        raise UserError("search.methods is empty: name at least one method")
    base = OmegaConf.to_container(cfg.task, resolve=True)
    raw = cfg.search.get("tasks")
    variants = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else (raw or {})
    tasks = task_configs(base, variants, choices.get("task") or "task")
    configs = {m: method_config(m, cfg, search_dirs, choices.get("method")) for m in methods}
    return [
        {"method_name": m, "method": configs[m], "task_name": name, "task": task, "seed": int(s)}
        for (name, task), m, s in itertools.product(tasks.items(), methods, cfg.search.seeds)
    ]


def task_configs(base: dict, variants: dict, default_name: str = "task") -> dict[str, dict]:
    """Each of a sweep's tasks by name: ``search.tasks`` entries over the ``task`` config, or the task alone.

    An entry that names another ``_target_`` is a task of its own (SST-2 next to MR), not an
    override of the base one: the base's arguments would not fit its constructor.
    """
    if not isinstance(variants, dict) or not all(isinstance(v, dict) for v in variants.values()):
        raise UserError("search.tasks must map a name to task overrides, e.g. {navigate: {task_name: navigate}}")
    own = {k: v if v.get("_target_", base.get("_target_")) != base.get("_target_") else {**base, **v}
           for k, v in variants.items()}
    return own or {default_name: base}


def sample_space(params: dict) -> dict:
    """Tune domains from ``{method: {arg: {kind: args}}}``, e.g. ``{"lr": {"loguniform": [1e-3, 1e-1]}}``."""
    from ray import tune

    kinds = {
        "uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
        "choice": lambda *xs: tune.choice(list(xs)), "grid": lambda *xs: tune.grid_search(list(xs)),
    }
    space: dict = {}
    for method, args in params.items():
        for arg, dist in args.items():
            if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in kinds:
                raise UserError(f"search.params.{method}.{arg}: expected one of {sorted(kinds)} with a list of arguments")
            kind, values = next(iter(dist.items()))
            space.setdefault(method, {})[arg] = kinds[kind](*values)
    return space


GROUP_OVERRIDE = re.compile(r"^\+?(task|method|search|resources|logger|budget|experiment|model@lm\.(?:scorer|proposer))=(.+)$")


def expand_model_shorthand(argv: list[str]) -> list[str]:
    """``model=X`` means the same model in both LM roles (the common case, and one word to type)."""
    out = []
    for arg in argv:
        if arg.startswith("model="):
            out += [f"model@lm.scorer={arg[6:]}", f"model@lm.proposer={arg[6:]}"]
        else:
            out.append(arg)
    return out


def check_group_choices(argv: list[str], conf_dir: Path) -> None:
    """Fail with one line on an unknown group choice (``task=nope``) before Hydra prints a page."""
    for arg in argv:
        m = GROUP_OVERRIDE.match(arg)
        if not m or m.group(2) in ("null", ""):
            continue
        group, choice = m.group(1).split("@")[0], m.group(2)
        if not (conf_dir / group / f"{choice}.yaml").exists():
            known = sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))
            raise UserError(f"unknown {group} {choice!r}; known: {', '.join(known)}")


def check_arguments(target: str, kwargs: dict, where: str = "") -> None:
    """Unknown constructor arguments and plainly wrong scalar types fail before any work starts.

    Hydra would only fail inside a trial, after Ray and the model are up; a frozen dataclass
    would even accept ``n_prompts="abc"`` and fail much later. ``where`` names the config
    group (``task``) so the message names the key to fix (``task.n_dev=2.5``).
    """
    import inspect
    import typing

    obj, name = hydra.utils.get_object(target), target.rpartition(".")[2]
    params = inspect.signature(obj).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise UserError(f"{where + ': ' if where else ''}{name}: unknown argument(s) {unknown}; "
                            f"expected some of {sorted(params)}")
    hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    for key, value in kwargs.items():
        expected = hints.get(key)
        if expected in (int, float, bool, str) and not _fits(value, expected):
            finite = " (finite)" if expected in (int, float) else ""
            if where:
                raise UserError(f"{where}.{key}={value!r}: {name} expects {expected.__name__}{finite}")
            raise UserError(f"{name}: argument {key}={value!r} should be {expected.__name__}{finite}")


def _fits(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


# Smallest allowed value of each count (an integer) or resource (any finite number);
# max_failures=-1 retries without limit, as in Tune.
COUNTS = {"search.max_steps": 0, "search.num_samples": 0, "search.max_failures": -1,
          "resources.replicas": 1, "resources.max_concurrent_trials": 1, "cache.actors": 1}
RESOURCES = {"resources.lm_cpus": 0, "resources.lm_gpus": 0, "resources.trial_cpus": 0}


def check_numbers(cfg: DictConfig) -> None:
    """Counts must be integers and resources finite numbers, in range; seeds distinct integers.

    ``search.max_steps=abc``, ``=nan``, ``=2.5`` and ``resources.replicas=inf`` fail here, in one line.
    """
    for key, least in {**COUNTS, **RESOURCES}.items():
        value = OmegaConf.select(cfg, key)
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value < least or (key in COUNTS and value != int(value)):
            kind = "an integer" if key in COUNTS else "a finite number"
            raise UserError(f"{key}={value!r}: expected {kind} >= {least}")
    reuse = OmegaConf.select(cfg, "search.reuse_actors", default=False)
    if not isinstance(reuse, bool):
        raise UserError(f"search.reuse_actors={reuse!r}: expected true or false")
    seeds = list(cfg.search.seeds)
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise UserError(f"search.seeds={seeds}: expected a non-empty list of integers")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"search.seeds={seeds}: a seed is repeated; its trials would be identical twins")


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


CONNECT_TIMEOUT_S = 60.0


def check_address(ray_cfg: dict) -> str | None:
    """The cluster address to join (None: start a local Ray), checked to be listening."""
    address = ray_cfg.get("address") or os.environ.get("RAY_ADDRESS") or None
    if address:
        _probe(address, min(float(ray_cfg.get("connect_timeout_s") or CONNECT_TIMEOUT_S), 10.0))
    return address


def first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _probe(address: str, timeout_s: float) -> None:
    """Fail in seconds when nothing listens at the cluster's address.

    ``ray.init`` retries a refused or unroutable address for minutes before giving up, which
    looks like a hang; one TCP connect answers the common mistakes (typo, cluster down) at once.
    """
    from ray._private import services  # resolves "auto" the way ray.init will

    try:
        target = address.split("://", 1)[1] if "://" in address else services.canonicalize_bootstrap_address(address)
        if not target:
            raise ValueError("no cluster address found (set ray.address=host:port or RAY_ADDRESS)")
        host, _, port = target.rpartition(":")
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError, ConnectionError) as err:
        why = getattr(err, "strerror", None) or first_line(err)
        raise UserError(f"cannot reach the Ray cluster at {address!r}: {why}") from err
