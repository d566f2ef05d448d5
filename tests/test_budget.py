"""Budgets: checked before a call is dispatched, never overshot by more than one batch, clean stops."""

from __future__ import annotations

import json

import numpy as np
import pytest

from methods.lm import Request, TokenPrompt
from methods.opro import OPRO
from methods.lm import SoftPrompt
from pipelines.lm.budget import Budget, BudgetedLM, BudgetExhausted, Limits, Price, projection, scored_examples
from pipelines.plan import _load_group_yaml
from tests.conftest import ROOT
from tests.tiny import tiny_backend
from pipelines.lm.cache import CachedLM, EvalStore
from pipelines.lm.client import Meter
from tests.conftest import run_cli
from tests.fakes import PlantedLM, planted_task
from tests.test_cache import Metered, requests
from tests.test_pipeline import TINY, rescored

TINY_MODEL = [a for a in TINY if not a.startswith("cache.")]  # the tiny model; each test picks its cache


def search(method, scorer, proposer, max_steps: int = 30, seed: int = 0):
    """The trial's loop: step until done, the step cap, or the budget."""
    task, rng = planted_task(n_dev=40), np.random.default_rng(seed)
    state, steps = method.init(task, scorer, proposer, rng), 0
    try:
        while steps < max_steps and not method.done(state):
            state, _ = method.step(state, task, scorer, proposer, rng)
            steps += 1
    except BudgetExhausted:
        pass
    return method.best(state), steps


@pytest.mark.parametrize("cap", [1, 4, 7])
def test_a_run_capped_at_n_scorer_calls_makes_at_most_n(cap):
    scorer_lm, proposer_lm = Metered(PlantedLM()), Metered(PlantedLM())
    scorer = BudgetedLM(scorer_lm, Limits(calls=cap), "scorer")
    proposer = BudgetedLM(proposer_lm, Limits(), "proposer")
    best, steps = search(OPRO(n_proposals=4, n_eval=0), scorer, proposer)
    assert scorer_lm.usage.calls == cap  # OPRO scores every step: it runs into the cap exactly
    assert scorer_lm.usage.budget_exhausted == 1 and proposer_lm.usage.budget_exhausted == 0
    assert steps == cap  # one scoring per step: the next step was refused and dropped whole
    assert best.text  # the best prompt so far is still there to report


def test_an_example_evaluation_is_one_prompt_on_one_example():
    labels = [Request("review one", " negative"), Request("review one", " positive")]
    assert scored_examples(labels) == 1  # its label words are one evaluation
    assert scored_examples(labels + [Request("review two", " negative")]) == 2
    soft_a, soft_b = SoftPrompt(np.zeros((2, 4), np.float32)), SoftPrompt(np.zeros((2, 4), np.float32))
    # two candidates on the same example are two, even when their vectors are equal
    assert scored_examples([Request("x", " a", soft_a), Request("x", " b", soft_a), Request("x", " a", soft_b)]) == 2
    assert scored_examples([Request("x", " a", TokenPrompt((1, 2))), Request("x", " a", TokenPrompt((1, 2)))]) == 1
    lm = Metered(PlantedLM())
    budgeted = BudgetedLM(lm, Limits())
    budgeted.generate(["a", "b"], max_new_tokens=2, n=3, seed=0)  # one sample = one evaluation
    budgeted.prompt_grad([("a", " c"), ("b", " c"), ("b", " d")], TokenPrompt((1,)))
    assert lm.usage.examples == 2 * 3 + 2


def test_an_example_cap_admits_exactly_the_cap_and_refuses_one_more():
    lm = Metered(PlantedLM())
    budgeted = BudgetedLM(lm, Limits(examples=10))
    batch = [Request(f"case {i}", w) for i in range(6) for w in (" no", " yes")]
    budgeted.loglikelihood(batch)  # 6 of 10
    with pytest.raises(BudgetExhausted, match="6 of 10 example-evaluations used, the next call needs 5"):
        budgeted.loglikelihood([Request(f"more {i}", " no") for i in range(5)])  # would be 11: one too many
    assert lm.lm.calls == 1 and lm.usage.examples == 6  # refused before dispatch, nothing charged
    budgeted.loglikelihood([Request(f"more {i}", " no") for i in range(4)])  # exactly 10: allowed
    with pytest.raises(BudgetExhausted, match="10 of 10"):
        budgeted.generate(["x"], max_new_tokens=2, seed=0)
    assert lm.lm.calls == 2 and lm.usage.examples == 10


