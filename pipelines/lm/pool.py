"""Start the shared LM actor pools once per sweep, and find them again from inside trials.

Actors are named within the run's Ray namespace, so a trial (or a restarted trial) looks
its pool up by role instead of carrying handles through Tune's config, and a restarted
actor keeps its name. Actors load their model on first use (see :mod:`pipelines.lm.actor`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray

from pipelines.lm.actor import LMActor


@dataclass(frozen=True)
class PoolSpec:
    """How to run one LM role.

    Attributes:
        role: "scorer" or "proposer".
        backend: the model's config dict (``_target_`` plus flat arguments).
        replicas: actors holding a copy each (one per GPU on a GPU cluster).
        num_cpus, num_gpus: Ray resources each actor reserves.
        shared_with: another role whose actors serve this one (same model: load it once).
    """

    role: str
    backend: dict
    replicas: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3
    shared_with: str = ""


class ModelStartError(RuntimeError):
    """An LM actor died while starting; the message names the root cause."""


def _last_error_line(err: BaseException) -> str:
    """The innermost error line of a remote traceback (e.g. ``ModelLoadError("model path ...")``)."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    causes = [ln for ln in lines if "Error(" in ln or "Error:" in ln]
    return (causes or lines or [type(err).__name__])[-1][:300]


def actor_name(role: str, i: int) -> str:
    return f"lm-{role}-{i}"


def start_pool(spec: PoolSpec, namespace: str, timeout_s: float = 900.0) -> list:
    """Start ``spec.replicas`` named actors and wait until every one answers.

    The models are not loaded here: each actor loads its own on the first request that
    needs it, so a sweep answered wholly from the evaluation cache loads none.
    """
    if spec.shared_with:
        return []
    handles = [
        LMActor.options(
            name=actor_name(spec.role, i), namespace=namespace, lifetime=None,
            num_cpus=spec.num_cpus, num_gpus=spec.num_gpus,
            max_restarts=spec.max_restarts, max_task_retries=spec.max_restarts,
            max_concurrency=1000,
            # A model load's progress bars, from a background actor, are noise in the sweep's console.
            runtime_env={"env_vars": {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}},
        ).remote(spec.backend, role=spec.role)
        for i in range(spec.replicas)
    ]
    start = time.perf_counter()
    try:
        ray.get([h.ready.remote() for h in handles], timeout=timeout_s)
    except ray.exceptions.ActorDiedError as err:
        raise ModelStartError(f"{spec.role} model actor failed to start: {_last_error_line(err)}") from err
    print(f"[promptsweep] {spec.role}: {spec.replicas} replica(s) ready in {time.perf_counter() - start:.1f}s "
          "(the model loads on first use)", flush=True)
    return handles


def connect(role: str, replicas: int, namespace: str) -> list:
    """Handles of a running pool, looked up by name (used inside Tune trials)."""
    return [ray.get_actor(actor_name(role, i), namespace=namespace) for i in range(replicas)]
