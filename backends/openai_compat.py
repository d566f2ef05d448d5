"""An ``LM`` backed by an OpenAI-compatible HTTP endpoint (OpenAI, vLLM, llama.cpp servers).

It runs inside the LM actor like any backend (``_target_: backends.openai_compat.OpenAICompatLM``)
and declares one capability, ``generate``.
Only the Python standard library is used.

How each operation maps onto the API, chosen to work with llama-cpp-python's
``llama_cpp.server`` as well as with OpenAI itself:

- ``generate``: ``/v1/completions`` (or ``/v1/chat/completions`` with ``chat=True``: the
  context is sent as one user message and the server applies the model's chat template).
  ``n`` samples are ``n`` separate requests, each with its own seed derived from the
  caller's, because llama.cpp servers silently ignore ``n``. ``max_tokens`` is always at
  least 1: on llama.cpp ``0`` means unlimited.
- ``loglikelihood``: one request per distinct context with ``max_tokens=1`` and the top
  ``top_logprobs`` log-probabilities of the first generated position; a continuation scores
  the log-probability of its *first token* there. (``echo=True`` prompt logprobs are wrong
  on llama.cpp for models without a start token, so they are not used.) A continuation
  absent from the top-k gets an upper bound: ``min(k-th logprob, log(1 - top-k mass))``.
  With a tokenizer endpoint (``tokenizer_path``) a continuation longer than one token is
  an error unless ``multi_token="first"`` accepts scoring it by its first token; without
  one the continuation is looked up verbatim, so it must be a single token (unchecked).
- Prompt gradients, prefix states, token embeddings and spliced token or soft prompts need
  a local model: this backend does not declare them, so a method that needs one is refused
  before the sweep starts.

The API key is read from the environment variable *named* by ``api_key_env`` at each
request; it is never stored on the object, logged, or put in an error message.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np

from methods.lm import GENERATE, Request

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint answered with an error, or not at all, after the allowed retries."""


def _cut(text: str, stop: Sequence[str]) -> str:
    """``text`` before the first of ``stop`` (servers differ in whether they strip stops)."""
    cuts = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


def top_logprobs(choice: dict, chat: bool) -> dict[str, float]:
    """Token text -> log-probability at the first generated position of one response choice.

    Reads the legacy completions shape (``top_logprobs: [{token: lp}]``) and the chat shape
    (``content: [{token, logprob, top_logprobs: [{token, logprob}]}]``), which newer servers
    also use for completions.
    """
    lp = choice.get("logprobs") or {}
    if not chat and lp.get("top_logprobs"):
        top = dict(lp["top_logprobs"][0] or {})
        if lp.get("tokens") and lp.get("token_logprobs"):
            top.setdefault(lp["tokens"][0], lp["token_logprobs"][0])
        return {str(k): float(v) for k, v in top.items()}
    content = lp.get("content") or []
    if not content:
        raise EndpointError("the response carries no logprobs (does the server support logprobs?)")
    first = content[0]
    top = {str(t["token"]): float(t["logprob"]) for t in first.get("top_logprobs") or []}
    top.setdefault(str(first["token"]), float(first["logprob"]))
    return top


def absent_bound(top: dict[str, float]) -> float:
    """Upper bound on the log-probability of a token not among ``top``."""
    rest = 1.0 - sum(math.exp(v) for v in top.values())
    return min(min(top.values()), math.log(rest) if rest > 0 else -math.inf)


