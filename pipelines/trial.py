"""One Tune trial: build the task and method from plain config, loop ``step``, report, checkpoint.

The trial loads no model: it looks up the sweep's shared LM actor pools by name. Its
state, RNG and usage counters are pickled into a Tune checkpoint after every step, so a
restarted trial continues from its last step, and its evaluation log is trimmed back to
that step first.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
from ray import tune

from methods.base import Snapshot, final_task
from methods.evaluate import calibrated, headline, predict_raw_and_calibrated
from methods.lm import EXPORT_PROMPT, PrefixPrompt, SoftPrompt, TokenPrompt
from methods.racing import prediction_dtype
from pipelines.lm.budget import Budget, BudgetExhausted, Price, share_spent
from pipelines.lm.pool import connect
from pipelines.lm.shared_cache import RemoteStore
from pipelines.lm.stack import RoleLM, role_lm
from pipelines.live import LiveLog, start_run, step_rows
from pipelines.plan import build, redact
from pipelines.results import EvalLog, example_records, save_vectors, test_scores, write_json, write_jsonl
from pipelines.summary import trial_label
from tasks.core import Task

CHECKPOINT_FILE = "trial.pkl"


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (passed with ``tune.with_parameters``).

    Attributes:
        run_dir: absolute path of the run directory.
        namespace: Ray namespace holding the LM actors.
        scorer, proposer: ``(pool role, replicas)`` serving each LM role.
        models: model names for the results, by role.
        max_steps: cap on method steps per trial.
        cache_path: the shared evaluation cache (``""``: none); ``model_keys`` name each role's
            model in its keys.
        budget: per-role limits (the ``budget`` config); ``prices`` price each role's tokens.
        capabilities: what each role's backend declares, by role.
        logger: the W&B settings each trial's live run uses (``logger`` config, with its group).
        cache_actor: the cluster's cache actor, by name in ``namespace`` (``""``: each trial
            opens ``cache_path`` itself; see ``pipelines/lm/shared_cache.py``); ``cache_actors``
            of them share its file.
        service: the standing model service serving both roles (``lm.service``; ``""``: the
            sweep's own pools).
        islands: trials are PBT islands (``search.scheduler=pbt``): each keeps its own counters
            apart from its checkpoint, which another island may be handed.
    """

    run_dir: str
    namespace: str
    scorer: tuple[str, int]
    proposer: tuple[str, int]
    models: dict
    max_steps: int
    cache_path: str = ""
    model_keys: dict = field(default_factory=dict)
    budget: dict = field(default_factory=dict)
    prices: dict = field(default_factory=dict)
    capabilities: dict = field(default_factory=dict)
    logger: dict = field(default_factory=dict)
    cache_actor: str = ""
    cache_actors: int = 1
    service: str = ""
    islands: bool = False


