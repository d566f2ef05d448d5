"""PEFT's prompt encoders over numpy arrays a method's state can hold.

- P-tuning (Liu et al. 2021, "GPT Understands, Too") produces the virtual tokens with a
  bidirectional two-layer LSTM over trainable embeddings followed by an MLP head: PEFT's
  ``PromptEncoder`` with ``encoder_reparameterization_type="LSTM"``.
- Prefix tuning's reparameterization (Li & Liang 2021) produces the prefix with an MLP
  (Linear-Tanh-Linear) of smaller trainable embeddings: PEFT's ``PrefixEncoder`` with
  ``prefix_projection=True``. With ``residual`` the MLP's last layer starts at zero (PEFT's
  ``init_weights="zero"``) and its output is added to fixed initial states (the instruction's),
  so training starts from the baseline; without, it is PEFT's encoder as is.

The modules are PEFT's, used as they are: the state keeps their weights as numpy arrays (in
``state_dict`` order, so it pickles without torch objects); each step loads them into a fresh
module, runs it, and chains the LM's gradient with respect to the prompt through it with
torch's autograd.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

Arrays = tuple[np.ndarray, ...]


def _module(n_virtual: int, width: int, hidden: int):
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning.model import PromptEncoder

    config = PromptEncoderConfig(
        num_virtual_tokens=n_virtual, token_dim=width, encoder_hidden_size=hidden,
        encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.0,
        num_transformer_submodules=1,
    )
    return PromptEncoder(config).double()


def _seeded(build, rng: np.random.Generator):
    """``build()`` with torch's RNG seeded from ``rng``, leaving the global torch RNG as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**31)))
        return build()


def _weights(module) -> list[np.ndarray]:
    """A module's weights as float32 arrays, in ``state_dict`` order (what a state keeps)."""
    return [v.detach().numpy().astype(np.float32) for v in module.state_dict().values()]


def _load(module, weights: Sequence[np.ndarray]):
    """``module`` with ``weights`` (in ``state_dict`` order) loaded, in float64."""
    module.load_state_dict({k: torch.from_numpy(np.asarray(w, dtype=np.float64))
                            for k, w in zip(module.state_dict(), weights)})
    return module


def _grads(module, out, grad: np.ndarray) -> list[np.ndarray]:
    """Each weight's gradient (``state_dict`` order), given ``grad`` with respect to ``out``."""
    out.backward(torch.from_numpy(np.asarray(grad, dtype=np.float64)))
    return [p.grad.numpy().astype(np.float32) if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
            for p in module.state_dict(keep_vars=True).values()]


def init_lstm(prompt: np.ndarray, hidden: int, rng: np.random.Generator) -> Arrays:
    """A fresh encoder's weights, its input embeddings set to ``prompt`` ``[n, d]`` (e.g. the text init)."""
    weights = _weights(_seeded(lambda: _module(prompt.shape[0], prompt.shape[1], hidden), rng))
    weights[0] = np.asarray(prompt, dtype=np.float32).copy()  # embedding.weight comes first
    return tuple(weights)


def lstm_forward(params: Sequence[np.ndarray], hidden: int):
    """The virtual tokens ``[n, d]`` float32, and what :func:`lstm_backward` needs."""
    n, width = params[0].shape
    module = _load(_module(n, width, hidden), params)
    out = module(torch.arange(n))
    return out.detach().numpy().astype(np.float32), (module, out)


def lstm_backward(cache, grad: np.ndarray) -> Arrays:
    """The gradient of each weight (in ``params`` order), given the gradient wrt the virtual tokens."""
    module, out = cache
    return tuple(_grads(module, out, grad))


def _prefix_module(n_virtual: int, width: int, hidden: int, zero_last: bool):
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    # PEFT's projection writes num_layers * 2 * token_dim numbers per virtual token; one
    # "layer" of width / 2 makes that the backend's whole prefix row, whatever its layout.
    config = PrefixTuningConfig(
        num_virtual_tokens=n_virtual, token_dim=width // 2, num_layers=1, encoder_hidden_size=hidden,
        prefix_projection=True, num_transformer_submodules=1, init_weights="zero" if zero_last else None,
    )
    return PrefixEncoder(config).double()


def init_projection(prefix: np.ndarray, hidden: int, residual: bool, rng: np.random.Generator) -> Arrays:
    """``(offset, *encoder weights)``: the offset is ``prefix`` with ``residual`` (never trained), else zero."""
    if prefix.shape[1] % 2:
        raise ValueError(f"a prefix row has an even width (layers x keys and values), got {prefix.shape[1]}")
    module = _seeded(lambda: _prefix_module(prefix.shape[0], prefix.shape[1], hidden, zero_last=residual), rng)
    offset = np.asarray(prefix, dtype=np.float32).copy() if residual else np.zeros(prefix.shape, np.float32)
    return (offset, *_weights(module))


def projection_forward(params: Sequence[np.ndarray], hidden: int):
    """The prefix ``[n, width]`` float32 (offset + the projection's output), and what backward needs."""
    offset, weights = params[0], params[1:]
    module = _load(_prefix_module(offset.shape[0], offset.shape[1], hidden, zero_last=False), weights)
    out = module(torch.arange(offset.shape[0]))
    return (out.detach().numpy() + offset).astype(np.float32), (module, out, offset.shape)


def projection_backward(cache, grad: np.ndarray) -> Arrays:
    """Gradients in ``params`` order; the offset's is zero (it stays the initial states)."""
    module, out, shape = cache
    return (np.zeros(shape, np.float32), *_grads(module, out, grad))
