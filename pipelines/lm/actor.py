"""The Ray actor that holds one frozen LM and serves every trial of a sweep.

Concurrent trials send their batches independently; the actor coalesces the
log-likelihood batches that arrive while it is busy into one backend call, so a replica
sees few large batches instead of many small ones. All model work runs on one executor
thread: two forward passes competing for the same cores only slow each other down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import time
from typing import Any

import ray


def _expand(prompt: Any, n: int) -> list:
    """One prompt entry per request (``prompt`` may be one prompt, a list, or None)."""
    return list(prompt) if isinstance(prompt, (list, tuple)) else [prompt] * n


@ray.remote
class LMActor:
    """Wraps a backend (anything satisfying ``methods.lm.LM``) built from a plain config dict.

    Args:
        backend: a Hydra-style dict with ``_target_`` naming the backend class.
        coalesce_ms: how long the first queued batch waits for company before it runs.
    """

    def __init__(self, backend: dict, coalesce_ms: float = 2.0) -> None:
        import hydra.utils

        self._backend = hydra.utils.instantiate(backend, _convert_="all")
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        self._pending: list[tuple[list, list, asyncio.Future]] = []
        self._worker: asyncio.Task | None = None
        self._coalesce_s = coalesce_ms / 1000.0
        self._stats = {"calls": 0, "requests": 0, "batches": 0, "busy_s": 0.0}

    def ready(self) -> dict:
        """Cheap liveness probe; returns the process id and the backend's description."""
        return {"pid": os.getpid(), "backend": type(self._backend).__name__}

    async def loglikelihood(self, requests: list, prompt: Any = None) -> dict:
        """``{"result": float64 [n], "tokens": int}``; tokens counts each distinct context once."""
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((list(requests), _expand(prompt, len(requests)), fut))
        self._stats["calls"] += 1
        self._stats["requests"] += len(requests)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        scores = await fut
        texts = list(dict.fromkeys(c for c, _ in requests)) + [k for _, k in requests]
        return {"result": scores, "tokens": await self._run(self._count, texts)}

    def _count(self, texts: list) -> int:
        return sum(len(self._backend.tokenize(t)) for t in texts)

    async def _drain(self) -> None:
        """Serve pending batches until the queue is empty, merging what has piled up."""
        await asyncio.sleep(self._coalesce_s)
        while self._pending:
            batch, self._pending = self._pending, []
            requests = [r for reqs, _, _ in batch for r in reqs]
            prompts = [p for _, ps, _ in batch for p in ps]
            has_prompt = any(p is not None for p in prompts)
            try:
                scores = await self._run(self._backend.loglikelihood, requests, prompts if has_prompt else None)
            except Exception as err:  # every waiting caller gets the error, not a hang
                for _, _, fut in batch:
                    fut.set_exception(err)
                continue
            i = 0
            for reqs, _, fut in batch:
                fut.set_result(scores[i : i + len(reqs)])
                i += len(reqs)
            self._stats["batches"] += 1

    async def _run(self, fn, *args, **kwargs):
        start = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        finally:
            self._stats["busy_s"] += time.perf_counter() - start

    async def generate(self, contexts: list, **kwargs) -> dict:
        """``{"result": completions, "tokens": prompt plus generated tokens}``."""
        out = await self._run(self._backend.generate, contexts, **kwargs)
        texts = list(contexts) + [s for row in out for s in row]
        return {"result": out, "tokens": await self._run(self._count, texts)}

    async def prompt_grad(self, requests: list, prompt: Any) -> dict:
        """``{"result": (loss, grad), "tokens": int}``."""
        out = await self._run(self._backend.prompt_grad, requests, prompt)
        texts = [c + k for c, k in requests]
        return {"result": out, "tokens": await self._run(self._count, texts)}

    async def token_embeddings(self):
        return await self._run(self._backend.token_embeddings)

    async def tokenize_many(self, texts: list) -> list:
        return await self._run(lambda: [self._backend.tokenize(t) for t in texts])

    async def decode(self, ids: list) -> str:
        return await self._run(self._backend.decode, ids)

    async def export_soft_prompt(self, embeddings, out_dir: str) -> str:
        """Save a soft prompt as a PEFT adapter of this actor's model (no second model copy)."""
        from pipelines.peft_export import save_soft_prompt

        model = getattr(self._backend, "model", None)
        if model is None:
            raise TypeError(f"{type(self._backend).__name__} holds no torch model to export against")
        return str(await self._run(save_soft_prompt, model, embeddings, out_dir))

    def stats(self) -> dict:
        """Calls, requests, merged batches and busy seconds since the actor started."""
        return dict(self._stats)
