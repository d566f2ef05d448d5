"""Standing model services (``lm.service=NAME``): see them and stop them.

Usage::

    python -m pipelines.service status NAME [ray.address=auto]
    python -m pipelines.service stop NAME [ray.address=auto]

A sweep run with ``lm.service=NAME`` on a running Ray cluster leaves its model actors running
(detached, in the ``promptsweep-service`` namespace); the next sweep naming NAME joins them and
loads nothing. ``status`` lists each actor, whether its model is loaded and what it served;
``stop`` kills them. Bad input is one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pipelines.plan import UserError

USAGE = "usage: python -m pipelines.service status NAME | stop NAME  [ray.address=ADDRESS]"


def _connect(address: str) -> None:
    """Join the cluster the way a sweep's driver does (a dead address fails in one line, in seconds)."""
    from pipelines.sweep import start_ray

    start_ray({"ray": {"address": address, "temp_dir": "", "namespace": None}})


def status(name: str = "") -> list[dict]:
    import ray

    from pipelines.lm.pool import service_actors

    rows = []
    for actor_name, handle in service_actors(name):
        stats = ray.get(handle.stats.remote(), timeout=60)
        spec = ray.get(handle.spec.remote(), timeout=60)
        rows.append({"actor": actor_name, "model": spec.get("model") or spec.get("_target_"), **stats})
    return rows


def stop(name: str) -> int:
    import ray

    from pipelines.lm.pool import service_actors

    actors = service_actors(name)
    for _, handle in actors:
        ray.kill(handle, no_restart=True)
    return len(actors)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    address = next((a.split("=", 1)[1] for a in argv if a.startswith("ray.address=")), "auto")
    args = [a for a in argv if not a.startswith("ray.address=")]
    try:
        if not args or args[0] not in ("status", "stop") or len(args) != 2:
            raise UserError(USAGE)
        _connect(address)
        if args[0] == "stop":
            print(f"[promptsweep] service {args[1]!r}: stopped {stop(args[1])} actor(s)")
        else:
            rows = status(args[1])
            for r in rows:
                print(f"{r['actor']}: model {r['model']}, loaded={r['loaded']}, loads={r['loads']}, "
                      f"calls={r['calls']}, requests={r['requests']}")
            if not rows:
                print(f"[promptsweep] no service named {args[1]!r} is running")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
