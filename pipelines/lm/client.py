"""The trial-side LM: satisfies ``methods.lm.LM`` over a pool of shared Ray actors.

Each call shards its batch across the replicas, submits every shard, and waits once
(one ``ray.get``). It also counts what this trial used in a :class:`Meter`, so results can
report calls and tokens per trial even though the model is shared by the whole sweep.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import ray

from methods.lm import Request


@dataclass
class Meter:
    """Everything one trial used of one LM role (checkpointed with the trial).

    One meter per role is shared by every layer of that role's stack (see
    :mod:`pipelines.lm.stack`): :class:`RayLM` counts the work that reached the model, the
    evaluation cache what it answered, the budget the money.

    Attributes:
        calls, requests, tokens: LM calls, requests and tokens that reached the model.
        cache_calls: calls answered entirely from the evaluation cache.
        cache_hits: requests answered from the cache.
        cache_tokens: tokens those requests cost when they were first computed.
        examples: example-evaluations the method asked for (cache hits included: the budget's
            unit, counted by :class:`pipelines.lm.budget.BudgetedLM` before the cache answers).
        wait_s: seconds the trial waited for the model actors' answers (``wait_s / calls`` is the
            mean request latency a trial sees: queueing, batching, the model and Ray's transport).
        usd: estimated price of the budgeted work (API models; 0 for local ones).
        budget_exhausted: 1 once a call was refused for lack of budget.
    """

    calls: int = 0
    requests: int = 0
    tokens: int = 0
    cache_calls: int = 0
    cache_hits: int = 0
    cache_tokens: float = 0.0
    examples: int = 0
    usd: float = 0.0
    budget_exhausted: int = 0
    wait_s: float = 0.0

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{f.name}": float(getattr(self, f.name)) for f in fields(self)}

    def charged_calls(self) -> int:
        """Calls the method asked for: to the model or answered by the cache (what budgets count)."""
        return self.calls + self.cache_calls

    def charged_tokens(self) -> float:
        return self.tokens + self.cache_tokens

    def restore(self, saved: Meter) -> None:
        """Take ``saved``'s counts in place (a resumed trial), so every layer holding this meter sees them."""
        for f in fields(self):
            setattr(self, f.name, getattr(saved, f.name))


def forward_to_inner(self, name: str) -> Any:
    """``__getattr__`` of a wrapper: what the wrapper does not change is the layer below's.

    Dunder names and ``inner`` itself are not forwarded, so copying or unpickling a
    half-built wrapper fails plainly instead of recursing.
    """
    if name.startswith("__") or name == "inner":
        raise AttributeError(name)
    return getattr(self.inner, name)


def shards(n: int, k: int) -> list[slice]:
    """``k`` contiguous, nearly equal slices of ``range(n)`` (empty ones dropped).

    Contiguous rather than strided: requests that share a context or a prompt prefix sit
    next to each other, and the backend's prefix reuse only helps within one shard.
    """
    bounds = np.linspace(0, n, min(k, n) + 1).astype(int) if n else [0]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@dataclass
class RayLM:
    """An ``LM`` whose work runs on ``handles`` (LMActor replicas).

    Args:
        handles: the replicas; shards go to them in order.
        capabilities: what the backend behind the actors declares.
        usage: counters, updated by every call.
    """

    handles: list
    capabilities: frozenset[str] = frozenset()
    usage: Meter = field(default_factory=Meter)
    _embeddings: np.ndarray | None = field(default=None, repr=False)
    _output_embeddings: np.ndarray | None = field(default=None, repr=False)

    def _gather(self, refs: list) -> list:
        start = time.perf_counter()
        outs = ray.get(refs)
        self.usage.wait_s += time.perf_counter() - start
        self.usage.calls += 1
        self.usage.tokens += sum(o["tokens"] for o in outs)
        return [o["result"] for o in outs]

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        requests = list(requests)
        self.usage.requests += len(requests)
        if not requests:
            return np.zeros(0)
        parts = shards(len(requests), len(self.handles))
        refs = [h.loglikelihood.remote(requests[s]) for h, s in zip(self.handles, parts)]
        return np.concatenate([np.asarray(r, dtype=np.float64) for r in self._gather(refs)])

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=(), prompt=None):
        contexts = list(contexts)
        extra = {} if prompt is None else {"prompt": prompt}
        self.usage.requests += len(contexts) * n
        if not contexts:
            return []
        parts = shards(len(contexts), len(self.handles))
        # Each shard gets its own seed derived from the caller's; the shard layout depends only
        # on the batch size and the replica count, so a run with the same pool is reproducible.
        refs = [
            h.generate.remote(
                contexts[s], max_new_tokens=max_new_tokens, temperature=temperature, n=n,
                seed=None if seed is None else seed + 7919 * i, stop=tuple(stop), **extra,
            )
            for i, (h, s) in enumerate(zip(self.handles, parts))
        ]
        return [row for out in self._gather(refs) for row in out]

    def prompt_grad(self, requests, prompt):
        requests = list(requests)
        self.usage.requests += len(requests)
        parts = shards(len(requests), len(self.handles))
        refs = [h.prompt_grad.remote(requests[s], prompt) for h, s in zip(self.handles, parts)]
        outs = self._gather(refs)
        # Each shard returns a mean over its requests; weight by shard size for the global mean.
        weights = np.array([s.stop - s.start for s in parts], dtype=np.float64) / len(requests)
        loss = float(sum(w * o[0] for w, o in zip(weights, outs)))
        grad = sum(w * np.asarray(o[1], dtype=np.float32) for w, o in zip(weights, outs))
        return loss, np.asarray(grad, dtype=np.float32)

    def answer_states(self, contexts, prompt=None) -> np.ndarray:
        contexts = list(contexts)
        self.usage.requests += len(contexts)
        if not contexts:
            return np.zeros((0, self.output_embeddings().shape[1]), dtype=np.float32)
        parts = shards(len(contexts), len(self.handles))
        refs = [h.answer_states.remote(contexts[s], prompt) for h, s in zip(self.handles, parts)]
        return np.concatenate([np.asarray(r, dtype=np.float32) for r in self._gather(refs)])

    def output_embeddings(self) -> np.ndarray:
        # Cached like the input embeddings: large, frozen, and read at every label-search step.
        if self._output_embeddings is None:
            self._output_embeddings = ray.get(self.handles[0].output_embeddings.remote())
        return self._output_embeddings

    def token_embeddings(self) -> np.ndarray:
        # Cached: the matrix is large (vocab x d) and frozen, and gradient methods ask every step.
        if self._embeddings is None:
            self._embeddings = ray.get(self.handles[0].token_embeddings.remote())
        return self._embeddings

    def prefix_states(self, text: str) -> np.ndarray:
        return ray.get(self.handles[0].prefix_states.remote(text))

    def export_prompt(self, prompt, out_dir: str) -> str:
        """Save a trained soft prompt or prefix as a PEFT adapter, on a replica that holds the model."""
        return ray.get(self.handles[0].export_prompt.remote(prompt, out_dir))

    def tokenize(self, text: str) -> list[int]:
        return ray.get(self.handles[0].tokenize_many.remote([text]))[0]

    def decode(self, ids) -> str:
        return ray.get(self.handles[0].decode.remote(list(ids)))
