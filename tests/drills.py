"""Faults on request, for the fault-tolerance tests and drills: slow steps, a babbling proposer,
an LM backend process that dies once. Test support code: no normal run imports it.

Each is an ordinary component named by ``_target_`` in a config, so a fault runs through
exactly the code path a real sweep uses (Hydra, Ray actors, Tune trials), e.g.::

    python -m pipelines.run model@lm.scorer=tiny model@lm.proposer=tiny \
        lm.scorer._target_=tests.drills.dying_backend +lm.scorer.marker=/tmp/died ...
"""

from __future__ import annotations

import importlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from methods.lm import CAPABILITIES

TINY = "backends.tiny.tiny_backend"


def _build(target: str, kwargs: dict) -> Any:
    """Call the factory named by a dotted path (a backend class or function) with ``kwargs``."""
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)(**kwargs)


@dataclass(frozen=True)
class SlowSteps:
    """A method that sleeps before every step of the wrapped one: long steps, deterministically.

    The wrapped method's results are unchanged (the sleep touches no RNG and no state), so a
    slowed sweep logs the same evaluations as an unslowed one, which is what lets a test
    interrupt a trial mid-way and compare the outcome with an uninterrupted run.

    Args:
        method: the wrapped method (built by Hydra from a nested ``_target_`` config).
        step_sleep_s: seconds slept before each step.
    """

    method: Any
    step_sleep_s: float = 1.0

    def needs(self):
        return self.method.needs()

    def init(self, task, scorer, proposer, rng):
        return self.method.init(task, scorer, proposer, rng)

    def step(self, state, task, scorer, proposer, rng):
        time.sleep(self.step_sleep_s)
        return self.method.step(state, task, scorer, proposer, rng)

    def best(self, state):
        return self.method.best(state)

    def done(self, state) -> bool:
        return self.method.done(state)

    def snapshot(self, state):
        return self.method.snapshot(state)


class _Delegate:
    """Forwards every attribute it does not define to the wrapped backend."""

    capabilities = CAPABILITIES  # the drills wrap the tiny model, which has them all

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class BabblingBackend(_Delegate):
    """Scores like the wrapped backend but answers every ``generate`` with ``text``: a proposer
    gone wrong (a broken endpoint, a model emitting junk)."""

    def __init__(self, inner: Any, text: str) -> None:
        super().__init__(inner)
        self._text = text

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        """``[len(contexts)][n]`` copies of the junk text."""
        return [[self._text] * n for _ in contexts]


def babbling_backend(text: str = "@@", backend: str = TINY, **kwargs) -> BabblingBackend:
    """A backend built by ``backend(**kwargs)`` whose proposals are all ``text``."""
    return BabblingBackend(_build(backend, kwargs), text)


class DyingBackend(_Delegate):
    """Kills its own process (SIGKILL, like the OOM killer) in the middle of one scoring call.

    It dies on its ``die_on_call``-th ``loglikelihood`` call, but only while ``marker`` does
    not exist: the marker is created just before dying, so the actor Ray restarts does not die
    again. Each process that builds one appends its pid to ``marker + ".pids"``, so a test
    can see that a second process took over.
    """

    def __init__(self, inner: Any, marker: str, die_on_call: int) -> None:
        super().__init__(inner)
        self._marker, self._die_on_call, self._calls = Path(marker), die_on_call, 0
        with open(f"{marker}.pids", "a") as f:
            f.write(f"{os.getpid()}\n")

    def loglikelihood(self, requests):
        self._calls += 1
        if self._calls == self._die_on_call and _claim(self._marker):
            os.kill(os.getpid(), signal.SIGKILL)
        return self._inner.loglikelihood(requests)


def _claim(marker: Path) -> bool:
    """Create ``marker`` if it does not exist yet; True for the one caller that created it."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def dying_backend(marker: str, die_on_call: int = 2, backend: str = TINY, **kwargs) -> DyingBackend:
    """A backend built by ``backend(**kwargs)`` that dies once, on call ``die_on_call``."""
    if die_on_call < 1:
        raise ValueError(f"die_on_call must be >= 1, got {die_on_call}")
    return DyingBackend(_build(backend, kwargs), marker, die_on_call)
