"""The Ray actor that holds one frozen LM and serves every trial of a sweep.

Concurrent trials send their batches independently; the actor coalesces the
log-likelihood batches (and the greedy generation batches of equal settings) that arrive
while it is busy into one backend call, so a replica sees few large batches instead of many
small ones. All model work runs on one executor
thread: two forward passes competing for the same cores only slow each other down.

The model is loaded lazily, by the first request that needs it: a sweep whose every
request is answered from the evaluation cache starts its actors in about a second and
never loads a model. The load runs on the same single executor thread as all model work,
so concurrent first requests queue behind one load instead of each starting their own, and
per-thread settings the backend's constructor makes reach the thread that runs the model:
``torch.set_num_threads`` (the backend's ``threads``) sets the OpenMP thread count of the
calling thread only, which on any other thread would leave the model on Ray's
``OMP_NUM_THREADS`` (the actor's CPU reservation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import ray


class ModelLoadFailed(RuntimeError):
    """The actor's model could not be built; every request needing it gets this, in one line."""


def _unwrap(err: BaseException) -> BaseException:
    """The constructor's own error, out of the ``InstantiationException`` Hydra wraps it in.

    Not the innermost cause: a loader's own one-line error (``ModelLoadError("cannot load
    model 'x': ...")``) names the model, the library error it was raised from does not.
    """
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and err.__cause__ is not None:
        err = err.__cause__
    return err


def _one_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:300]


def _count_tokens(backend, texts: list) -> int:
    return sum(len(backend.tokenize(t)) for t in texts)


