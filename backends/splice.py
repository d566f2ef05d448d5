"""Turning (context, continuation, prompt) requests into token rows and a forward-pass plan.

Pure Python and NumPy: no model here, so the planning logic is cheap to test and reason about.

A context becomes a sequence of integer *keys*: a key ``>= 0`` is a vocabulary id and a
key ``< 0`` is row ``-key - 1`` of a per-call *soft table* (soft prompt vectors spliced at
:data:`methods.lm.PROMPT_SLOT`). Keys compare like ids, so requests that share a prompt
share key prefixes and the planner can reuse their KV cache.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import TypeVar

import numpy as np

from methods.lm import PROMPT_SLOT, PrefixPrompt, Request, SoftPrompt, TextPrompt

T = TypeVar("T")


@dataclass
class Row:
    """One sequence to run through the model and what to read off it.

    Attributes:
        keys: token ids (or negative soft-table keys), the model's input.
        targets: ``(position, token id, request index)``: add ``log p(token | keys[:position + 1])``
            to that request's score.
    """

    keys: tuple[int, ...]
    targets: list[tuple[int, int, int]] = field(default_factory=list)

    def first_target(self) -> int:
        """Position of the earliest logit this row must produce."""
        return min((t[0] for t in self.targets), default=len(self.keys) - 1)


@dataclass(frozen=True)
class Group:
    """Rows sharing their first ``prefix_len`` keys: the prefix runs once, the suffixes batched."""

    prefix_len: int
    rows: tuple[Row, ...]


class Encoder:
    """Tokenizes requests the way the backend scores them.

    Context and continuation are tokenized separately (the continuation's ids are exactly
    ``tokenize(continuation)``). The tokenizer's BOS is prepended when its own encoding adds
    one; an otherwise empty context gets a start token so the first continuation token
    has a position to be predicted from.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        with_special = tokenizer("a")["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        bos = tokenizer.bos_token_id
        self.bos: tuple[int, ...] = (bos,) if len(with_special) > len(without) and with_special[0] == bos else ()
        start = bos if bos is not None else tokenizer.eos_token_id
        self.start: tuple[int, ...] = self.bos or ((start,) if start is not None else ())
        self._cache: dict[str, tuple[int, ...]] = {}

    def ids(self, texts: Sequence[str]) -> list[tuple[int, ...]]:
        """Token ids of each text, no special tokens; memoized (contexts repeat across calls)."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if todo:
            encoded = self.tokenizer(todo, add_special_tokens=False)["input_ids"]
            if len(self._cache) > 200_000:  # a long sweep should not grow memory without bound
                self._cache.clear()
            self._cache.update(zip(todo, map(tuple, encoded)))
        return [self._cache[t] for t in texts]

    def context(self, text: str, spliced: tuple[int, ...] | None) -> tuple[int, ...]:
        """Keys of a context, with ``spliced`` keys at each slot (prepended when there is none)."""
        parts = text.split(PROMPT_SLOT)
        if spliced is None:
            if len(parts) > 1:
                raise ValueError("context contains PROMPT_SLOT but no token or soft prompt was given")
            keys = self.ids(parts)[0]
        elif len(parts) == 1:
            keys = spliced + self.ids(parts)[0]
        else:
            pieces = self.ids(parts)
            keys = pieces[0] + sum((spliced + p for p in pieces[1:]), ())
        keys = self.bos + keys
        return keys if keys else self.start


class SoftTable:
    """Soft prompt vectors of one call, stacked; each distinct prompt gets its own key range."""

    def __init__(self) -> None:
        self.blocks: list[np.ndarray] = []
        self._offset: dict[int, tuple[int, ...]] = {}
        self.size = 0

    def keys(self, prompt: SoftPrompt) -> tuple[int, ...]:
        """Negative keys standing for ``prompt``'s rows (identity-keyed: prompts are arrays)."""
        if id(prompt) not in self._offset:
            emb = np.asarray(prompt.embeddings, dtype=np.float64)
            if emb.ndim != 2:
                raise ValueError(f"soft prompt embeddings must be [n_virtual, d_model], got shape {emb.shape}")
            self.blocks.append(emb)
            self._offset[id(prompt)] = tuple(-(self.size + j) - 1 for j in range(emb.shape[0]))
            self.size += emb.shape[0]
        return self._offset[id(prompt)]

    def array(self) -> np.ndarray | None:
        """All rows ``[size, d_model]`` in key order, or ``None`` when no soft prompt was used."""
        return np.concatenate(self.blocks, axis=0) if self.blocks else None


def encode_requests(
    encoder: Encoder, requests: Sequence[Request]
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]], SoftTable]:
    """Context keys and continuation ids of every request, plus the soft table they refer to."""
    table = SoftTable()
    conts = encoder.ids([r.continuation for r in requests])
    contexts = []
    for text, _, prompt in requests:
        if isinstance(prompt, TextPrompt):
            text, spliced = _splice_text(text, prompt.text), None
        elif isinstance(prompt, SoftPrompt):
            spliced = table.keys(prompt)
        elif isinstance(prompt, PrefixPrompt):
            raise TypeError("a prefix prompt is not spliced into the context; score its requests with their prefix states")
        else:
            spliced = None if prompt is None else tuple(int(i) for i in prompt.ids)
        contexts.append(encoder.context(text, spliced))
    return contexts, conts, table