def apply_samples(spec: dict, sample: dict) -> dict:
    """Merge Tune-sampled hyperparameters for this trial's method into its method config."""
    overrides = sample.get(spec["method_name"], {}) if sample else {}
    return {**spec, "method": {**spec["method"], **overrides}, "sampled": overrides}


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable: the whole life of one (method, task, seed, params) trial."""
    # Ray Train logs "Checkpoint successfully created" at INFO after every step; progress lines say it.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    cpu_start = time.process_time()
    spec = apply_samples(config["trial"], config.get("sample", {}))
    task, method = build(spec)
    scorer, proposer = _lm(ctx, "scorer"), _lm(ctx, "proposer")
    trial_id = tune.get_context().get_trial_id()
    log = EvalLog(Path(ctx.run_dir) / "evaluations" / f"{trial_id}.jsonl")
    island = int(config.get("island", 0))
    run = (_restore(log, scorer, proposer, trial_id, ctx, spec)
           or _fresh(method, task, scorer, proposer, spec["seed"], island))
    run.setdefault("island", island)
    live = LiveLog(run.get("live"), *start_run(ctx.logger, Path(ctx.run_dir), _wandb_config(ctx, spec)))
    live.catch_up()
    try:
        _search(ctx, spec, trial_id, task, method, run, scorer, proposer, log, live)
        # Scoring the best prompt on test is the report, not the search: outside the budget.
        result = _finish(ctx, spec, trial_id, task, method, run, scorer, proposer, cpu_start)
    except Exception:
        live.finish({}, failed=True)  # the run shows as failed in W&B; Tune records the error
        raise
    live.finish({k: v for k, v in result.items() if k.startswith(("test_score", "dev_score", "steps"))})


def _search(ctx: TrialContext, spec: dict, trial_id: str, task: Task, method, run: dict,
            scorer: RoleLM, proposer: RoleLM, log: EvalLog, live: LiveLog) -> None:
    """Step until the method is done, the step cap is reached or the budget refuses a call."""
    cap = Budget.parse(ctx.budget).scorer.examples
    while run["step"] < ctx.max_steps and not method.done(run["state"]):
        start = time.perf_counter()
        try:
            run["state"], report = method.step(run["state"], task, scorer.lm, proposer.lm, run["rng"])
        except BudgetExhausted as err:
            # The unfinished step is dropped whole (its results stay in the cache); the state,
            # the log and the checkpoint are those of the last finished step.
            run["elapsed"] += time.perf_counter() - start
            print(f"[{trial_label(spec)}] stopped after step {run['step']}: {err}", flush=True)
            return
        run["step"] += 1
        run["elapsed"] += time.perf_counter() - start
        run["dev_score"] = float(report.metrics.get("dev_score", float("nan")))
        log.append(_records(spec, trial_id, run, report, scorer, proposer))
        metrics = {**report.metrics, **_usage(run, scorer, proposer)}
        planned = method.planned_steps() if hasattr(method, "planned_steps") else 0
        metrics["progress"] = share_spent(run["step"], metrics["scorer_examples"], cap, ctx.max_steps, planned)
        _progress(spec, run, metrics, cap)
        _watch(live, method, run, metrics, report, scorer, trial_label(spec))
        _report_with_checkpoint(metrics, run, scorer, proposer, trial_id, ctx)


def _watch(live: LiveLog, method, run: dict, metrics: dict, report, scorer: RoleLM, label: str = "") -> None:
    """The step's rows for the trial's live view (and W&B run), kept in the checkpoint.

    Watching must never end a search: a failure here is one line, and the trial goes on
    without its W&B run.
    """
    try:
        snapshot = method.snapshot(run["state"]) if hasattr(method, "snapshot") else Snapshot()
        history, per_step = step_rows(run["step"], run["dev_score"], method.best(run["state"]), snapshot,
                                      report.evaluated, live.decoder(scorer.unbudgeted.decode))
        live.record(run["step"], metrics, history, per_step)
    except Exception as err:  # noqa: BLE001 - logged, and the search goes on
        print(f"[{label}] live view failed at step {run['step']} ({type(err).__name__}: {err}); "
              "W&B logging is off for the rest of this trial", flush=True)
        live.run = None
    run["live"] = live.state()


def _wandb_config(ctx: TrialContext, spec: dict) -> dict:
    """What the trial's W&B run shows as its config (secrets redacted, as in config.json)."""
    return redact({"method": spec["method_name"], "task": spec["task_name"], "seed": spec["seed"],
                   "params": spec.get("sampled", {}), "method_config": spec["method"], "task_config": spec["task"],
                   "models": ctx.models, "budget": ctx.budget})


def _lm(ctx: TrialContext, role: str) -> RoleLM:
    """The role's LM: the shared actors, behind the evaluation cache, behind the budget."""
    pool, replicas = getattr(ctx, role)
    store = RemoteStore(ctx.cache_actor, ctx.namespace, ctx.cache_actors) if ctx.cache_actor and ctx.cache_path else None
    return role_lm(
        connect(pool, replicas, ctx.namespace, ctx.service), ctx.capabilities.get(role, frozenset()),
        cache_path=ctx.cache_path, model_key=ctx.model_keys.get(role, ""), store=store,
        limits=getattr(Budget.parse(ctx.budget), role), role=role, price=ctx.prices.get(role, Price()),
    )


def _progress(spec: dict, run: dict, metrics: dict, cap: int | None = None) -> None:
    """One line per step; the example-evaluations used are shown against the trial's cap when it has one."""
    used = f"{int(metrics['scorer_examples']):,}" + (f"/{cap:,}" if cap else "")
    print(
        f"[{trial_label(spec)}] step {run['step']}: dev_score={metrics.get('dev_score', float('nan')):.3f} "
        f"scorer_examples={used} scorer_calls={int(metrics['scorer_calls'])} ({run['elapsed']:.0f}s)", flush=True,
    )


def _fresh(method, task, scorer: RoleLM, proposer: RoleLM, seed: int, island: int = 0) -> dict:
    # Island 0 draws as an ordinary trial of that seed; the others start populations of their own.
    rng = np.random.default_rng(seed if island == 0 else [seed, island])
    start = time.perf_counter()
    state = method.init(task, scorer.lm, proposer.lm, rng)
    return {"state": state, "rng": rng, "step": 0, "elapsed": time.perf_counter() - start}


