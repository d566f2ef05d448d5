"""Prefix-tuning states: PEFT's flat ``[n_virtual, n_layers * 2 * kv_dim]`` layout <-> per-layer KV.

PEFT's ``PeftModel.get_prompt`` views the prefix encoder's weight as
``[n_virtual, n_layers * 2, kv_heads, head_dim]`` and permutes it to ``[2 * n_layers, heads,
n_virtual, head_dim]``, layer ``l`` taking rows ``2l`` (keys) and ``2l + 1`` (values). Keeping
exactly that layout means a prefix trained here is a PEFT prefix-tuning adapter as it stands.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from methods.lm import PrefixPrompt

LayerKV = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVShape:
    """Geometry of a model's key/value cache (grouped-query models have fewer KV heads)."""

    n_layers: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config) -> KVShape:
        """Read from a transformers config (``num_key_value_heads`` and ``head_dim`` when present)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads, head_dim)

    @property
    def width(self) -> int:
        """Columns of the flat layout: ``n_layers * 2 * kv_heads * head_dim``."""
        return self.n_layers * 2 * self.kv_heads * self.head_dim


def to_layers(flat: torch.Tensor, shape: KVShape) -> LayerKV:
    """Per-layer ``(key, value)`` ``[1, kv_heads, n_virtual, head_dim]`` views of ``flat`` ``[n, width]``.

    Differentiable: gradients flow back to ``flat``.
    """
    if flat.ndim != 2 or flat.shape[1] != shape.width:
        raise ValueError(
            f"prefix must be [n_virtual, {shape.width}] for this model "
            f"({shape.n_layers} layers x 2 x {shape.kv_heads} KV heads x {shape.head_dim}), got {tuple(flat.shape)}"
        )
    per = flat.view(flat.shape[0], 2 * shape.n_layers, shape.kv_heads, shape.head_dim).permute(1, 2, 0, 3)
    return [(per[2 * layer][None], per[2 * layer + 1][None]) for layer in range(shape.n_layers)]


def from_layers(layers: LayerKV) -> torch.Tensor:
    """The flat ``[n, width]`` layout of per-layer ``(key, value)`` ``[1, kv_heads, n, head_dim]`` states."""
    stacked = torch.stack([t[0] for kv in layers for t in kv])  # [2 * n_layers, kv_heads, n, head_dim]
    return stacked.permute(2, 0, 1, 3).reshape(stacked.shape[2], -1)


def split_by_prefix(prompts: Sequence) -> list[tuple[PrefixPrompt | None, list[int]]]:
    """Request indices grouped by their prefix prompt (identity: prompts hold arrays), ``None`` first.

    Requests under different prefixes see different states at every layer, so each group is
    scored on its own; everything that is not a prefix prompt goes in the ``None`` group.
    """
    groups: dict[int, tuple[PrefixPrompt | None, list[int]]] = {}
    for i, p in enumerate(prompts):
        key = id(p) if isinstance(p, PrefixPrompt) else 0
        groups.setdefault(key, (p if key else None, []))[1].append(i)
    return sorted(groups.values(), key=lambda g: g[0] is not None)