def _splice_text(context: str, text: str) -> str:
    """A text prompt goes in the slot as text (prepended when there is no slot)."""
    return context.replace(PROMPT_SLOT, text) if PROMPT_SLOT in context else text + context


def build_rows(contexts: Sequence[tuple[int, ...]], conts: Sequence[tuple[int, ...]]) -> list[Row]:
    """The fewest rows that give every request's continuation log-probabilities.

    Requests sharing a context share a row: single-token continuations are all read at the
    context's last position. A row that is a prefix of another row is dropped and its targets
    moved there (causal attention makes the shared positions' logits identical).
    """
    by_context: dict[tuple[int, ...], dict[tuple[int, ...], Row]] = {}
    for i, (ctx, cont) in enumerate(zip(contexts, conts)):
        rows = by_context.setdefault(ctx, {})
        row = rows.setdefault(ctx + cont[:-1], Row(ctx + cont[:-1]))
        row.targets += [(len(ctx) - 1 + k, tok, i) for k, tok in enumerate(cont)]
    rows = _merge_prefix_rows([row for rows in by_context.values() for row in rows.values()])
    return [row for row in rows if row.targets]  # empty continuations score 0 without a forward


def _merge_prefix_rows(rows: list[Row]) -> list[Row]:
    """Fold each row into the next one in sorted order when it is that row's prefix."""
    rows = sorted(rows, key=lambda r: r.keys)
    kept = []
    for row, nxt in zip(rows, rows[1:] + [None]):
        if nxt is not None and nxt.keys[: len(row.keys)] == row.keys:
            nxt.targets += row.targets
        else:
            kept.append(row)
    return kept


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two key sequences."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def plan_groups(rows: Sequence[Row], min_prefix: int = 8) -> list[Group]:
    """Partition rows into prefix-sharing groups (plus one group of prefix 0 for the rest).

    Rows are sorted lexicographically, so rows sharing a prefix are neighbours. A row joins
    the running group when the shrunken common prefix stays >= ``min_prefix`` and the
    extra suffix work for the rows already in the group, ``(k - 1) * (P - P')``, is at most the
    ``P'`` tokens the new row saves. The shared prefix never covers a position whose logits
    are needed, so every target lies in the suffix.
    """
    rows = sorted(rows, key=lambda r: r.keys)
    groups, loose = [], []
    if not rows:
        return groups
    cur, p = [rows[0]], rows[0].first_target()
    for prev, row in pairwise(rows):
        p_new = min(p, common_prefix(prev.keys, row.keys), row.first_target())
        if p_new >= min_prefix and (len(cur) - 1) * (p - p_new) <= p_new:
            cur.append(row)
            p = p_new
            continue
        _close(cur, p, groups, loose)
        cur, p = [row], row.first_target()
    _close(cur, p, groups, loose)
    if loose:
        groups.append(Group(0, tuple(loose)))
    return groups


def _close(rows: list[Row], prefix_len: int, groups: list[Group], loose: list[Row]) -> None:
    """A group of one row saves nothing by caching: it joins the loose rows."""
    if len(rows) > 1:
        groups.append(Group(prefix_len, tuple(rows)))
    else:
        loose.extend(rows)


def batches(
    items: Sequence[T],
    length: Callable[[T], int],
    max_tokens: int,
    min_tokens: int = 256,
    waste: float = 0.05,
) -> list[list[T]]:
    """Length-sorted batches: padded size ``items * longest`` within ``max_tokens``, little padding.

    A batch grows while it is smaller than ``min_tokens`` (below that the matmuls run
    inefficiently) or while its padding stays under ``waste`` of its padded size, so rows of
    very different lengths do not share a batch.

    Args:
        items: rows (or generation jobs) to batch.
        length: tokens an item occupies in a batch.
        max_tokens: padded-token budget per batch (a longer item still gets a batch of its own).
        min_tokens: batches below this size accept any item that fits.
        waste: largest fraction of padding tolerated above ``min_tokens``.
    """
    out: list[list[T]] = []
    real = 0
    for item in sorted(items, key=length):
        n = length(item)
        padded = (len(out[-1]) + 1) * n if out else 0
        if out and padded <= max_tokens and (padded <= min_tokens or real + n >= (1 - waste) * padded):
            out[-1].append(item)
            real += n
        else:
            out.append([item])
            real = n
    return out


def suffix_length(start: int) -> Callable[[Row], int]:
    """Tokens a row runs when its first ``start`` keys come from a cached prefix."""
    return lambda row: len(row.keys) - start
