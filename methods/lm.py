"""What every optimizer may ask of a language model, and the prompt types it hands back.

One small, batched interface: a method builds *all* its requests for a step and sends
them in one call, so whatever sits behind it (a local model, a pool of Ray actors, an
HTTP endpoint) can batch, shard and cache at the boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import numpy as np

# Where token or soft prompts are spliced into a context. Text methods put their
# instruction text in the task's ``{instruction}`` slot; gradient methods put this marker
# there and pass the prompt alongside, so the backend can insert ids or embeddings.
PROMPT_SLOT = "\u2063[[PROMPT]]\u2063"


@dataclass(frozen=True)
class TextPrompt:
    """A natural-language instruction: the text methods' result."""

    text: str

    def describe(self) -> str:
        return self.text


@dataclass(frozen=True)
class TokenPrompt:
    """Discrete trigger tokens (AutoPrompt): vocabulary ids and their decoded text."""

    ids: tuple[int, ...]
    text: str = ""

    def describe(self) -> str:
        return self.text or " ".join(f"<{i}>" for i in self.ids)


@dataclass(frozen=True, eq=False)
class SoftPrompt:
    """Continuous prompt vectors, prepended at the slot.

    Attributes:
        embeddings: float32 array ``[n_virtual, d_model]`` in the LM's input-embedding space.
        nearest: the nearest vocabulary tokens by cosine, for humans reading logs.
    """

    embeddings: np.ndarray
    nearest: tuple[str, ...] = ()

    def describe(self) -> str:
        words = " ".join(self.nearest) if self.nearest else "?"
        return f"<soft {self.embeddings.shape[0]}x{self.embeddings.shape[1]}: {words}>"


@dataclass(frozen=True, eq=False)
class PrefixPrompt:
    """Trainable key/value states prepended at every layer (prefix tuning, Li & Liang 2021).

    The prefix sits before the whole context, where PEFT's prefix tuning puts it, so the
    task's ``{instruction}`` slot stays empty.

    Attributes:
        key_values: float32 array ``[n_virtual, n_layers * 2 * kv_dim]`` in the layout of PEFT's
            ``PrefixEncoder`` weight: per virtual token, layer ``l``'s key states at columns
            ``2l * kv_dim`` and its value states at ``(2l + 1) * kv_dim``, each ``kv_dim`` wide
            as ``[kv_heads, head_dim]``.
        origin: what the prefix started from (e.g. its init text), for humans reading logs.
    """

    key_values: np.ndarray
    origin: str = ""

    def describe(self) -> str:
        shape = f"{self.key_values.shape[0]}x{self.key_values.shape[1]}"
        return f"<prefix {shape}: from {self.origin!r}>" if self.origin else f"<prefix {shape}>"


Prompt = Union[TextPrompt, TokenPrompt, SoftPrompt, PrefixPrompt]
SplicedPrompt = Union[TokenPrompt, SoftPrompt, PrefixPrompt]


@runtime_checkable
class LM(Protocol):
    """A frozen language model, batched at the boundary.

    Every method takes the whole batch; implementations decide how to split it.
    ``prompt`` is either one prompt for every request or one per request (``None`` for a
    request with no spliced prompt). Contexts that carry :data:`PROMPT_SLOT` get the
    prompt's ids or embeddings in its place.
    """

    def loglikelihood(
        self,
        requests: Sequence[tuple[str, str]],
        prompt: SplicedPrompt | Sequence[SplicedPrompt | None] | None = None,
    ) -> np.ndarray:
        """Sum of log-probabilities of each continuation given its context: float64 ``[n]``."""
        ...

    def generate(
        self,
        contexts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> list[list[str]]:
        """``n`` sampled completions per context (greedy when ``temperature == 0``), cut at ``stop``."""
        ...

    def prompt_grad(
        self, requests: Sequence[tuple[str, str]], prompt: SplicedPrompt
    ) -> tuple[float, np.ndarray]:
        """Mean negative log-likelihood of the continuations and its gradient.

        Returns:
            ``(loss, grad)`` where ``grad`` is ``[n_prompt_tokens, d_model]``: with respect to
            the soft embeddings, or to the embeddings of the trigger tokens; for a
            :class:`PrefixPrompt`, shaped like its ``key_values``.
        """
        ...

    def prefix_states(self, text: str) -> np.ndarray:
        """Key/value states of ``text``'s tokens at every layer, in :class:`PrefixPrompt` layout.

        ``[n_tokens, n_layers * 2 * kv_dim]`` float32: a prefix of real words, which is how
        Li & Liang initialize prefix tuning (random prefixes train slowly and unstably).
        """
        ...

    def token_embeddings(self) -> np.ndarray:
        """The input embedding matrix ``[vocab, d_model]`` (float32)."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ...
