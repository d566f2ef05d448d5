"""The fixed-latency stand-in model: what a call costs, and that its answers repeat."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backends import simulated
from backends.simulated import SimulatedModel
from methods.evoprompt import tagged
from methods.lm import GENERATE, LM, Request


@pytest.fixture
def slept(monkeypatch) -> list[float]:
    """The seconds each call asked to sleep (no test waits for them)."""
    out: list[float] = []
    monkeypatch.setattr(simulated.time, "sleep", out.append)
    return out


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 600), max_batch=st.integers(1, 300))
def test_a_call_costs_one_batch_time_per_pass_of_max_batch_items(n, max_batch):
    slept: list[float] = []
    simulated.time.sleep, real = slept.append, simulated.time.sleep
    try:
        model = SimulatedModel(batch_s=0.05, item_s=0.001, max_batch=max_batch)
        model.loglikelihood([Request(f"c{i}", " x") for i in range(n)])
    finally:
        simulated.time.sleep = real
    passes = -(-n // max_batch)
    assert model.batches == passes
    assert slept == [pytest.approx(passes * 0.05 + n * 0.001)]


def test_merging_calls_is_what_saves_time(slept):
    """Ten calls of 8 cost ten batch times; one call of 80 costs one: why the actor coalesces."""
    model = SimulatedModel(batch_s=0.05)
    for i in range(10):
        model.loglikelihood([Request(f"c{i}-{j}", " x") for j in range(8)])
    model.loglikelihood([Request(f"c{j}", " x") for j in range(80)])
    assert slept[:10] == [pytest.approx(0.05)] * 10 and slept[10] == pytest.approx(0.05)


def test_generation_pays_each_new_token_on_every_pass(slept):
    model = SimulatedModel(batch_s=0.05, max_batch=4, token_s=0.01)
    model.generate(["a", "b", "c"], max_new_tokens=20, temperature=0.7, n=2, seed=0)  # 6 samples: 2 passes
    assert slept == [pytest.approx(2 * (0.05 + 20 * 0.01))]


def test_answers_are_deterministic_and_depend_on_the_text(slept):
    a, b = SimulatedModel(), SimulatedModel(batch_s=0.2)
    reqs = [Request("Review: fine. Sentiment:", " positive"), Request("Review: fine. Sentiment:", " negative")]
    assert np.array_equal(a.loglikelihood(reqs), b.loglikelihood(reqs))  # latency changes no answer
    scores = a.loglikelihood(reqs)
    assert scores[0] != scores[1] and np.all((scores <= 0) & (scores > -10))
    assert a.generate(["x"], max_new_tokens=32, temperature=0.0) == b.generate(["x"], max_new_tokens=32, temperature=0.0)


def test_samples_differ_by_seed_and_index_and_parse_as_tagged_prompts(slept):
    model = SimulatedModel()
    two = model.generate(["meta prompt"], max_new_tokens=40, temperature=0.7, n=2, seed=1)[0]
    again = model.generate(["meta prompt"], max_new_tokens=40, temperature=0.7, n=2, seed=1)[0]
    other = model.generate(["meta prompt"], max_new_tokens=40, temperature=0.7, n=2, seed=2)[0]
    assert two == again and two[0] != two[1] and two != other
    assert all(tagged(t) and "<" not in tagged(t) for t in two)
    assert model.generate(["m"], max_new_tokens=40, temperature=0.7, stop=["</prompt>"])[0][0].endswith(".")


def test_it_is_an_lm_that_generates_and_refuses_bad_settings():
    model = SimulatedModel(tokens_per_word=3)
    assert isinstance(model, LM) and model.capabilities == {GENERATE}
    assert len(model.tokenize("two words")) == 6
    with pytest.raises(ValueError, match="batch_s"):
        SimulatedModel(batch_s=-1)
    with pytest.raises(ValueError, match="token_s"):
        SimulatedModel(token_s=-0.1)
    with pytest.raises(ValueError, match="max_batch"):
        SimulatedModel(max_batch=0)