class OpenAICompatLM:
    """A model behind an OpenAI-compatible HTTP API.

    Args:
        base_url: e.g. ``http://127.0.0.1:8000`` or ``https://api.openai.com`` (``/v1`` is added).
        model: the model name the server expects (``""``: the server's default).
        api_key_env: NAME of the environment variable holding the key (not the key); unset
            variable = no ``Authorization`` header (local servers).
        chat: use ``/v1/chat/completions`` with the server's chat template (instruct models).
        timeout: seconds per HTTP request.
        max_concurrency: requests in flight at once.
        retries: extra attempts on connection errors, timeouts, 429 and 5xx.
        top_logprobs: alternatives read per scored position (OpenAI allows 5 on completions,
            20 on chat).
        multi_token: ``"error"`` or ``"first"``: what to do with a continuation of several
            tokens (detected only with ``tokenizer_path``).
        tokenizer_path: the server's tokenize endpoint, e.g. ``/extras/tokenize``
            (llama-cpp-python) or ``/tokenize`` (llama.cpp); its ``detokenize`` sibling
            decodes. Without one, token ids are UTF-8 bytes: token counts are then an upper bound.
        price_in_per_1k, price_out_per_1k: US dollars per 1,000 prompt / completion tokens
            (read by the budget; the client itself ignores them).
    """

    capabilities = frozenset({GENERATE})

    def __init__(
        self,
        base_url: str,
        model: str = "",
        api_key_env: str = "OPENAI_API_KEY",
        chat: bool = False,
        timeout: float = 120.0,
        max_concurrency: int = 4,
        retries: int = 2,
        top_logprobs: int = 20,
        multi_token: str = "error",
        tokenizer_path: str = "",
        price_in_per_1k: float = 0.0,
        price_out_per_1k: float = 0.0,
    ) -> None:
        if api_key_env and not ENV_NAME.match(api_key_env):
            # Never echo the value: it may be the key itself, pasted in the wrong place.
            raise ValueError("api_key_env must be the NAME of an environment variable holding the key, not the key")
        if multi_token not in ("error", "first"):
            raise ValueError(f"multi_token={multi_token!r}: expected 'error' or 'first'")
        if max_concurrency < 1 or top_logprobs < 1:
            raise ValueError("max_concurrency and top_logprobs must be >= 1")
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.model, self.api_key_env, self.chat = model, api_key_env, chat
        self.timeout, self.retries, self.k = timeout, retries, top_logprobs
        self.multi_token, self.tokenizer_path = multi_token, tokenizer_path
        self.name = model or self.base_url
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency)
        self._tokens: dict[str, list[int]] = {}
        self._lead: list[int] | None = None

    # ------------------------------------------------------------------ HTTP

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, path: str, body: dict) -> dict:
        """POST JSON, retrying transient failures with exponential backoff."""
        data = json.dumps(body).encode()
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.base_url + path, data=data, headers=self._headers(), method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                detail = self._scrub(err.read(500).decode("utf-8", "replace"))
                if err.code not in RETRY_STATUS or attempt == self.retries:
                    hint = f" (is ${self.api_key_env} set?)" if err.code == 401 else ""
                    raise EndpointError(f"POST {path}: HTTP {err.code}{hint}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as err:
                if attempt == self.retries:
                    raise EndpointError(f"POST {self.base_url + path}: {self._scrub(str(err))}") from None
            time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def _scrub(self, text: str) -> str:
        """``text`` with the key removed, in case a server echoes the request headers."""
        key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
        return text.replace(key, "***") if key else text

    def _body(self, context: str, **extra) -> tuple[str, dict]:
        """Endpoint and request body for ``context`` as a completion prompt or a user message."""
        model = {"model": self.model} if self.model else {}
        if self.chat:
            return "/v1/chat/completions", {**model, "messages": [{"role": "user", "content": context}], **extra}
        return "/v1/completions", {**model, "prompt": context, **extra}

    def _map(self, fn, items: list) -> list:
        return list(self._pool.map(fn, items))

    # ------------------------------------------------------------------ LM protocol

    def generate(
        self,
        contexts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompt=None,
    ) -> list[list[str]]:
        """``n`` completions per context: one request per (context, sample), each seeded."""
        if prompt is not None:
            raise TypeError("an HTTP endpoint takes text only; token, soft and prefix prompts need a local model")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: must be >= 1 (0 means unlimited on llama.cpp servers)")
        base = int(np.random.SeedSequence().entropy % 2**31) if seed is None else int(seed)
        draws = n if temperature > 0 else 1  # greedy samples are all the same
        jobs = [(i, j) for i in range(len(contexts)) for j in range(draws)]
        settings = {"max_tokens": int(max_new_tokens), "temperature": float(temperature)}
        if stop:
            settings["stop"] = list(stop)

        def one(job: tuple[int, int]) -> str:
            i, j = job
            path, body = self._body(contexts[i], **settings, seed=(base + 1_000_003 * i + 7919 * j) % 2**31)
            choice = self._post(path, body)["choices"][0]
            text = choice["message"]["content"] if self.chat else choice["text"]
            return _cut(text or "", stop)

        texts = dict(zip(jobs, self._map(one, jobs)))
        return [[texts[(i, j % draws)] for j in range(n)] for i in range(len(contexts))]

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        """Log-probability of each continuation's first token after its context: float64 ``[n]``."""
        requests = list(requests)
        if any(r.prompt is not None for r in requests):
            raise TypeError("token, soft and prefix prompts go into a local model's embeddings or states; "
                            "an HTTP endpoint takes text only")
        contexts = list(dict.fromkeys(r.context for r in requests))
        tops = dict(zip(contexts, self._map(self._top, contexts)))
        firsts = {k: self._first_token(k) for k in dict.fromkeys(r.continuation for r in requests)}
        out = np.empty(len(requests), dtype=np.float64)
        for r, (context, continuation, _) in enumerate(requests):
            top = tops[context]
            out[r] = top.get(firsts[continuation], absent_bound(top))
        return out

    def _top(self, context: str) -> dict[str, float]:
        extra = {"logprobs": True, "top_logprobs": self.k} if self.chat else {"logprobs": self.k}
        path, body = self._body(context, max_tokens=1, temperature=0.0, **extra)
        return top_logprobs(self._post(path, body)["choices"][0], self.chat)

    def _first_token(self, continuation: str) -> str:
        """The text of the token a continuation starts with, as the server's logprobs name it."""
        # A chat reply opens a new turn: its first token carries no separating space.
        text = continuation.lstrip() if self.chat else continuation
        if not self.tokenizer_path:
            return text
        ids = self.tokenize(text)
        if len(ids) > 1 and self.multi_token == "error":
            raise ValueError(
                f"continuation {continuation!r} is {len(ids)} tokens; this endpoint scores only a first token "
                "(set multi_token=first to accept that, or use a local model)"
            )
        return self.decode(ids[:1]) if ids else text

    def tokenize(self, text: str) -> list[int]:
        """Server token ids of ``text`` (no start token); UTF-8 bytes without a tokenizer endpoint."""
        if not self.tokenizer_path:
            return list(text.encode("utf-8"))
        if text not in self._tokens:
            if self._lead is None:  # what the server adds to every text (a start token, or nothing)
                self._lead = self._server_tokens("")
            ids = self._server_tokens(text)
            if len(self._tokens) > 100_000:  # bounded: texts are mostly distinct prompts
                self._tokens.clear()
            self._tokens[text] = ids[len(self._lead) :] if ids[: len(self._lead)] == self._lead else ids
        return list(self._tokens[text])

    def _server_tokens(self, text: str) -> list[int]:
        model = {"model": self.model} if self.model else {}
        # "input" for llama-cpp-python, "content" for llama.cpp; each ignores the other.
        return [int(t) for t in self._post(self.tokenizer_path, {**model, "input": text, "content": text})["tokens"]]

    def decode(self, ids: Sequence[int]) -> str:
        if not self.tokenizer_path:
            return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
        path = self.tokenizer_path.replace("tokenize", "detokenize")
        model = {"model": self.model} if self.model else {}
        out = self._post(path, {**model, "tokens": [int(i) for i in ids]})
        return out.get("text", out.get("content", ""))
