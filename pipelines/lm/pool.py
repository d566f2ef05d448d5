"""Start the shared LM actor pools once per sweep, and find them again from inside trials.

Actors are named within the run's Ray namespace, so a trial (or a restarted trial) looks
its pool up by role instead of carrying handles through Tune's config, and a restarted
actor keeps its name. Actors load their model on first use (see :mod:`pipelines.lm.actor`).
"""

from __future__ import annotations

import itertools
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


SERVICE_NAMESPACE = "promptsweep-service"  # where standing model services live, across sweeps


def actor_name(role: str, i: int, service: str = "") -> str:
    return f"{service}-{role}-{i}" if service else f"lm-{role}-{i}"


def pool_namespace(namespace: str, service: str = "") -> str:
    """The namespace a pool's actors are named in: the run's own, or the standing services'."""
    return SERVICE_NAMESPACE if service else namespace


def start_pool(spec: PoolSpec, namespace: str, timeout_s: float = 900.0, service: str = "") -> list:
    """Start ``spec.replicas`` named actors and wait until every one answers.

    The models are not loaded here: each actor loads its own on the first request that
    needs it, so a sweep answered wholly from the evaluation cache loads none.

    With ``service`` the actors are a standing service: detached (they outlive the sweep, on a
    Ray cluster that does), named ``SERVICE-ROLE-i`` in :data:`SERVICE_NAMESPACE`, and joined
    if they already run, so a later sweep naming the same service loads no model. A running
    service that serves another model is refused rather than silently used.
    """
    if spec.shared_with:
        return []
    if service:
        _check_service(spec, service)
    handles = [
        LMActor.options(
            name=actor_name(spec.role, i, service), namespace=pool_namespace(namespace, service),
            lifetime="detached" if service else None, get_if_exists=bool(service),
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


def connect(role: str, replicas: int, namespace: str, service: str = "") -> list:
    """Handles of a running pool, looked up by name (used inside Tune trials)."""
    return [ray.get_actor(actor_name(role, i, service), namespace=pool_namespace(namespace, service))
            for i in range(replicas)]


def _check_service(spec: PoolSpec, service: str) -> None:
    """A running service must serve this model (the same backend config, runtime settings aside)."""
    from pipelines.lm.cache import model_key

    try:
        running = ray.get_actor(actor_name(spec.role, 0, service), namespace=SERVICE_NAMESPACE)
    except ValueError:
        return  # not running yet: this sweep starts it
    served = ray.get(running.spec.remote(), timeout=60)
    if model_key(served) != model_key(spec.backend):
        raise ModelStartError(
            f"lm.service={service!r} already serves {spec.role} model {served.get('model') or served.get('_target_')!r}, "
            f"not {spec.backend.get('model') or spec.backend.get('_target_')!r}; use another service name, or stop it "
            f"with: python -m pipelines.service stop {service}")


def service_actors(service: str, roles: tuple[str, ...] = ("scorer", "proposer")) -> list[tuple[str, object]]:
    """``(name, handle)`` of every running actor of a standing service (replicas are numbered from 0)."""
    found = []
    for role in roles:
        for i in itertools.count():
            name = actor_name(role, i, service)
            try:
                found.append((name, ray.get_actor(name, namespace=SERVICE_NAMESPACE)))
            except ValueError:
                break
    return found