def _restore(log: EvalLog, scorer: RoleLM, proposer: RoleLM, trial_id: str = "", ctx: TrialContext | None = None,
             spec: dict | None = None) -> dict | None:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as d:
        run = pickle.loads((Path(d) / CHECKPOINT_FILE).read_bytes())
    owner = run.pop("owner", trial_id)
    if trial_id and owner != trial_id:  # PBT's exploit: another island's checkpoint
        return _migrated(run, owner, trial_id, ctx, spec, scorer, proposer)
    scorer.meter.restore(run.pop("scorer_usage"))
    proposer.meter.restore(run.pop("proposer_usage"))
    dropped = log.truncate_after(run["step"])
    print(f"[promptsweep] resumed at step {run['step']} (dropped {dropped} uncheckpointed records)", flush=True)
    return run


ISLANDS_DIR = "islands"  # each PBT island's own counters, kept apart from the checkpoint another island may take


def _migrated(run: dict, donor: str, trial_id: str, ctx: TrialContext, spec: dict,
              scorer: RoleLM, proposer: RoleLM) -> dict:
    """Take another island's population (PBT's exploit is a migration); keep this island's own counters.

    The donor's state is what moves: its population and best prompt. This island keeps what it
    spent (its meters: each island's budget counts its own work), its step count, its log (no
    record of it is undone) and its W&B run; its random stream is new, so it does not replay
    the donor's future.
    """
    own_path = Path(ctx.run_dir) / ISLANDS_DIR / f"{trial_id}.pkl"
    own = pickle.loads(own_path.read_bytes()) if own_path.exists() else {}
    for meter, key in ((scorer.meter, "scorer_usage"), (proposer.meter, "proposer_usage")):
        if key in own:
            meter.restore(own[key])
    migrations = int(own.get("migrations") or 0) + 1
    donor_step, donor_dev = run["step"], run.get("dev_score", float("nan"))
    stream = int.from_bytes(trial_id.encode()[-8:].rjust(8, b"\0"), "big") % 2**32
    out = {**run, "step": int(own.get("step", 0)), "elapsed": float(own.get("elapsed", 0.0)),
           "live": own.get("live"), "migrations": migrations, "island": own.get("island", 0),
           "rng": np.random.default_rng([int(spec["seed"]), stream, migrations]),
           "migrated_from": [*(own.get("migrated_from") or []), [donor, donor_step]]}
    print(f"[{trial_label(spec)}] island migration {migrations}: took trial {donor}'s population "
          f"(its step {donor_step}, dev {donor_dev:.3f}); own step {out['step']}", flush=True)
    return out


def _records(spec: dict, trial_id: str, run: dict, report, scorer: RoleLM, proposer: RoleLM) -> list[dict]:
    base = {"trial": trial_id, "method": spec["method_name"], "task": spec["task_name"], "seed": spec["seed"],
            "step": run["step"]}
    # What the method had asked for when the step ended, cache hits included: the x-axes of
    # best-so-far curves must not depend on what an earlier run left in the cache.
    cost = {"scorer_examples": scorer.meter.examples, "scorer_calls": scorer.meter.charged_calls(),
            "tokens": scorer.meter.charged_tokens() + proposer.meter.charged_tokens(), "wall_s": run["elapsed"]}
    return [
        {**base, "idx": i, "prompt": e.prompt, "score": e.score, "n": e.n, "kind": e.kind, **_provenance(e),
         **cost, "time": time.time()}
        for i, e in enumerate(report.evaluated)
    ]


def _provenance(e) -> dict:
    """Where a candidate came from and what it got right, for ``pipelines.distill`` (only what the method recorded)."""
    out = {"parent": e.parent} if e.parent else {}
    if e.examples:
        out["examples"], out["outcomes"] = list(e.examples), [round(float(o), 4) for o in e.outcomes]
    return out


def _usage(run: dict, scorer: RoleLM, proposer: RoleLM) -> dict[str, float]:
    return {
        "step": float(run["step"]), "wall_s": run["elapsed"],
        **scorer.meter.as_dict("scorer"), **proposer.meter.as_dict("proposer"),
    }


