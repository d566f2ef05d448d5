"""A persistent evaluation cache shared by every trial of a sweep and by later re-runs.

Results are keyed by (model identity, request content, decoding settings) and kept in one
SQLite file (WAL mode: many reader and writer processes on one machine). The trial wraps
its LM in :class:`CachedLM`, which looks every request of a call up at once and sends only
the misses to the model, in one call. Two methods proposing the same prompt, or a re-run of
the same sweep, therefore cost no new model calls. Every other call passes through.

What is cached:
    - ``loglikelihood``: per request, keyed by context, continuation and the spliced token
      or soft prompt (its exact bytes). Scores are deterministic, so any caller may reuse them.
    - greedy ``generate`` (``temperature == 0``): per context, keyed by the context, the
      decoding settings and the spliced prompt, like scoring: two methods (or two trials) that
      render the same prompt for the same example share one generation, and a call sends only
      the contexts nobody has generated yet.
    - sampled ``generate``: per whole call, and only with an explicit ``seed``. The backend
      derives each sample's random stream from the seed and the request's place in the call
      (and the pool's replica count), so the same call with the same seed is the same draw; a
      cached one stays that draw even if the pool changes. A sampled call with ``seed=None``
      always goes to the model (fresh samples are what the caller asked for).
    - ``prompt_grad`` is training, never cached.

The cache is never invalidated: a key names everything the answer depends on. Delete the
file to start over (e.g. after changing a model's weights under an unchanged name).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from methods.lm import PrefixPrompt, Request, SoftPrompt, TokenPrompt
from pipelines.lm.client import forward_to_inner

# Model-config keys that change how fast a model runs, not what it answers.
RUNTIME_KEYS = frozenset({
    "max_batch_tokens", "threads", "device", "cache_dir", "timeout", "max_concurrency", "retries",
    "api_key_env", "price_in_per_1k", "price_out_per_1k", "trust_remote_code", "min_prefix",
})
CHUNK = 500  # keys per ``IN (...)`` query: far under SQLite's bound-variable limit


def default_path() -> Path:
    """``$PROMPTSWEEP_CACHE/evals.sqlite`` (the models' cache root), else ``~/.cache/promptsweep/evals.sqlite``."""
    root = os.environ.get("PROMPTSWEEP_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "promptsweep") / "evals.sqlite"


SHARED_MODES = ("auto", "file", "actor")  # how trials reach the store (shared_cache.py)
NODE_DEFAULT = "@node-default"  # each node's own default file (what trials get when cache.path is unset)


def cache_path(cache_cfg: dict | None) -> str:
    """The store's absolute path from the ``cache`` config block; ``""`` when caching is off."""
    cache_cfg = cache_cfg or {}
    if not cache_cfg.get("enabled", True):
        return ""
    return str(Path(cache_cfg.get("path") or default_path()).expanduser().resolve())


def trial_cache_path(cache_cfg: dict | None) -> str:
    """What trials open: the configured path, or :data:`NODE_DEFAULT` when none is set.

    The default file lives under each machine's own cache root (``$PROMPTSWEEP_CACHE`` or
    ``~/.cache``): on a cluster every node has one of its own, which is why a multi-node
    sweep serves the cache from one actor instead (``shared_cache.py``).
    """
    if not (cache_cfg or {}).get("enabled", True):
        return ""
    return cache_path(cache_cfg) if (cache_cfg or {}).get("path") else NODE_DEFAULT


def node_path(path: str) -> str:
    """A trial's cache path on the node it runs on."""
    return str(default_path().expanduser().resolve()) if path == NODE_DEFAULT else path


def shared_mode(cache_cfg: dict | None) -> str:
    """``cache.shared``, checked: how trials reach the store (``shared_cache.py``)."""
    mode = (cache_cfg or {}).get("shared", "auto")
    if mode not in SHARED_MODES:
        raise ValueError(f"cache.shared={mode!r}; expected one of {', '.join(SHARED_MODES)}")
    return mode


def describe(cache_cfg: dict | None) -> str:
    """The line printed before a sweep starts; opens (creates) the store so a bad path fails early.

    Raises:
        ValueError: the store cannot be opened, in one line.
    """
    shared_mode(cache_cfg)
    path = cache_path(cache_cfg)
    if not path:
        return "[promptsweep] evaluation cache: off"
    try:
        n = len(EvalStore(path))
    except (OSError, sqlite3.Error) as err:
        raise ValueError(f"cannot open the evaluation cache {path}: {err} (set cache.path or cache.enabled=false)") from err
    return f"[promptsweep] evaluation cache: {path} ({n:,} stored results)"


def model_key(model: dict) -> str:
    """Identity of a model config: its name plus a hash of everything that can change its answers.

    The whole config counts (``_target_``, name, dtype, engine, ...), less the keys in
    :data:`RUNTIME_KEYS`: a different dtype is a different model; a bigger batch is not.
    """
    kept = {k: v for k, v in model.items() if k not in RUNTIME_KEYS}
    digest = hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{model.get('model') or kept.get('_target_', 'model')}:{digest}"


def _digest(*parts) -> bytes:
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).digest()


def prompt_id(prompt) -> str:
    """A content id for a spliced prompt: ``""`` for none, exact ids or embedding bytes otherwise."""
    if prompt is None:
        return ""
    if isinstance(prompt, TokenPrompt):
        return "tok:" + ",".join(map(str, prompt.ids))
    if isinstance(prompt, (SoftPrompt, PrefixPrompt)):
        kind, arr = ("soft", prompt.embeddings) if isinstance(prompt, SoftPrompt) else ("prefix", prompt.key_values)
        arr = np.ascontiguousarray(arr)
        return f"{kind}:{arr.dtype}:{arr.shape}:" + hashlib.sha256(arr.tobytes()).hexdigest()
    raise TypeError(f"cannot key a prompt of type {type(prompt).__name__}")


class EvalStore:
    """A key -> (JSON value, tokens) table in one SQLite file, safe for concurrent processes.

    Each process opens its own connection on first use. Writes run in ``BEGIN IMMEDIATE``
    transactions (a writer waits for the lock up front instead of failing on upgrade), and
    ``INSERT OR IGNORE`` lets two trials that computed the same result both store it.

    Args:
        path: the SQLite file (its folder is created).
        timeout_s: how long a writer waits for another process's transaction.
    """

    def __init__(self, path: str | Path, timeout_s: float = 120.0) -> None:
        self.path = Path(path)
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # a connection does not cross processes; reopen there
        return {"path": self.path, "timeout_s": self.timeout_s}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
            conn.execute("CREATE TABLE IF NOT EXISTS evals (key BLOB PRIMARY KEY, value TEXT NOT NULL, tokens REAL NOT NULL) WITHOUT ROWID")
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, tuple[object, float]]:
        """The stored ``(value, tokens)`` of every key present."""
        found: dict[bytes, tuple[object, float]] = {}
        unique = list(dict.fromkeys(keys))
        with self._lock:
            db = self._db()
            for i in range(0, len(unique), CHUNK):
                chunk = unique[i : i + CHUNK]
                rows = db.execute(f"SELECT key, value, tokens FROM evals WHERE key IN ({','.join('?' * len(chunk))})", chunk)
                found.update((bytes(k), (json.loads(v), t)) for k, v, t in rows)
        return found

    def put_many(self, items: Iterable[tuple[bytes, object, float]]) -> None:
        """Store ``(key, value, tokens)`` rows in one transaction (existing keys are kept)."""
        rows = [(k, json.dumps(v), float(t)) for k, v, t in items]
        if not rows:
            return
        with self._lock:
            db = self._db()
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT OR IGNORE INTO evals (key, value, tokens) VALUES (?, ?, ?)", rows)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def __len__(self) -> int:
        with self._lock:
            return self._db().execute("SELECT count(*) FROM evals").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


