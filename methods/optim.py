"""Adam on numpy arrays: the update of the trainable state methods keep in their checkpoints.

Soft prompts, prefixes, their encoders and AutoPrompt's label probe hold their parameters as
numpy arrays in a frozen, picklable state, so the optimizer's moments live there too.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

Arrays = tuple[np.ndarray, ...]


class AdamSettings(Protocol):
    """What :func:`adam` reads of a method's settings."""

    lr: float
    beta1: float
    beta2: float
    eps: float


def adam(params: Arrays, grads: Arrays, m: Arrays, v: Arrays, t: int, hp: AdamSettings):
    """One Adam step (torch.optim.Adam's update, no weight decay) on every array, in float32.

    Returns:
        ``(params, m, v)``: new arrays; the inputs are not modified.
    """
    b1, b2 = np.float32(hp.beta1), np.float32(hp.beta2)
    bc1, bc2 = 1 - hp.beta1**t, 1 - hp.beta2**t
    out_p, out_m, out_v = [], [], []
    for p, g, m0, v0 in zip(params, grads, m, v):
        m1 = b1 * m0 + (1 - b1) * g
        v1 = b2 * v0 + (1 - b2) * g * g
        denom = np.sqrt(v1) / np.float32(np.sqrt(bc2)) + np.float32(hp.eps)
        out_p.append((p - np.float32(hp.lr / bc1) * m1 / denom).astype(np.float32))
        out_m.append(m1.astype(np.float32))
        out_v.append(v1.astype(np.float32))
    return tuple(out_p), tuple(out_m), tuple(out_v)
