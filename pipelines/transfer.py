"""Score a finished run's prompts on other tasks or another model: ``python -m pipelines.transfer``.

Usage::

    python -m pipelines.transfer RUN_DIR task=mr
    python -m pipelines.transfer RUN_DIR task=mr trials=best         # each method's best-dev seed only
    python -m pipelines.transfer RUN_DIR task=cr model@lm.scorer=hf lm.scorer.model=Qwen/Qwen2.5-7B-Instruct

Every finished trial's best prompt (``trials=best``: only each method's best-dev seed's) is scored on the target task's test split with the target
scorer (raw and contextually calibrated, for label tasks), and the results are written to
``RUN_DIR/transfer/<task>__<model>.json``; the run's ``report.md`` is rewritten with a
transfer table per target. ``task=NAME`` picks the target task (default: each trial's own
task, as it ran) and ``task.*`` overrides adjust it; the scorer defaults to the run's own.

What moves: text prompts go anywhere. Trigger tokens move to a model whose tokenizer reads
their ids as the same text; soft prompts and prefixes only to the model they were trained on
(their vectors live in its embedding space). Anything else is skipped with one line saying
why. Bad input is one ``error:`` line and exit status 2, before Ray starts.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from omegaconf import OmegaConf

from methods.evaluate import predict_raw_and_calibrated
from methods.lm import GENERATE, TextPrompt, TokenPrompt
from pipelines.lm.cache import cache_path, model_key
from pipelines.plan import UserError, _built, check_group_choices, expand_model_shorthand
from pipelines.results import example_records, load_vectors, test_scores, write_json
from tasks.generative import is_generative

USAGE = "usage: python -m pipelines.transfer RUN_DIR [task=NAME] [model@lm.scorer=NAME] [trials=all|best] [overrides...]"


def target_config(run_dir: Path, overrides: Sequence[str]) -> tuple[dict, dict, bool]:
    """``(plain config to score with, the run's saved config, whether the task is the run's own)``.

    The config is the project's defaults with ``overrides``; the scorer is the run's own unless
    an override names one, and the task is each trial's own unless ``task=`` names another.
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from pipelines.run import REPO_CONF

    saved = run_dir / "config.json"
    if not (run_dir / "summary.json").is_file() or not saved.is_file():
        raise UserError(f"{run_dir} is not a finished run directory (no summary.json and config.json)")
    run_cfg = json.loads(saved.read_text())
    bare = [o.lstrip("+~") for o in overrides]
    own_task = not any(o.startswith("task=") for o in bare)
    if own_task and any(o.startswith("task.") for o in bare):
        raise UserError("task.* overrides adjust a target task: name it with task=NAME")
    check_group_choices(list(overrides), REPO_CONF)
    try:
        with initialize_config_dir(config_dir=str(REPO_CONF), version_base="1.3"):
            composed = compose("config", overrides=list(overrides))
            # only what scoring needs: the search section interpolates Hydra's runtime choices
            cfg = {k: OmegaConf.to_container(composed[k], resolve=True) for k in ("task", "lm", "resources", "ray", "cache")}
    except (HydraException, OmegaConfBaseException) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise UserError("bad override: " + " ".join(lines[:2])) from err
    if not any(o.startswith(("model@lm.scorer=", "lm.scorer.")) for o in bare):
        cfg["lm"]["scorer"] = run_cfg["lm"]["scorer"]
    cfg["lm"]["proposer"] = cfg["lm"]["scorer"]  # nothing is proposed: one pool
    return cfg, run_cfg, own_task


def movable(row: dict, run_dir: Path, same_model: bool) -> tuple[object | None, str]:
    """The prompt a trial found, rebuilt to score elsewhere, or ``(None, why not)``."""
    kind, text = row.get("prompt_kind"), str(row.get("best_prompt", ""))
    if kind == "TextPrompt":
        return TextPrompt(text), ""
    if kind == "TokenPrompt":
        return TokenPrompt(tuple(int(i) for i in row.get("prompt_tokens") or ()), text), ""  # tokenizer checked later
    if kind in ("SoftPrompt", "PrefixPrompt"):
        if not same_model:
            return None, f"{kind} vectors live in the embedding space of the model they were trained on"
        path = run_dir / str(row.get("prompt_file", ""))
        if not row.get("prompt_file") or not path.is_file():
            return None, "no saved prompt file (a run from before prompts were saved)"
        try:
            prompt = load_vectors(path)
        except (OSError, ValueError, KeyError) as err:
            return None, f"{path.name} is not a saved prompt: {err}"
        if type(prompt).__name__ != kind:
            return None, f"{path.name} holds a {type(prompt).__name__}, not a {kind}"
        return prompt, ""
    return None, f"unknown prompt kind {kind!r}"


def _identity(prompt) -> tuple:
    if isinstance(prompt, TextPrompt):
        return ("text", prompt.text)
    if isinstance(prompt, TokenPrompt):
        return ("tokens", prompt.ids)
    return ("vectors", id(prompt))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:80] or "model"