def test_answer_states_are_charged_one_evaluation_per_context_before_dispatch(tiny):
    lm = CountingLM(tiny)
    budgeted = BudgetedLM(lm, Limits(examples=5))
    budgeted.answer_states(["a b", "c d", "a b"])  # 3 of 5: each context read is one evaluation
    with pytest.raises(BudgetExhausted, match="3 of 5 example-evaluations used, the next call needs 3"):
        budgeted.answer_states(["x", "y", "z"])
    assert lm.examples == lm.usage.examples == 3  # refused before dispatch, nothing charged
    budgeted.answer_states(["x", "y"])  # exactly 5: allowed
    assert lm.examples == lm.usage.examples == 5


class CountingLM:
    """Counts the example-evaluations that reach it, independently of the budget's own count."""

    def __init__(self, inner) -> None:
        self.inner, self.examples = inner, 0
        self.usage = Meter()

    def __getattr__(self, name):
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def loglikelihood(self, requests):
        requests = list(requests)
        self.examples += len({(r.context, id(r.prompt) if isinstance(r.prompt, SoftPrompt) else r.prompt) for r in requests})
        return self.inner.loglikelihood(requests)

    def generate(self, contexts, **kw):
        contexts = list(contexts)
        self.examples += len(contexts) * kw.get("n", 1)
        return self.inner.generate(contexts, **kw)

    def prompt_grad(self, requests, prompt):
        requests = list(requests)
        self.examples += len({r[0] for r in requests})
        return self.inner.prompt_grad(requests, prompt)

    def answer_states(self, contexts, prompt=None):
        contexts = list(contexts)
        self.examples += len(contexts)
        return self.inner.answer_states(contexts, prompt)


SMALL = {"n_eval": 12, "n_prompts": 3, "rounds": 20, "max_new_tokens": 6, "n_virtual": 2, "batch_size": 4, "eval_every": 2}


@pytest.fixture(scope="module")
def tiny():
    return tiny_backend()


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")))
def test_every_method_stops_within_its_example_budget(name, tiny):
    """Run each method's own config into a cap on the tiny model: the cap is met, never passed."""
    import dataclasses

    import hydra.utils

    cfg = _load_group_yaml("method", name, [ROOT / "conf"])
    method = hydra.utils.instantiate(cfg)
    fields = {f.name for f in dataclasses.fields(method)}
    method = dataclasses.replace(method, **{k: v for k, v in SMALL.items() if k in fields})
    task, rng = planted_task(n_dev=12), np.random.default_rng(0)
    cap = 60
    # Text methods score on the planted LM (their meta-prompts outgrow the tiny model's context);
    # gradient methods on the tiny model, which has gradients.
    scorer_inner = CountingLM(tiny if method.needs().scorer else PlantedLM())
    proposer_inner = CountingLM(tiny if "answer_states" in method.needs().proposer else PlantedLM())
    scorer = BudgetedLM(scorer_inner, Limits(examples=cap), "scorer")
    proposer = BudgetedLM(proposer_inner, Limits(), "proposer")
    state, steps = method.init(task, scorer, proposer, rng), 0
    try:
        while steps < 40 and not method.done(state):
            state, _ = method.step(state, task, scorer, proposer, rng)
            steps += 1
    except BudgetExhausted:
        pass
    assert scorer_inner.examples == scorer_inner.usage.examples <= cap, name
    if name not in ("manual", "empty"):  # one 12-example evaluation: nothing to run into
        assert scorer_inner.usage.budget_exhausted == 1, f"{name} finished before its budget ({steps} steps)"


