"""Pieces of sampling that need no model: stop strings, per-row generators, token choice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def eos_ids(model, tokenizer) -> list[int]:
    """Token ids that end a completion: the generation config's EOS ids and the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def row_generator(seed: int, i: int, j: int, device: torch.device) -> torch.Generator:
    """A generator private to sample ``j`` of context ``i``: independent of the rest of the call."""
    state = np.random.SeedSequence([int(seed), i, j]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(state[0]) << 32 | int(state[1]))


def next_tokens(logits: torch.Tensor, gens: Sequence[torch.Generator], temperature: float) -> list[int]:
    """One token per row of ``logits [b, vocab]``: argmax at temperature 0, else sampled."""
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    return [int(torch.multinomial(p, 1, generator=g)) for p, g in zip(probs, gens)]


def stop_index(text: str, stop: Sequence[str]) -> int | None:
    """Where the earliest stop string starts in ``text``; ``None`` when none occurs."""
    hits = [k for k in (text.find(s) for s in stop if s) if k >= 0]
    return min(hits) if hits else None


def cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    k = stop_index(text, stop)
    return text if k is None else text[:k]