@ray.remote
class LMActor:
    """Wraps a backend (anything satisfying ``methods.lm.LM``) built from a plain config dict.

    It serves whatever the backend implements; callers ask only for what the backend declares
    in ``capabilities`` (the sweep checks the methods' needs against it before it starts).

    Args:
        backend: a Hydra-style dict with ``_target_`` naming the backend class; built on
            the first request that needs the model (see :meth:`load`).
        coalesce_ms: how long the first queued batch waits for company before it runs.
        role: the LM role this actor serves (names the model in load errors).
    """

    def __init__(self, backend: dict, coalesce_ms: float = 2.0, role: str = "lm") -> None:
        self._spec, self._role = dict(backend), role
        self._backend: Any = None
        self._load_error = ""  # a failed load is not retried: every later request gets the same error
        self._load_lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending: dict[tuple, list[tuple[list, asyncio.Future]]] = {}  # per kind of call
        self._workers: dict[tuple, asyncio.Task] = {}
        self._coalesce_s = coalesce_ms / 1000.0
        self._stats = {"calls": 0, "requests": 0, "batches": 0, "busy_s": 0.0, "loads": 0, "load_s": 0.0}
        self._cpu_start = time.process_time()  # after the process's imports: serving cost only

    def ready(self) -> dict:
        """Cheap liveness probe: the process id, the backend's name, whether its model is loaded."""
        target = str(self._spec.get("_target_", "?")).rpartition(".")[2]
        return {"pid": os.getpid(), "backend": target, "loaded": self._backend is not None}

    async def load(self) -> dict:
        """Load the model now (a no-op once loaded); returns :meth:`ready`'s answer."""
        await self._call(lambda backend: None)
        return self.ready()

    def _model(self) -> Any:
        """The backend, built on first use; runs on the executor thread."""
        with self._load_lock:
            if self._backend is None:
                if self._load_error:
                    raise ModelLoadFailed(self._load_error)
                self._backend = self._build()
            return self._backend

    def _build(self) -> Any:
        import hydra.utils

        start = time.perf_counter()
        try:
            backend = hydra.utils.instantiate(self._spec, _convert_="all")
        except Exception as err:  # noqa: BLE001 - reported to every caller as one line
            self._load_error = f"{self._role} model failed to load: {_one_line(_unwrap(err))}"
            raise ModelLoadFailed(self._load_error) from err
        self._stats["loads"] += 1
        self._stats["load_s"] += time.perf_counter() - start
        return backend

    async def _call(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """``fn(backend, *args, **kwargs)`` on the model thread, loading the backend first if needed."""
        return await self._run(lambda: fn(self._model(), *args, **kwargs))

    async def _run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._timed, fn)

    def _timed(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the model thread, its time added to ``busy_s`` (not the wait for the thread)."""
        start = time.perf_counter()
        try:
            return fn()
        finally:
            self._stats["busy_s"] += time.perf_counter() - start

    async def loglikelihood(self, requests: list) -> dict:
        """``{"result": float64 [n], "tokens": int}`` for ``methods.lm.Request`` s; tokens counts each
        distinct context once."""
        scores = await self._coalesced(("ll",), list(requests), lambda b, reqs: b.loglikelihood(reqs))
        texts = list(dict.fromkeys(r.context for r in requests)) + [r.continuation for r in requests]
        return {"result": scores, "tokens": await self._call(_count_tokens, texts)}

    async def generate(self, contexts: list, **kwargs) -> dict:
        """``{"result": completions, "tokens": prompt plus generated tokens}``.

        Greedy calls without a spliced prompt are merged with other trials' greedy calls of the
        same settings (one backend call, one shared-prefix plan); sampled calls run alone,
        since a sample's random stream depends on its place in its call.
        """
        contexts = list(contexts)
        if kwargs.get("temperature", 1.0) <= 0 and kwargs.get("prompt") is None:
            key = ("gen", kwargs.get("max_new_tokens"), tuple(kwargs.get("stop", ())), kwargs.get("n", 1))
            out = await self._coalesced(key, contexts, lambda b, ctx: b.generate(ctx, **kwargs))
        else:
            out = await self._call(lambda b: b.generate(contexts, **kwargs))
        texts = contexts + [s for row in out for s in row]
        return {"result": out, "tokens": await self._call(_count_tokens, texts)}

    async def _coalesced(self, key: tuple, items: list, run: Callable[[Any, list], Any]) -> list:
        """``run(backend, items)``, merged with the calls of the same ``key`` that queue meanwhile."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.setdefault(key, []).append((items, fut))
        self._stats["calls"] += 1
        self._stats["requests"] += len(items)
        worker = self._workers.get(key)
        if worker is None or worker.done():
            self._workers[key] = asyncio.create_task(self._drain(key, run))
        return await fut

    async def _drain(self, key: tuple, run: Callable[[Any, list], Any]) -> None:
        """Serve ``key``'s pending calls until none is left, merging what has piled up."""
        await asyncio.sleep(self._coalesce_s)
        while self._pending.get(key):
            batch = self._pending.pop(key)
            flat = [x for items, _ in batch for x in items]
            try:
                result = await self._call(lambda b: run(b, flat))
            except Exception as err:  # every waiting caller gets the error, not a hang
                for _, fut in batch:
                    fut.set_exception(err)
                continue
            i = 0
            for items, fut in batch:
                fut.set_result(result[i : i + len(items)])
                i += len(items)
            self._stats["batches"] += 1

    async def prompt_grad(self, requests: list, prompt: Any) -> dict:
        """``{"result": (loss, grad), "tokens": int}``."""
        out = await self._call(lambda b: b.prompt_grad(requests, prompt))
        texts = [c + k for c, k in requests]
        return {"result": out, "tokens": await self._call(_count_tokens, texts)}

    async def answer_states(self, contexts: list, prompt: Any = None) -> dict:
        """``{"result": float32 [n, d], "tokens": int}``: the states the LM head reads at the answer."""
        out = await self._call(lambda b: b.answer_states(contexts, prompt))
        return {"result": out, "tokens": await self._call(_count_tokens, list(contexts))}

    async def output_embeddings(self):
        return await self._call(lambda b: b.output_embeddings())

    async def token_embeddings(self):
        return await self._call(lambda b: b.token_embeddings())

    async def tokenize_many(self, texts: list) -> list:
        return await self._call(lambda b: [b.tokenize(t) for t in texts])

    async def decode(self, ids: list) -> str:
        return await self._call(lambda b: b.decode(ids))

    async def prefix_states(self, text: str):
        return await self._call(lambda b: b.prefix_states(text))

    async def export_prompt(self, prompt: Any, out_dir: str) -> str:
        """Save a soft prompt or prefix as a PEFT adapter of this actor's model (no second model copy)."""
        return str(await self._call(lambda b: b.export_prompt(prompt, out_dir)))

    def stats(self) -> dict:
        """Calls, requests, merged batches, busy seconds, model loads, and the process's CPU seconds
        since the actor started (on CPU that is mostly the model; with a GPU model, its host side;
        with ``backends.simulated``, which sleeps, all of it is serving overhead)."""
        return {**self._stats, "loaded": self._backend is not None, "cpu_s": time.process_time() - self._cpu_start}

    def spec(self) -> dict:
        """The backend config this actor serves (a standing service is checked against it)."""
        return dict(self._spec)

