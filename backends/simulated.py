"""A stand-in model with a fixed cost per batch: for measuring and rehearsing orchestration.

``SimulatedModel`` answers every call after sleeping ``batch_s + item_s * len(batch)`` per
slice of at most ``max_batch`` items: the shape of a GPU forward pass, whose time is nearly
flat up to a batch size and grows with the number of batches past it. Generation adds
``token_s`` per new token to each pass, since decoding is one forward pass per token. The sleep releases the
GIL and uses no CPU, so a replica of it stands in for one GPU without taking a core, and
every CPU second measured on its actor is overhead (Ray, batching, serialization), not model
work. ``bench/scaling.py`` runs sweeps of 16 to 256 trials against replicas of it.

Its answers are deterministic functions of the request text (a hash), so runs repeat and
the evaluation cache behaves as with a real model; they carry no meaning. Scores rank prompts
at random, and generated text is hashed words wrapped in ``<prompt>`` tags (the answer format
EvoPrompt and Promptbreeder parse). Never report a score from it.

    python -m pipelines.run model@lm.scorer=simulated model@lm.proposer=simulated \\
        lm.scorer.batch_s=0.05 ...
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import numpy as np

from methods.lm import GENERATE, Request

WORDS = ("classify", "the", "sentiment", "of", "review", "answer", "positive", "negative", "text", "label",
         "decide", "whether", "tone", "is", "movie", "sentence", "read", "carefully", "and", "choose")


def _hash(*parts: object) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


class SimulatedModel:
    """Fixed latency per batch, hashed answers; see the module docstring.

    Args:
        batch_s: seconds each batch of up to ``max_batch`` items takes, whatever its size.
        item_s: seconds added per item (the part of a forward pass that grows with the batch).
        max_batch: items per simulated forward pass; a larger call is several passes.
        token_s: seconds per generated token per pass (``max_new_tokens`` of them: no early stop).
        tokens_per_word: how many token ids ``tokenize`` gives each whitespace-separated word.
    """

    capabilities = frozenset({GENERATE})

    def __init__(self, batch_s: float = 0.05, item_s: float = 0.0, max_batch: int = 256, token_s: float = 0.0,
                 tokens_per_word: int = 1) -> None:
        if min(batch_s, item_s, token_s) < 0:
            raise ValueError(f"batch_s, item_s and token_s must be >= 0, got {batch_s}, {item_s} and {token_s}")
        if max_batch < 1 or tokens_per_word < 1:
            raise ValueError(f"max_batch and tokens_per_word must be >= 1, got {max_batch} and {tokens_per_word}")
        self.batch_s, self.item_s, self.max_batch, self.tokens_per_word = batch_s, item_s, max_batch, tokens_per_word
        self.token_s = token_s
        self.batches = 0  # simulated forward passes so far (tests read it)

    def _wait(self, n_items: int, new_tokens: int = 0) -> None:
        passes = -(-n_items // self.max_batch)
        self.batches += passes
        time.sleep(passes * (self.batch_s + new_tokens * self.token_s) + n_items * self.item_s)

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        """A log-probability in (-10, 0] per request, from a hash of its context and continuation."""
        requests = list(requests)
        if requests:
            self._wait(len(requests))
        return np.array([-10.0 * (_hash(r.context, r.continuation) % 10_000) / 10_000 for r in requests])

    def generate(self, contexts: Sequence[str], *, max_new_tokens: int, temperature: float = 1.0, n: int = 1,
                 seed: int | None = None, stop: Sequence[str] = (), prompt=None) -> list[list[str]]:
        """``n`` tagged strings of hashed words per context (greedy: the same for every sample)."""
        if prompt is not None:
            raise ValueError("the simulated model takes no spliced prompt")
        contexts = list(contexts)
        if contexts:
            self._wait(len(contexts) * n, max_new_tokens)
        return [[self._text(c, seed if temperature > 0 else None, i if temperature > 0 else 0, max_new_tokens, stop)
                 for i in range(n)] for c in contexts]

    def _text(self, context: str, seed: int | None, i: int, max_new_tokens: int, stop: Sequence[str]) -> str:
        rng = np.random.default_rng(_hash(context, seed, i))
        n_words = max(1, min(12, max_new_tokens // self.tokens_per_word - 4))
        text = f"<prompt>{' '.join(rng.choice(WORDS, size=n_words))}.</prompt>"
        for s in stop:
            if s and s in text:
                text = text[: text.index(s)]
        return text

    def tokenize(self, text: str) -> list[int]:
        return [(_hash(w) + k) % 50_000 for w in text.split() for k in range(self.tokens_per_word)]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(f"t{i}" for i in ids)