def test_tokens_overshoot_by_at_most_one_batch():
    lm = Metered(PlantedLM())
    budgeted = BudgetedLM(lm, Limits(tokens=1000))
    batch = requests("decide the label", n=8)
    per_call = sum(len((c + k).split()) for c, k in batch)
    with pytest.raises(BudgetExhausted, match="tokens used"):
        for _ in range(1000):
            budgeted.loglikelihood(Request.batch(batch))
    assert 1000 <= lm.usage.tokens < 1000 + per_call


def test_the_check_comes_before_the_work():
    lm = Metered(PlantedLM())
    budgeted = BudgetedLM(lm, Limits(calls=2))
    budgeted.generate(["a"], max_new_tokens=4, seed=0)
    budgeted.loglikelihood(Request.batch([("a", " b")]))
    with pytest.raises(BudgetExhausted, match="scorer budget exhausted: 2 of 2 calls used"):
        budgeted.loglikelihood(Request.batch([("a", " b")]))
    assert lm.usage.calls == 2 and lm.lm.calls == 2  # nothing was dispatched


@pytest.mark.parametrize("call", ["loglikelihood", "generate", "prompt_grad"])
def test_every_budgeted_call_is_refused_once_the_budget_is_spent(call):
    lm = Metered(PlantedLM())
    budgeted = BudgetedLM(lm, Limits(calls=1), "scorer", Price(prompt=1.0))
    do = {
        "loglikelihood": lambda: budgeted.loglikelihood([Request("a b", " c")]),
        "generate": lambda: budgeted.generate(["a b"], max_new_tokens=2, seed=0),
        "prompt_grad": lambda: budgeted.prompt_grad([("a b", " c")], TokenPrompt((1,))),
    }[call]
    do()  # the one call the budget allows, priced from its tokens
    assert lm.usage.usd > 0
    with pytest.raises(BudgetExhausted, match="1 of 1 calls used"):
        do()
    assert lm.usage.calls == 1 and lm.usage.budget_exhausted == 1  # the refused call reached nothing


def test_cached_calls_count_so_a_capped_rerun_replays_with_no_model_calls(tmp_path):
    def capped_run():
        inner = Metered(PlantedLM())
        scorer = BudgetedLM(CachedLM(inner, EvalStore(tmp_path / "evals.sqlite"), "planted"), Limits(calls=4))
        proposer = BudgetedLM(CachedLM(Metered(PlantedLM()), EvalStore(tmp_path / "evals.sqlite"), "planted"), Limits())
        best, steps = search(OPRO(n_proposals=4, n_eval=0), scorer, proposer)
        return best, steps, inner.usage

    first, second = capped_run(), capped_run()
    assert first[:2] == second[:2]  # same stopping point, same best prompt
    assert first[2].calls == 4 and second[2].calls == 0 and second[2].cache_calls == 4


def test_money_is_priced_from_the_counted_tokens():
    lm = Metered(PlantedLM())
    price = Price(prompt=1.0, completion=4.0)
    budgeted = BudgetedLM(lm, Limits(usd=0.05), "proposer", price)
    budgeted.loglikelihood(Request.batch([("one two three", " four")]))  # 4 tokens, all prompt
    assert lm.usage.usd == pytest.approx(4 / 1000)
    assert price.cost(100, prompt_share=0.25, prompt_repeats=2) == pytest.approx((25 * 2 * 1.0 + 75 * 4.0) / 1000)
    with pytest.raises(BudgetExhausted, match=r"\$"):
        for _ in range(100):
            budgeted.loglikelihood(Request.batch([("one two three", " four")]))
    assert lm.usage.usd < 0.05 + 4 / 1000


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"scorer": {"calls": -5}}, "budget.scorer.calls=-5"),
        ({"scorer": {"calls": 0}}, "positive"),
        ({"proposer": {"usd": "lots"}}, "budget.proposer.usd='lots'"),
        ({"scorer": {"calls": 2.5}}, "integer"),
        ({"scorer": {"examples": 0}}, "budget.scorer.examples=0"),
        ({"scorer": {"requests": 3}}, "unknown key"),
        ({"judge": {}}, "unknown key"),
    ],
)
def test_bad_budgets_are_one_line_errors(raw, message):
    with pytest.raises(ValueError, match=message.replace("$", r"\$")) as err:
        Budget.parse(raw)
    assert "\n" not in str(err.value)


