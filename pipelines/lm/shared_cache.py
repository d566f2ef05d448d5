"""One evaluation cache per cluster: an actor on the driver's node owns the SQLite file, trials on every node call it.

On one machine every trial opens the cache file itself (SQLite in WAL mode is safe across
processes, and a lookup costs no round trip). On a cluster each node would open *its own*
file at that path, so a result computed on one node was recomputed on another. With
``cache.shared=actor`` (``auto`` picks it when the cluster has more than one node) one actor,
pinned to the driver's node where the file lives, serves ``get_many``/``put_many`` for every
trial. Why an actor rather than a database server: it needs nothing the cluster does not
already run, keeps the one file format (a re-run on one machine reads the same file), and a
lookup is one batched call per LM call, like the model's own: the round trip is small next
to a forward pass. Its cost is one process's throughput (``bench/scaling.py`` measures it: most
of an actor's CPU is Ray's per-call work, not SQLite's), so ``cache.actors=N`` starts N actors
on the same file and each trial's calls go round them: SQLite lets them read at once and
queues their short write transactions, so what one actor answers the others see.

The actor restarts if killed (Ray restarts it and retries the call); what it had committed is
in the file, so nothing is lost but the call in flight, which is retried.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.lm.cache import EvalStore

CACHE_ACTOR = "psw-eval-cache"


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, max_concurrency=16)
class CacheActor:
    """The cluster's evaluation store (a thin shell over :class:`EvalStore`; it serializes its own writes)."""

    def __init__(self, path: str) -> None:
        self.store = EvalStore(path)
        self.calls = {"get": 0, "put": 0, "keys": 0, "busy_s": 0.0}
        self._cpu_start = time.process_time()

    def get_many(self, keys: Sequence[bytes]) -> dict:
        self.calls["get"] += 1
        self.calls["keys"] += len(keys)
        return self._timed(self.store.get_many, keys)

    def put_many(self, items: list) -> None:
        self.calls["put"] += 1
        self._timed(self.store.put_many, items)

    def _timed(self, fn, arg):
        """``fn(arg)``, its time added to ``busy_s``."""
        start = time.perf_counter()
        try:
            return fn(arg)
        finally:
            self.calls["busy_s"] += time.perf_counter() - start

    def stats(self) -> dict:
        """Gets, puts, keys asked for, seconds inside SQLite, the process's CPU seconds, rows stored."""
        return {**self.calls, "cpu_s": time.process_time() - self._cpu_start, "stored": len(self.store), "path": str(self.store.path),
                "node": ray.get_runtime_context().get_node_id()}


def actor_names(name: str, count: int) -> list[str]:
    """The names of a cluster's ``count`` cache actors: ``name``, then ``name-1``, ``name-2``, ..."""
    return [name] + [f"{name}-{i}" for i in range(1, count)]


class RemoteStore:
    """:class:`EvalStore`'s interface over the cache actors: what a trial's ``CachedLM`` calls on any node.

    Picklable (it holds the actors' names, not connections), so it travels to trials as data.
    With several actors, successive calls go round them, starting at a place set by the process
    id, so concurrent trials spread over them.
    """

    def __init__(self, name: str, namespace: str, count: int = 1) -> None:
        self.name, self.namespace, self.count = name, namespace, count
        self._handles: dict[str, object] = {}
        self._next = os.getpid()

    def __getstate__(self) -> dict:
        return {"name": self.name, "namespace": self.namespace, "count": self.count}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    @property
    def handle(self):
        """The actor the next call goes to (any of them answers from the same file)."""
        name = actor_names(self.name, self.count)[self._next % self.count]
        self._next += 1
        if name not in self._handles:
            self._handles[name] = ray.get_actor(name, namespace=self.namespace)
        return self._handles[name]

    def get_many(self, keys: Sequence[bytes]) -> dict:
        return ray.get(self.handle.get_many.remote(list(keys))) if keys else {}

    def put_many(self, items: Iterable[tuple[bytes, object, float]]) -> None:
        rows = list(items)
        if rows:  # waited for: a step's results are stored before its checkpoint says they exist
            ray.get(self.handle.put_many.remote(rows))

    def __len__(self) -> int:
        return int(ray.get(self.handle.stats.remote())["stored"])


def use_actor(mode: str) -> bool:
    """Whether this Ray (already connected) should serve the cache from one actor (``mode``: a
    checked :func:`pipelines.lm.cache.shared_mode`)."""
    if mode != "auto":
        return mode == "actor"
    return sum(1 for n in ray.nodes() if n.get("Alive")) > 1


def start_cache_actor(path: str, namespace: str):
    """The one cache actor, on this (the driver's) node: the file is where the driver said it is."""
    return start_cache_actors(path, namespace, 1)[0]


def start_cache_actors(path: str, namespace: str, count: int = 1) -> list:
    """``count`` cache actors on this (the driver's) node, all on the file at ``path``."""
    here = ray.get_runtime_context().get_node_id()
    handles = [
        CacheActor.options(
            name=name, namespace=namespace, get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
        ).remote(path)
        for name in actor_names(CACHE_ACTOR, count)
    ]
    ray.get([h.stats.remote() for h in handles])  # started and the file opened
    return handles
