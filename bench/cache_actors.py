"""How many cache lookups and writes a second the cluster's cache actors answer, with 1, 2 and 4 of them.

Usage:
    python bench/cache_actors.py [--clients 8] [--rounds 150] [--keys 64] [--counts 1 2 4]

Each client is a Ray task standing in for a trial: per round it looks up ``--keys`` new keys
through a ``RemoteStore`` (every lookup a miss, as for new prompts), then stores them, as a
trial's ``CachedLM`` does around each LM call. All actors serve one SQLite file
(``cache.actors``). Prints keys/s per actor count, the actors' CPU seconds per key, and the
best count's rate over one actor's on the last line. The clients share the
machine's cores with the actors: on 2 cores the ratio is bounded by what the clients leave
free, so read it as a lower bound of what more actors give on a head node with cores to spare.
It also times SQLite's own writes in one process, the serial part no number of actors removes.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.lm.shared_cache import CACHE_ACTOR, RemoteStore, start_cache_actors  # noqa: E402


@ray.remote(num_cpus=0)
def client(store: RemoteStore, index: int, rounds: int, keys: int) -> int:
    for r in range(rounds):
        batch = [b"%d-%d-%d" % (index, r, k) for k in range(keys)]
        assert not store.get_many(batch)
        store.put_many([(key, -1.25, 12.0) for key in batch])
    return rounds * keys


def measure(count: int, clients: int, rounds: int, keys: int, folder: Path) -> dict:
    namespace = f"cache-bench-{count}"
    handles = start_cache_actors(str(folder / f"evals-{count}.sqlite"), namespace, count)
    store = RemoteStore(CACHE_ACTOR, namespace, count)
    start = time.perf_counter()
    done = sum(ray.get([client.remote(store, i, rounds, keys) for i in range(clients)]))
    wall = time.perf_counter() - start
    stats = ray.get([h.stats.remote() for h in handles])
    for h in handles:
        ray.kill(h)
    cpu = sum(s["cpu_s"] for s in stats)
    return {"actors": count, "keys": done, "wall_s": wall, "keys_s": done / wall, "cpu_us_per_key": 1e6 * cpu / done,
            "gets": [s["get"] for s in stats]}


def _digest(text: bytes) -> bytes:
    """A key shaped like the cache's (a 16-byte hash: inserts land all over the index, not at its end)."""
    return hashlib.blake2b(text, digest_size=16).digest()


def sqlite_put_us(folder: Path, keys: int, rounds: int = 400) -> float:
    """Microseconds per key that one process takes to store new keys, ``keys`` per transaction,
    into a file already holding 50,000: the part that stays serial however many actors there
    are (SQLite writes one transaction at a time)."""
    from pipelines.lm.cache import EvalStore

    store = EvalStore(folder / "writer.sqlite")
    for r in range(50_000 // keys):
        store.put_many([(_digest(b"fill-%d-%d" % (r, k)), -1.25, 12.0) for k in range(keys)])
    batches = [[(_digest(b"new-%d-%d" % (r, k)), -1.25, 12.0) for k in range(keys)] for r in range(rounds)]
    start = time.perf_counter()
    for batch in batches:
        store.put_many(batch)
    return 1e6 * (time.perf_counter() - start) / (rounds * keys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--keys", type=int, default=64, help="keys per lookup (a trial's LM call)")
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    ray.init(num_cpus=max(args.counts) + 1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for count in args.counts:
            rows.append(row := measure(count, args.clients, args.rounds, args.keys, Path(folder)))
            print(f"{count} actor(s): {row['keys_s']:,.0f} keys/s (looked up and stored), "
                  f"{row['cpu_us_per_key']:.0f} us of actor CPU per key, calls per actor {row['gets']}", flush=True)
        writer_us = sqlite_put_us(Path(folder), args.keys)
    ray.shutdown()
    print(f"SQLite alone, one writer: {writer_us:.1f} us a key stored ({1e6 / writer_us:,.0f} keys/s at most, "
          "whatever the number of actors)")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.clients} clients x "
          f"{args.rounds} rounds x {args.keys} keys")
    one = next((r for r in rows if r["actors"] == 1), rows[0])
    best = max(rows, key=lambda r: r["keys_s"])
    print(f"most keys/s with {best['actors']} actor(s): {best['keys_s'] / one['keys_s']:.2f}x one actor's")


if __name__ == "__main__":
    main()