def _report_with_checkpoint(metrics: dict, run: dict, scorer: RoleLM, proposer: RoleLM, trial_id: str = "",
                            ctx: TrialContext | None = None) -> None:
    if ctx is not None and ctx.islands:  # what stays this island's when PBT hands it another's checkpoint
        own = {"step": run["step"], "elapsed": run["elapsed"], "live": run.get("live"), "island": run.get("island", 0),
               "migrations": run.get("migrations", 0), "migrated_from": run.get("migrated_from", [])}
        path = Path(ctx.run_dir) / ISLANDS_DIR / f"{trial_id}.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.with_suffix(".tmp").write_bytes(pickle.dumps({**own, "scorer_usage": scorer.meter,
                                                            "proposer_usage": proposer.meter}))
        path.with_suffix(".tmp").replace(path)
    with tempfile.TemporaryDirectory() as d:
        blob = {**run, "owner": trial_id, "scorer_usage": scorer.meter, "proposer_usage": proposer.meter}
        (Path(d) / CHECKPOINT_FILE).write_bytes(pickle.dumps(blob))
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _finish(ctx: TrialContext, spec: dict, trial_id: str, task: Task, method, run: dict,
            scorer: RoleLM, proposer: RoleLM, cpu_start: float) -> dict:
    """Score the final best prompt on test (the only time test data is touched) and record it."""
    start = time.perf_counter()
    best = method.best(run["state"])
    task = final_task(method, run["state"], task)  # a method that chose label words is read with them
    # Raw and calibrated predictions come from one call, so every method's report shows whether
    # it found a better instruction or only a shifted label prior.
    raw, cal = predict_raw_and_calibrated(task, best, task.test, scorer.unbudgeted)
    preds = headline(task, raw, cal)
    run["elapsed"] += time.perf_counter() - start
    result = {
        "trial": trial_id, "method": spec["method_name"], "task": spec["task_name"], "seed": spec["seed"],
        "scorer_model": ctx.models.get("scorer", ""), "proposer_model": ctx.models.get("proposer", ""),
        "params": spec.get("sampled", {}), "prompt_kind": type(best).__name__,
        "best_prompt": best.describe(), "dev_score": run.get("dev_score", float("nan")),
        **test_scores(task, raw, cal), "test_groups": _groups(task, preds),
        "metric": task.metric, "calibration": "contextual" if calibrated(task) else "none",
        "n_test": len(task.test), "n_dev": len(task.dev), "steps": run["step"],
        "budget_examples": Budget.parse(ctx.budget).scorer.examples, **_usage(run, scorer, proposer),
        "node": ray.get_runtime_context().get_node_id(),  # the cluster node that finished it
        "island": run.get("island", 0), "migrations": run.get("migrations", 0),
        # This attempt's CPU in the trial's process (data, method, requests, checkpoints), not the
        # process's start-up: what one more concurrent trial costs a CPU node (bench/scaling.py).
        "cpu_s": time.process_time() - cpu_start,
    }
    if isinstance(best, TokenPrompt):
        result["prompt_tokens"] = list(best.ids)
    if hasattr(method, "task_for"):
        result["label_words"] = list(task.verbalizer)
    if isinstance(best, (SoftPrompt, PrefixPrompt)) and EXPORT_PROMPT in scorer.capabilities:
        kind = "prefix" if isinstance(best, PrefixPrompt) else "soft_prompt"
        out = Path(ctx.run_dir) / "artifacts" / trial_id / kind
        result["artifact"] = scorer.unbudgeted.export_prompt(best, str(out))
    if isinstance(best, (SoftPrompt, PrefixPrompt)):  # its vectors, for `python -m pipelines.transfer`
        saved = Path(ctx.run_dir) / "prompts" / f"{trial_id}.npz"
        save_vectors(saved, best)
        result["prompt_file"] = str(saved.relative_to(ctx.run_dir))
    outputs = Path(ctx.run_dir) / "outputs" / f"{trial_id}.jsonl"
    write_jsonl(outputs, example_records(task, raw, cal))
    result["outputs"] = str(outputs.relative_to(ctx.run_dir))
    write_json(Path(ctx.run_dir) / "trials" / f"{trial_id}.json", result)
    print(f"[{trial_label(spec)}] done: test_score={result['test_score']:.3f} on {len(task.test)} "
          f"test examples ({run['elapsed']:.0f}s)", flush=True)
    tune.report({"test_score": result["test_score"], "dev_score": result["dev_score"], **_usage(run, scorer, proposer)})
    return result


def _groups(task: Task, preds) -> dict[str, float]:
    preds = np.asarray(preds, dtype=prediction_dtype(task))
    groups = sorted({ex.group for ex in task.test if ex.group})
    out = {}
    for g in groups:
        idx = [i for i, ex in enumerate(task.test) if ex.group == g]
        out[g] = task.score(preds[idx], [task.test[i] for i in idx])
    return out
