"""The evaluation cache: only misses reach the model, in one call; reproducible calls only; many processes."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest

from methods.lm import PrefixPrompt, Request, SoftPrompt, TokenPrompt
from pipelines.lm.client import Meter
from pipelines.lm.cache import CachedLM, EvalStore, cache_path, default_path, model_key
from tests.fakes import PlantedLM, planted_task

KEY = "planted:0"


class Metered:
    """What ``RayLM`` is to a trial: forwards to an LM and meters the work that reached it."""

    def __init__(self, lm) -> None:
        self.lm, self.usage, self.batches = lm, Meter(), []

    def _count(self, n: int, texts) -> None:
        self.usage.calls += 1
        self.usage.requests += n
        self.usage.tokens += sum(len(t.split()) for t in texts)

    def loglikelihood(self, requests):
        requests = list(requests)
        self.batches.append(requests)
        if not requests:
            return np.zeros(0)
        self._count(len(requests), [r.context + r.continuation for r in requests])
        return self.lm.loglikelihood(requests)

    def generate(self, contexts, **kwargs):
        out = self.lm.generate(list(contexts), **kwargs)
        self._count(len(contexts) * kwargs.get("n", 1), list(contexts) + [s for row in out for s in row])
        return out

    def prompt_grad(self, requests, prompt):
        self._count(len(requests), [c + k for c, k in requests])
        return 0.0, np.zeros((1, 1), dtype=np.float32)

    def tokenize(self, text):
        return self.lm.tokenize(text)

    def decode(self, ids):
        return self.lm.decode(ids)


def requests(instruction: str, n: int = 6) -> list[tuple[str, str]]:
    task = planted_task(n_dev=n)
    return [(task.render(instruction, ex), c) for ex in task.dev for c in task.verbalizer]


@pytest.fixture
def store(tmp_path):
    s = EvalStore(tmp_path / "evals.sqlite")
    yield s
    s.close()


def cached(store, key: str = KEY) -> tuple[CachedLM, Metered]:
    inner = Metered(PlantedLM())
    return CachedLM(inner, store, key), inner


def test_a_repeated_call_is_answered_from_the_cache(store):
    lm, inner = cached(store)
    reqs = requests("decide the sentiment")
    first = lm.loglikelihood(Request.batch(reqs))
    again = lm.loglikelihood(Request.batch(reqs))
    np.testing.assert_array_equal(first, again)
    assert inner.usage.calls == 1 and inner.usage.requests == len(reqs)
    assert (lm.usage.cache_calls, lm.usage.cache_hits) == (1, len(reqs))
    # a cached request is charged what it cost when it was computed
    assert lm.usage.cache_tokens == pytest.approx(inner.usage.tokens)


def test_only_misses_reach_the_model_in_one_call(store):
    lm, inner = cached(store)
    old, new = requests("label it"), requests("review carefully")
    lm.loglikelihood(Request.batch(old))
    mixed = [r for pair in zip(old, new) for r in pair] + new[:2]  # interleaved, with repeats
    out = lm.loglikelihood(Request.batch(mixed))
    assert inner.usage.calls == 2
    assert inner.batches[-1] == Request.batch(new)  # each missing request once, in order
    np.testing.assert_array_equal(out, PlantedLM().loglikelihood(Request.batch(mixed)))
    assert lm.usage.cache_hits == len(old) and lm.usage.cache_calls == 0


def test_the_cache_outlives_the_process_that_wrote_it(tmp_path):
    path = tmp_path / "evals.sqlite"
    first, _ = cached(EvalStore(path))
    reqs = requests("decide")
    scores = first.loglikelihood(Request.batch(reqs))
    first.store.close()
    rerun, inner = cached(EvalStore(path))
    np.testing.assert_array_equal(rerun.loglikelihood(Request.batch(reqs)), scores)
    assert inner.usage.calls == 0


def test_a_different_model_is_a_different_key(store):
    base = {"_target_": "backends.hf.HFBackend", "model": "smollm2", "dtype": "float32", "max_batch_tokens": 4096}
    assert model_key(base) != model_key({**base, "dtype": "bfloat16"})
    assert model_key(base) == model_key({**base, "max_batch_tokens": 512, "threads": 2})  # speed, not answers
    reqs = requests("decide")
    cached(store, model_key(base))[0].loglikelihood(Request.batch(reqs))
    other, inner = cached(store, model_key({**base, "dtype": "bfloat16"}))
    other.loglikelihood(Request.batch(reqs))
    assert inner.usage.calls == 1


def test_spliced_prompts_are_part_of_the_key(store):
    lm, inner = cached(store)
    reqs = [("Input: case 1 is yes\nLabel:", " yes")]
    soft = SoftPrompt(np.ones((2, 8), dtype=np.float32))
    lm.loglikelihood(Request.batch(reqs, TokenPrompt((1, 2))))
    lm.loglikelihood(Request.batch(reqs, TokenPrompt((1, 2))))
    lm.loglikelihood(Request.batch(reqs, TokenPrompt((2, 1))))
    lm.loglikelihood(Request.batch(reqs, soft))
    lm.loglikelihood(Request.batch(reqs, SoftPrompt(soft.embeddings.copy())))  # same bytes: same prompt
    lm.loglikelihood(Request.batch(reqs, SoftPrompt(soft.embeddings + 1e-3)))
    lm.loglikelihood(Request.batch(reqs))
    assert inner.usage.calls == 5
    # prefix prompts: keyed by their exact bytes, and never confused with a soft prompt of the same bytes
    lm.loglikelihood(Request.batch(reqs, PrefixPrompt(soft.embeddings.copy())))
    lm.loglikelihood(Request.batch(reqs, PrefixPrompt(soft.embeddings.copy())))
    lm.loglikelihood(Request.batch(reqs, PrefixPrompt(soft.embeddings * 2)))
    assert inner.usage.calls == 7
    # per-request prompts: the misses keep their own prompts
    lm.loglikelihood(Request.batch(reqs * 2, [TokenPrompt((1, 2)), TokenPrompt((3, 3))]))
    assert inner.batches[-1] == Request.batch(reqs, [TokenPrompt((3, 3))])


def test_generate_is_cached_only_when_reproducible(store):
    lm, inner = cached(store)
    ctx = ["Instruction: decide the review label"] * 2
    greedy = lm.generate(ctx, max_new_tokens=8, temperature=0.0, seed=1)
    assert lm.generate(ctx, max_new_tokens=8, temperature=0.0, seed=2) == greedy  # seed is moot when greedy
    seeded = lm.generate(ctx, max_new_tokens=8, temperature=0.9, n=3, seed=5)
    assert lm.generate(ctx, max_new_tokens=8, temperature=0.9, n=3, seed=5) == seeded
    assert inner.usage.calls == 2
    lm.generate(ctx, max_new_tokens=8, temperature=0.9, n=3, seed=6)
    lm.generate(ctx, max_new_tokens=8, temperature=0.9, n=3, stop=("\n",), seed=5)
    assert inner.usage.calls == 4
    for _ in range(2):  # seed=None: fresh samples were asked for, the cache is bypassed
        lm.generate(ctx, max_new_tokens=8, temperature=0.9, n=3)
    assert inner.usage.calls == 6
    assert lm.usage.cache_calls == 2 and lm.usage.cache_hits == 2 + 6


def test_prompt_gradients_are_never_cached(store):
    lm, inner = cached(store)
    for _ in range(2):
        lm.prompt_grad([("a", " b")], TokenPrompt((1,)))
    assert inner.usage.calls == 2 and lm.usage.cache_calls == 0


def test_cache_path_scheme(tmp_path, monkeypatch):
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "root"))
    assert default_path() == tmp_path / "root" / "evals.sqlite"
    assert cache_path({"enabled": True, "path": None}) == str(tmp_path / "root" / "evals.sqlite")
    assert cache_path({"enabled": True, "path": str(tmp_path / "x.sqlite")}) == str(tmp_path / "x.sqlite")
    assert cache_path({"enabled": False, "path": str(tmp_path / "x.sqlite")}) == ""


def _writer(path: str, worker: int, out) -> None:
    """One trial-like process: read-then-write overlapping keys many times."""
    try:
        store = EvalStore(path, timeout_s=60)
        for i in range(40):
            keys = [f"k{(worker * 13 + i * 7 + j) % 300}".encode() for j in range(25)]
            found = store.get_many(keys)
            assert all(v == int(k[1:]) for k, (v, _) in found.items())
            store.put_many((k, int(k[1:]), 1.0) for k in keys if k not in found)
        out.put((worker, None))
    except Exception as err:  # reported to the parent, which fails the test
        out.put((worker, repr(err)))


def test_concurrent_processes_share_one_store(tmp_path):
    path = str(tmp_path / "evals.sqlite")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, w, out)) for w in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert [err for _, err in results if err] == []
    store = EvalStore(path)
    everything = store.get_many([f"k{i}".encode() for i in range(300)])
    assert len(store) == len(everything) > 250
    assert all(v == int(k[1:]) for k, (v, _) in everything.items())