def chosen_trials(rows: list[dict], which: str) -> list[dict]:
    """All finished trials, or each method's best-dev seed per source task (``which="best"``)."""
    if which == "all":
        return rows
    if which != "best":
        raise UserError(f"trials={which!r}; expected all or best")
    from pipelines.report import best_row

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("task"), r["method"]), []).append(r)
    return [best_row(g) for g in groups.values()]


def transfer(run_dir: Path, overrides: Sequence[str], which: str = "all") -> Path:
    """Score the chosen finished trials' prompts on the target; returns the written JSON's path."""
    import hydra.utils
    import ray

    from pipelines import sweep
    from pipelines.lm.pool import ModelStartError, start_pool
    from pipelines.lm.stack import backend_capabilities, role_lm

    cfg, run_cfg, own_task = target_config(run_dir, overrides)
    rows = [r for r in json.loads((run_dir / "summary.json").read_text())["trials"] if r.get("status") == "ok"]
    rows = chosen_trials(rows, which)
    if not rows:
        raise UserError(f"{run_dir}: no finished trial to transfer")
    scorer_cfg = cfg["lm"]["scorer"]
    same_model = model_key(scorer_cfg) == model_key(run_cfg["lm"]["scorer"])
    task_cfg = run_cfg["task"] if own_task else cfg["task"]
    task = _built("task", lambda: hydra.utils.instantiate(task_cfg, _convert_="all"))
    try:
        caps = backend_capabilities(scorer_cfg["_target_"])
    except ValueError as err:
        raise UserError(str(err)) from err
    if is_generative(task) and GENERATE not in caps:
        raise UserError(f"task {task.name!r} is generative and the scorer {scorer_cfg.get('model', '?')!r} cannot generate")
    prompts = {r["trial"]: movable(r, run_dir, same_model) for r in rows}
    target = scorer_cfg.get("model") or scorer_cfg["_target_"]
    print(f"[promptsweep] transfer: {len(rows)} trial prompt(s) of {run_dir.name} -> task {task.name} "
          f"({len(task.test)} test examples), scorer {target}", flush=True)
    namespace = sweep.start_ray(cfg)
    try:
        try:
            handles = start_pool(sweep.pool_specs(cfg)[0], namespace)
        except ModelStartError as err:
            raise UserError(str(err)) from err
        lm = role_lm(handles, caps, cache_path=cache_path(cfg.get("cache")), model_key=model_key(scorer_cfg)).unbudgeted
        out = _score_all(task, rows, prompts, lm, same_model)
    finally:
        ray.shutdown()
    path = run_dir / "transfer" / f"{_slug(task.name)}__{_slug(str(target))}.json"
    write_json(path, {"task": task.name, "scorer_model": target, "same_model": same_model, "n_test": len(task.test),
                      "trials": which,
                      "source_models": sorted({str(r.get("scorer_model") or run_cfg["lm"]["scorer"].get("_target_", "?"))
                                               for r in rows}), "rows": out})
    return path


def _score_all(task, rows: list[dict], prompts: dict, lm, same_model: bool) -> list[dict]:
    """One scoring call per distinct prompt (seeds that found the same text share it)."""
    done: dict[tuple, dict] = {}
    out = []
    for row in rows:
        prompt, why = prompts[row["trial"]]
        if isinstance(prompt, TokenPrompt) and not same_model and lm.decode(list(prompt.ids)) != prompt.text:
            prompt, why = None, "the target tokenizer reads these trigger ids as different text"
        base = {k: row.get(k) for k in ("trial", "method", "seed", "task", "prompt_kind", "best_prompt", "test_score")}
        base["source_task"], base["source_test"] = base.pop("task"), base.pop("test_score")
        if prompt is None:
            print(f"[transfer] {row['method']} seed={row['seed']}: skipped: {why}", flush=True)
            out.append({**base, "skipped": why})
            continue
        key = _identity(prompt)
        if key not in done:
            start = time.perf_counter()
            raw, cal = predict_raw_and_calibrated(task, prompt, task.test, lm)
            recs = example_records(task, raw, cal)
            done[key] = {
                **test_scores(task, raw, cal),
                "scores": [r["score"] for r in recs],
                "scores_raw": [r["score_raw"] for r in recs] if cal is not None else None,
                "scores_calibrated": [r["score_calibrated"] for r in recs] if cal is not None else None,
            }
            print(f"[transfer] {row['method']} seed={row['seed']}: test={done[key]['test_score']:.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
        out.append({**base, **done[key]})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if not argv or "=" in argv[0]:
            raise UserError(USAGE)
        run_dir = Path(argv[0]).expanduser().resolve()
        which = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("trials=")]
        rest = [a for a in argv[1:] if not a.startswith("trials=")]
        path = transfer(run_dir, expand_model_shorthand(rest), which[-1] if which else "all")
        from pipelines.report import write_report

        report = write_report(run_dir)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"transfer results: {path}\nreport: {report}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
