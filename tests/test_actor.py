"""The LM actor loads its model lazily: once, on the first request that needs it, never for a
sweep the evaluation cache answers; a model that cannot load is one clear line for every caller.

The backends here are pure Python (no torch) and write one line to a file each time one is
built, so a test can count the loads across processes.
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import ray

from methods.lm import Request
from pipelines.lm.actor import LMActor, ModelLoadFailed
from pipelines.lm.client import Meter
from pipelines.lm.cache import CachedLM, EvalStore
from pipelines.lm.client import RayLM
from pipelines.lm.pool import PoolSpec, start_pool

ROOT = Path(__file__).resolve().parents[1]
REQUESTS = Request.batch([("Review: fine\nSentiment:", " positive"), ("Review: fine\nSentiment:", " negative"),
                          ("Q: two?", " yes")])


class CountingBackend:
    """Scores ``-len(context + continuation)``; appends a line to ``marker`` when built.

    Args:
        marker: the file counting builds (one line per build, with the process id).
        build_s: how long a build takes (a slow load, so concurrent first requests overlap it).
    """

    def __init__(self, marker: str, build_s: float = 0.0) -> None:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(build_s)

    def loglikelihood(self, requests) -> np.ndarray:
        return np.array([-float(len(r.context + r.continuation)) for r in requests])

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        return [[c[::-1][:max_new_tokens]] * n for c in contexts]

    def tokenize(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def decode(self, ids) -> str:
        return "".join(map(chr, ids))


def broken_backend(marker: str) -> CountingBackend:
    """A backend whose model is missing: counts the attempt, then fails like a bad model name."""
    with open(marker, "a") as f:
        f.write(f"{os.getpid()}\n")
    raise OSError("no model named 'nope/nope' in the local cache\n(second line of detail)")


def _spec(marker: Path, **kwargs) -> dict:
    return {"_target_": f"{__name__}.CountingBackend", "marker": str(marker), **kwargs}


def _builds(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory):
    # Workers import this test module to build the backends above.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), old]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="test-actor",
             _temp_dir=os.path.join(tempfile.gettempdir(), f"psw-test-actor-{os.getpid()}"))
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def test_the_actor_starts_without_its_model_and_concurrent_first_requests_load_it_once(local_ray, tmp_path):
    marker = tmp_path / "builds"
    actor = LMActor.remote(_spec(marker, build_s=1.0), role="scorer")
    assert ray.get(actor.ready.remote())["loaded"] is False
    assert _builds(marker) == 0
    lm = RayLM([actor])
    with ThreadPoolExecutor(6) as pool:  # first requests arriving together, of every kind
        scores = [pool.submit(lm.loglikelihood, REQUESTS[i:]) for i in range(3)]
        tokens = pool.submit(lm.tokenize, "hi")
        texts = pool.submit(lm.generate, ["abc"], max_new_tokens=2)
        assert [list(f.result()) for f in scores] == [[-len(c + k) for c, k, _ in REQUESTS[i:]] for i in range(3)]
        assert tokens.result() == [104, 105] and texts.result() == [["cb"]]
    stats = ray.get(actor.stats.remote())
    assert stats["loaded"] is True and stats["loads"] == 1 and _builds(marker) == 1
    assert ray.get(actor.load.remote())["loaded"] is True and _builds(marker) == 1  # loading again is a no-op


def test_a_model_that_cannot_load_is_one_clear_line_for_every_caller_and_not_retried(local_ray, tmp_path):
    marker = tmp_path / "builds"
    actor = LMActor.remote({"_target_": f"{__name__}.broken_backend", "marker": str(marker)}, role="proposer")
    assert ray.get(actor.ready.remote())["loaded"] is False  # starting is fine; the model fails on use
    for call in (actor.loglikelihood.remote(REQUESTS), actor.generate.remote(["x"], max_new_tokens=1)):
        with pytest.raises(ray.exceptions.RayTaskError) as err:
            ray.get(call)
        assert isinstance(err.value.cause, ModelLoadFailed)
        assert str(err.value.cause) == "proposer model failed to load: no model named 'nope/nope' in the local cache"
    assert _builds(marker) == 1
    assert ray.get(actor.stats.remote())["loaded"] is False


def test_requests_the_cache_answers_load_no_model(local_ray, tmp_path):
    store, key = EvalStore(tmp_path / "evals.sqlite"), "counting:0"
    first_marker, second_marker = tmp_path / "first", tmp_path / "second"
    first = CachedLM(RayLM(start_pool(PoolSpec("scorer", _spec(first_marker)), "test-actor-1"), usage=Meter()), store, key)
    expected = first.loglikelihood(REQUESTS)
    gen = first.generate(["abc", "de"], max_new_tokens=2, temperature=0.0)
    assert _builds(first_marker) == 1
    # A re-run: fresh actors, the same requests, all in the cache.
    handles = start_pool(PoolSpec("scorer", _spec(second_marker)), "test-actor-2")
    again = CachedLM(RayLM(handles, usage=Meter()), store, key)
    np.testing.assert_array_equal(again.loglikelihood(REQUESTS), expected)
    assert again.generate(["abc", "de"], max_new_tokens=2, temperature=0.0) == gen
    assert again.usage.calls == 0 and again.usage.cache_calls == 2
    stats = ray.get(handles[0].stats.remote())
    assert stats["loaded"] is False and stats["loads"] == 0 and _builds(second_marker) == 0
    again.loglikelihood(Request.batch([("a new request", " x")]))  # a miss loads the model after all
    assert ray.get(handles[0].stats.remote())["loads"] == 1 and _builds(second_marker) == 1


class SlowGenerator(CountingBackend):
    """Greedy generation that takes ``gen_s`` per call and logs each call's batch size to ``marker``."""

    def __init__(self, marker: str, gen_s: float = 0.3) -> None:
        self.marker, self.gen_s = marker, gen_s

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        with open(self.marker, "a") as f:
            f.write(f"{len(contexts)}\n")
        time.sleep(self.gen_s)
        return [[c[::-1][:max_new_tokens]] * n for c in contexts]


def test_greedy_generation_of_concurrent_callers_is_merged_into_one_backend_call(local_ray, tmp_path):
    marker = tmp_path / "calls"
    actor = LMActor.remote({"_target_": f"{__name__}.SlowGenerator", "marker": str(marker)}, role="scorer")
    ray.get(actor.load.remote())  # a started actor: the first call runs as soon as it arrives
    lm = RayLM([actor])
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(lm.generate, ["first"], max_new_tokens=3, temperature=0.0)
        time.sleep(0.15)  # the first call is running: the next three queue behind it
        rest = [pool.submit(lm.generate, [f"ctx{i}", f"more{i}"], max_new_tokens=3, temperature=0.0) for i in range(3)]
        sampled = pool.submit(lm.generate, ["sampled"], max_new_tokens=3, temperature=1.0, seed=1)
        assert first.result() == [["tsr"]]
        assert [f.result() for f in rest] == [[[f"{i}xt"], [f"{i}er"]] for i in range(3)]  # each caller its own rows
        assert sampled.result() == [["del"]]
    sizes = [int(x) for x in marker.read_text().split()]
    assert sorted(sizes) == [1, 1, 6], sizes  # the greedy calls merged; the sampled one ran alone
