"""One LM role as the driver and every trial hold it: the shared actors, the cache, the budget.

:func:`role_lm` is the only place the layers are put together, so the driver's start-up
checks and the trials see the same cache keys and the same counters, and nothing outside
this module reaches into a layer.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass

import hydra.utils

from methods.lm import LM
from pipelines.lm.budget import BudgetedLM, Limits, Price
from pipelines.lm.cache import CachedLM, EvalStore, node_path
from pipelines.lm.client import Meter, RayLM


@dataclass(frozen=True)
class RoleLM:
    """One LM role (scorer or proposer).

    Attributes:
        lm: what methods call: the role's actors, behind the evaluation cache, behind its budget.
        unbudgeted: the same actors and cache outside the budget: scoring the final prompt on
            test (that is the report, not the search), exporting it, the driver's checks.
        meter: what the role used; every layer counts into it, and a checkpoint saves it.
        capabilities: what the backend declares.
    """

    lm: LM
    unbudgeted: LM
    meter: Meter
    capabilities: frozenset[str]


def role_lm(
    handles: list,
    capabilities: frozenset[str],
    *,
    cache_path: str = "",
    model_key: str = "",
    limits: Limits = Limits(),
    role: str = "scorer",
    price: Price = Price(),
    store=None,
) -> RoleLM:
    """The role's stack over its actor ``handles``: ``RayLM`` -> ``CachedLM`` (when a cache path or a
    ``store`` is given: the cluster's cache actor, see ``shared_cache.py``) -> ``BudgetedLM``."""
    meter = Meter()
    lm = RayLM(handles, capabilities=capabilities, usage=meter)
    if store is not None:
        lm = CachedLM(lm, store, model_key)
    elif cache_path:
        lm = CachedLM(lm, EvalStore(node_path(cache_path)), model_key)
    return RoleLM(BudgetedLM(lm, limits, role, price), lm, meter, capabilities)


def backend_capabilities(target: str) -> frozenset[str]:
    """The capabilities a backend named by a ``_target_`` declares, read without building it.

    A class declares them in its ``capabilities`` attribute; a factory function through its
    return type (``def tiny_backend(...) -> HFBackend``).

    Raises:
        ValueError: the target cannot be imported, or declares no capabilities, in one line.
    """
    try:
        obj = hydra.utils.get_object(target)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"cannot import backend {target!r}: {err}") from err
    if not inspect.isclass(obj):
        obj = typing.get_type_hints(obj).get("return", obj)
    caps = getattr(obj, "capabilities", None)
    if not isinstance(caps, frozenset):
        raise ValueError(f"backend {target!r} declares no capabilities (a frozenset class attribute; "
                         "a factory names its class as its return type)")
    return caps