def _spread(total: float, weights: Sequence[float]) -> list[float]:
    """``total`` split in proportion to ``weights`` (what each cached request is said to have cost)."""
    s = float(sum(weights))
    return [total * w / s for w in weights] if s > 0 else [0.0] * len(weights)


class CachedLM:
    """An ``LM`` that answers from an :class:`EvalStore` and sends only the misses on.

    Args:
        inner: the LM doing the work. Its ``usage`` (a ``Meter``) counts the calls, requests
            and tokens that reached the model; this class adds what the cache answered
            (``cache_calls``, ``cache_hits``, ``cache_tokens``).
        store: the shared store.
        model_key: the model's identity (:func:`model_key`); part of every key.
    """

    def __init__(self, inner, store: EvalStore, model_key: str) -> None:
        self.inner, self.store, self.model_key = inner, store, model_key

    __getattr__ = forward_to_inner  # gradients, embeddings, tokenizing: never cached

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        requests = list(requests)
        ids: dict[int, str] = {}  # one hash per distinct prompt object (soft prompts are big)
        for r in requests:
            if id(r.prompt) not in ids:
                ids[id(r.prompt)] = prompt_id(r.prompt)
        keys = [_digest("ll", self.model_key, r.context, r.continuation, ids[id(r.prompt)]) for r in requests]
        scores = self._per_item(keys, requests, lambda todo: [float(x) for x in self.inner.loglikelihood(todo)],
                                lambda r, _: len(r.context) + len(r.continuation))
        return np.array(scores, dtype=np.float64)

    def _per_item(self, keys: list[bytes], items: list, compute, weight) -> list:
        """The stored value of every key; the missing ones computed in one call and stored.

        ``compute(todo)`` gets the first item of each missing key, in order; each new value is
        charged its share of the call's tokens in proportion to ``weight(item, value)``.
        """
        found = self.store.get_many(keys)
        missing = list(dict.fromkeys(k for k in keys if k not in found))
        self._count_hits([found[k][1] for k in keys if k in found], whole_call=bool(keys) and not missing)
        if missing:
            first: dict[bytes, object] = {}
            for k, item in zip(keys, items):
                first.setdefault(k, item)
            todo = [first[k] for k in missing]
            before = self.usage.tokens
            values = compute(todo)
            tokens = _spread(self.usage.tokens - before, [weight(x, v) for x, v in zip(todo, values)])
            new = list(zip(missing, values, tokens))
            self.store.put_many(new)
            found.update((k, (v, t)) for k, v, t in new)
        return [found[k][0] for k in keys]

    def _count_hits(self, tokens: Sequence[float], whole_call: bool) -> None:
        """Record requests answered from the cache (``tokens``: what each cost when computed)."""
        self.usage.cache_hits += len(tokens)
        self.usage.cache_tokens += float(sum(tokens))
        self.usage.cache_calls += int(whole_call)

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=(), prompt=None):
        contexts = list(contexts)
        call = dict(max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed, stop=tuple(stop))
        if prompt is not None:
            call["prompt"] = prompt
        if not contexts or (temperature > 0 and seed is None):  # fresh samples were asked for
            return self.inner.generate(contexts, **call)
        if temperature <= 0:
            return self._greedy(contexts, call, n)
        settings = [max_new_tokens, float(temperature), n, seed, list(stop)]
        if prompt is not None:  # appended only when present, so keys stored before prompts existed stay valid
            settings.append(prompt_id(prompt))
        key = _digest("gen", self.model_key, contexts, settings)
        hit = self.store.get_many([key]).get(key)
        if hit is not None:
            self._count_hits(_spread(hit[1], [1.0] * max(len(contexts) * n, 1)), whole_call=True)
            return [list(row) for row in hit[0]]
        before = self.usage.tokens
        out = self.inner.generate(contexts, **call)
        self.store.put_many([(key, out, self.usage.tokens - before)])
        return out

    def _greedy(self, contexts: list[str], call: dict, n: int) -> list[list[str]]:
        """Greedy completions, one cache entry per distinct context; only the misses are generated."""
        settings = [call["max_new_tokens"], list(call["stop"]), prompt_id(call.get("prompt"))]
        keys = [_digest("greedy", self.model_key, c, settings) for c in contexts]
        texts = self._per_item(keys, contexts, lambda todo: [o[0] for o in self.inner.generate(todo, **{**call, "n": 1})],
                               lambda c, out: len(c) + len(out))
        return [[t] * n for t in texts]