def test_projection_multiplies_the_caps_by_the_trials():
    cfg = {"budget": {"scorer": {"calls": 50, "tokens": 1000}}, "lm": {"scorer": {}, "proposer": {"price_in_per_1k": 0.5}}}
    line = projection(cfg, 4)
    assert "scorer <=50 calls, <=1,000 tokens" in line and "scorer <=200 calls, <=4,000 tokens" in line
    assert "proposer unbounded" in line and "money unbounded for the priced proposer" in line
    assert "unbounded" in projection({"budget": None, "lm": {"scorer": {}, "proposer": {}}}, 2)


def capped_args(tmp, data_dir) -> list[str]:
    return [*TINY_MODEL, f"data_dir={data_dir}", "logger=none", "method=ape", "method.n_prompts=3", "method.n_eval=8",
            "method.rounds=6", "method.include_manual=true", "budget.scorer.calls=2", "budget.proposer.calls=2",
            "budget.scorer.examples=1000",
            f"cache.path={tmp / 'evals.sqlite'}"]


def sweep_rows(tmp, data_dir, name: str):
    proc = run_cli(*capped_args(tmp, data_dir), f"hydra.run.dir={tmp / name}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp / name / "summary.json").read_text())["trials"]
    return proc, {r["method"]: r for r in rows}


@pytest.fixture(scope="module")
def capped_sweep(tmp_path_factory, data_dir):
    """A capped sweep through Hydra, Ray and Tune on the tiny model, with its own cache file."""
    tmp = tmp_path_factory.mktemp("capped")
    return tmp, *sweep_rows(tmp, data_dir, "first")


def test_capped_sweep_end_to_end(capped_sweep, data_dir):
    """The cap holds, the capped trial ends cleanly with its best prompt scored on test."""
    tmp, proc, rows = capped_sweep
    assert "Projected for 2 trial(s): scorer <=2,000 example-evaluations, <=4 calls; proposer <=4 calls" in proc.stdout
    ape = rows["ape"]
    # the unit every method is compared in: counted, capped, and shown against the cap as it goes
    assert ape["budget_examples"] == 1000 and 0 < ape["scorer_examples"] <= 1000
    assert f"scorer_examples={int(ape['scorer_examples']):,}/1,000" in proc.stdout
    assert ape["status"] == "ok" and ape["scorer_budget_exhausted"] == 0 and ape["proposer_budget_exhausted"] == 1
    assert ape["steps"] == 2  # the third step's proposal was refused
    # search calls (model or cache) stay within the cap; +1 for the test scoring, outside it
    assert ape["scorer_calls"] + ape["scorer_cache_calls"] <= 2 + 1 and ape["proposer_calls"] == 2
    assert ape["test_score"] == pytest.approx(rescored(ape, data_dir))  # the capped trial's best, scored on test
    assert rows["manual"]["scorer_budget_exhausted"] == 0
    assert len(EvalStore(tmp / "evals.sqlite")) > 0  # the trials wrote to the sweep's cache


@pytest.mark.slow
def test_rerunning_the_sweep_costs_no_model_calls(capped_sweep, data_dir):
    tmp, _, first = capped_sweep
    proc, again = sweep_rows(tmp, data_dir, "again")
    assert "evaluation cache: " in proc.stdout and "stored results" in proc.stdout
    for method, row in again.items():
        assert row["scorer_calls"] == 0 and row["proposer_calls"] == 0, method
        assert row["scorer_cache_calls"] == first[method]["scorer_calls"] + first[method]["scorer_cache_calls"]
        assert (row["best_prompt"], row["test_score"], row["steps"]) == (
            first[method]["best_prompt"], first[method]["test_score"], first[method]["steps"])


def test_negative_budget_is_a_one_line_error(tmp_path, data_dir):
    proc = run_cli(*TINY, f"data_dir={data_dir}", f"hydra.run.dir={tmp_path / 'run'}", "logger=none",
                   "budget.scorer.calls=-3")
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: budget.scorer.calls=-3"), proc.stderr
