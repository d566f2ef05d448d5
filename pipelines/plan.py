"""Turn the resolved config into plain trial specs and a Tune search space.

Everything a trial needs travels as plain data (dicts of ``_target_`` plus arguments), so
trials are picklable, resumable and independent of Hydra at run time.
"""

from __future__ import annotations

import itertools
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Keys whose values are credentials; "max_batch_tokens" or "api_key_env" (a variable's name) are not.
SECRET_KEY = re.compile(r"(^|_)(api_?key|access_?token|auth_?token|token|secret|password|authorization)$", re.IGNORECASE)


class UserError(Exception):
    """A problem with what the user asked for: printed as one line, exit status 2."""


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
    """One spec per (method, seed): the grid Tune expands. ``choices`` are Hydra's group choices."""
    methods = list(dict.fromkeys(cfg.search.methods))
    if not methods:
        raise UserError("search.methods is empty: name at least one method")
    task = OmegaConf.to_container(cfg.task, resolve=True)
    task_name = choices.get("task") or "task"
    configs = {m: method_config(m, cfg, search_dirs, choices.get("method")) for m in methods}
    return [
        {"method_name": m, "method": configs[m], "task_name": task_name, "task": task, "seed": int(s)}
        for m, s in itertools.product(methods, cfg.search.seeds)
    ]


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


def check_arguments(target: str, kwargs: dict) -> None:
    """Unknown constructor arguments and plainly wrong scalar types fail before any work starts.

    Hydra would only fail inside a trial, after Ray and the model are up; a frozen dataclass
    would even accept ``n_prompts="abc"`` and fail much later.
    """
    import importlib
    import inspect
    import typing

    module, _, name = target.rpartition(".")
    obj = getattr(importlib.import_module(module), name)
    params = inspect.signature(obj).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            raise UserError(f"{name}: unknown argument(s) {unknown}; expected some of {sorted(params)}")
    hints = typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    for key, value in kwargs.items():
        expected = hints.get(key)
        if expected in (int, float, bool, str) and not _fits(value, expected):
            raise UserError(f"{name}: argument {key}={value!r} should be {expected.__name__}")


def _fits(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)
