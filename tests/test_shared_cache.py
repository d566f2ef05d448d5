"""One evaluation cache per cluster: the cache actor, the store trials use through it, and the mode choice."""

from __future__ import annotations

import pickle

import pytest
import ray

from methods.lm import Request
from pipelines.lm.cache import NODE_DEFAULT, CachedLM, node_path, shared_mode, trial_cache_path
from pipelines.lm.shared_cache import CACHE_ACTOR, RemoteStore, actor_names, start_cache_actor, start_cache_actors, use_actor
from tests.fakes import PlantedLM
from tests.test_cache import KEY, Metered, requests


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, namespace="test-shared-cache",
             configure_logging=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
def _trial_lookup(store: RemoteStore, reqs: list) -> tuple[list, int, int]:
    """What a trial on another worker does: score through its own CachedLM over the shared store."""
    inner = Metered(PlantedLM())
    out = CachedLM(inner, store, KEY).loglikelihood([Request(c, k) for c, k in reqs])
    return out.tolist(), inner.usage.calls, inner.usage.requests


def test_a_result_stored_by_one_process_is_a_hit_for_a_trial_elsewhere(cluster, tmp_path):
    actor = start_cache_actor(str(tmp_path / "evals.sqlite"), "test-shared-cache")  # noqa: F841 - held: it lives while held
    store = RemoteStore(CACHE_ACTOR, "test-shared-cache")
    reqs = requests("Decide the label carefully")
    first, calls, n = ray.get(_trial_lookup.remote(store, reqs))
    assert (calls, n) == (1, len(reqs))  # computed once, stored through the actor
    again, calls, n = ray.get(_trial_lookup.remote(pickle.loads(pickle.dumps(store)), reqs))
    assert again == first and (calls, n) == (0, 0)  # another process: every request a hit
    assert len(store) == len(reqs)
    stats = ray.get(ray.get_actor(CACHE_ACTOR, namespace="test-shared-cache").stats.remote())
    assert stats["put"] == 1 and stats["get"] == 2 and stats["path"] == str(tmp_path / "evals.sqlite")


def test_several_actors_share_one_file_and_a_trial_goes_round_them(cluster, tmp_path):
    """cache.actors=3: what one actor stored, a trial's next call (through another actor) finds."""
    handles = start_cache_actors(str(tmp_path / "evals.sqlite"), "ns-three", 3)
    assert actor_names(CACHE_ACTOR, 3) == [CACHE_ACTOR, f"{CACHE_ACTOR}-1", f"{CACHE_ACTOR}-2"]
    assert len({h._actor_id for h in handles}) == 3
    store = RemoteStore(CACHE_ACTOR, "ns-three", count=3)
    reqs = requests("Decide the label carefully")
    first, calls, _ = ray.get(_trial_lookup.remote(store, reqs))
    again, calls_again, _ = ray.get(_trial_lookup.remote(store, reqs))
    assert calls == 1 and again == first and calls_again == 0
    for i in range(6):
        store.get_many([b"k%d" % i])
    stats = ray.get([h.stats.remote() for h in handles])
    assert all(s["get"] >= 2 for s in stats)  # six lookups went round all three
    assert {s["stored"] for s in stats} == {len(reqs)} and {s["path"] for s in stats} == {str(tmp_path / "evals.sqlite")}


def test_the_actor_is_one_per_namespace_and_its_file_outlives_it(cluster, tmp_path):
    from pipelines.lm.cache import EvalStore

    a = start_cache_actor(str(tmp_path / "x.sqlite"), "ns-one")
    b = start_cache_actor(str(tmp_path / "ignored.sqlite"), "ns-one")  # a second sweep step joins the first
    assert a._actor_id == b._actor_id
    RemoteStore(CACHE_ACTOR, "ns-one").put_many([(b"k", [1.5], 3.0)])
    ray.kill(a)
    assert EvalStore(tmp_path / "x.sqlite").get_many([b"k"]) == {b"k": ([1.5], 3.0)}


def test_auto_uses_the_actor_only_on_a_multi_node_cluster(cluster):
    assert not use_actor("auto")  # one node here: each trial opens the file itself, as fast as before
    assert use_actor("actor") and not use_actor("file")
    with pytest.raises(ValueError, match="cache.shared='nfs'"):
        shared_mode({"shared": "nfs"})
    assert shared_mode({}) == "auto"


def test_an_unset_path_is_each_nodes_own_default(tmp_path, monkeypatch):
    assert trial_cache_path({"enabled": True, "path": None}) == NODE_DEFAULT
    assert trial_cache_path({"enabled": False}) == ""
    assert trial_cache_path({"path": str(tmp_path / "c.sqlite")}) == str(tmp_path / "c.sqlite")
    monkeypatch.setenv("PROMPTSWEEP_CACHE", str(tmp_path / "node-b"))
    assert node_path(NODE_DEFAULT) == str(tmp_path / "node-b" / "evals.sqlite")


def test_a_service_is_joined_by_name_and_refuses_another_model(cluster):
    from pipelines.lm.pool import SERVICE_NAMESPACE, ModelStartError, PoolSpec, service_actors, start_pool

    tiny = {"_target_": "backends.tiny.tiny_backend", "dtype": "float32"}
    first = start_pool(PoolSpec("scorer", tiny, num_cpus=0), "run-one", service="svc-test")
    again = start_pool(PoolSpec("scorer", {**tiny, "max_batch_tokens": 64}, num_cpus=0), "run-two", service="svc-test")
    assert [h._actor_id for h in again] == [h._actor_id for h in first]  # joined, not started anew
    assert [n for n, _ in service_actors("svc-test")] == ["svc-test-scorer-0"]
    with pytest.raises(ModelStartError, match="already serves scorer model"):
        start_pool(PoolSpec("scorer", {**tiny, "dtype": "float64"}, num_cpus=0), "run-three", service="svc-test")
    for _, handle in service_actors("svc-test"):
        ray.kill(handle, no_restart=True)
    with pytest.raises(ValueError):
        ray.get_actor("svc-test-scorer-0", namespace=SERVICE_NAMESPACE)


@pytest.mark.parametrize("argv, message", [([], "usage"), (["status"], "usage"), (["stop"], "usage"),
                                           (["restart", "x"], "usage")])
def test_the_service_command_refuses_bad_input_in_one_line(argv, message, capsys):
    from pipelines.service import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
