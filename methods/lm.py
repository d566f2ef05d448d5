"""What every optimizer may ask of a language model, and the prompt types it hands back.

One small, batched contract: a method builds *all* its requests for a step and sends
them in one call, so whatever sits behind it (a local model, a pool of Ray actors, an
HTTP endpoint) can batch, shard and cache at the boundary.

The contract is narrow: every backend scores continuations, tokenizes and decodes
(:class:`LM`). Everything else is an optional *capability* a backend declares in its
``capabilities`` class attribute (:data:`CAPABILITIES`) and a method declares it needs
(:class:`Needs`), so a sweep that asks an HTTP endpoint for prompt gradients is refused
before it starts rather than minutes into it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, Union, runtime_checkable

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


class Request(NamedTuple):
    """One scoring request: ``log p(continuation | context)``, under ``prompt`` when it has one.

    A request carries its own prompt, so a batch may mix prompts (AutoPrompt scores k trigger
    sets in one call; the LM actor merges batches of trials with different prompts) and no
    layer between a method and the model has to re-align prompts with requests. A context
    that holds :data:`PROMPT_SLOT` gets a token or soft prompt's ids or embeddings there; a
    :class:`PrefixPrompt` is placed before the whole context. Text prompts are not spliced:
    they are rendered into the context.
    """

    context: str
    continuation: str
    prompt: SplicedPrompt | None = None

    @classmethod
    def batch(
        cls, pairs: Sequence[tuple[str, str]], prompt: SplicedPrompt | Sequence[SplicedPrompt | None] | None = None
    ) -> list[Request]:
        """Requests from ``(context, continuation)`` pairs and one prompt for all, or one per pair."""
        pairs = list(pairs)
        if prompt is None or isinstance(prompt, (TokenPrompt, SoftPrompt, PrefixPrompt)):
            return [cls(c, k, prompt) for c, k in pairs]
        prompts = list(prompt)
        if len(prompts) != len(pairs):
            raise ValueError(f"got {len(prompts)} prompts for {len(pairs)} requests; pass one prompt or one per request")
        return [cls(c, k, p) for (c, k), p in zip(pairs, prompts)]


# Optional capabilities, named after the calls they allow. ``prompt_grad`` also covers scoring
# requests that carry token or soft prompts (a backend that splices embeddings can do both);
# ``prefix_states`` covers scoring and gradients under prefix prompts (states at every layer).
GENERATE = "generate"
PROMPT_GRAD = "prompt_grad"
PREFIX_STATES = "prefix_states"
TOKEN_EMBEDDINGS = "token_embeddings"
EXPORT_PROMPT = "export_prompt"
ANSWER_STATES = "answer_states"  # also covers ``output_embeddings``: the two are read together
CAPABILITIES = frozenset({GENERATE, PROMPT_GRAD, PREFIX_STATES, TOKEN_EMBEDDINGS, EXPORT_PROMPT, ANSWER_STATES})


@dataclass(frozen=True)
class Needs:
    """The optional capabilities a method calls, per LM role (see :data:`CAPABILITIES`)."""

    scorer: frozenset[str] = frozenset()
    proposer: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = (self.scorer | self.proposer) - CAPABILITIES
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; expected some of {sorted(CAPABILITIES)}")

    def missing(self, role: str, provided: frozenset[str]) -> list[str]:
        """What ``role`` must provide beyond ``provided``, sorted (empty when it is enough)."""
        return sorted(getattr(self, role) - provided)


PROPOSER_WRITES = Needs(proposer=frozenset({GENERATE}))  # the text methods


@runtime_checkable
class LM(Protocol):
    """A frozen language model, batched at the boundary: what every backend provides.

    ``capabilities`` names the optional calls it also serves (:class:`Generates`,
    :class:`Differentiates`, ``export_prompt``); a caller must not use one it does not declare
    (the sweep checks each method's :class:`Needs` against it before it starts).
    """

    capabilities: frozenset[str]

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        """Sum of log-probabilities of each continuation given its context: float64 ``[n]``."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with no special tokens added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ...


class Generates(Protocol):
    """Capability ``generate``."""

    def generate(
        self,
        contexts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompt: SplicedPrompt | None = None,
    ) -> list[list[str]]:
        """``n`` sampled completions per context (greedy when ``temperature == 0``), cut at ``stop``.

        ``prompt`` (a token, soft or prefix prompt, for all contexts) is spliced at
        :data:`PROMPT_SLOT` as in scoring; only a backend that also declares ``prompt_grad``
        (``prefix_states`` for a prefix) can take one.
        """
        ...


class Differentiates(Protocol):
    """Capabilities ``prompt_grad``, ``prefix_states`` and ``token_embeddings``."""

    def prompt_grad(
        self, requests: Sequence[tuple[str, str]], prompt: SplicedPrompt
    ) -> tuple[float, np.ndarray]:
        """Mean negative log-likelihood of the continuations under ``prompt`` and its gradient.

        The gradient is taken with respect to one prompt, so it is an argument of its own
        rather than a field of each request.

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


class ReadsStates(Protocol):
    """Capability ``answer_states``: what the LM head reads where the answer is predicted.

    AutoPrompt's label search trains a linear probe on these states and ranks vocabulary words
    by the probe's weights against :meth:`output_embeddings`; both calls are needed together.
    """

    def answer_states(self, contexts: Sequence[str], prompt: SplicedPrompt | None = None) -> np.ndarray:
        """Float32 ``[n, d]``: per context, the final hidden state the LM head turns into the
        next token's logits (a causal LM: the last context position after the final norm; a
        masked LM: a ``[MASK]`` after the context, after the MLM head's transform), so that
        ``state @ output_embeddings()[v]`` is token ``v``'s logit up to a bias. ``prompt`` is
        spliced at :data:`PROMPT_SLOT` (or placed first, for a prefix) as in scoring.
        """
        ...

    def output_embeddings(self) -> np.ndarray:
        """The LM head's weight ``[vocab, d]`` (float32): the output word embeddings."""
        ...
