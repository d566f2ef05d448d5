"""P-tuning's LSTM prompt encoder, as PEFT builds it, over numpy arrays a method's state can hold.

Liu et al. (2021, "GPT Understands, Too") produce the virtual tokens with a bidirectional
two-layer LSTM over trainable embeddings followed by an MLP head; PEFT's ``PromptEncoder``
with ``encoder_reparameterization_type="LSTM"`` is that encoder. It is used here as is: the
state keeps its weights as numpy arrays (in ``state_dict`` order, so the state pickles without
torch objects), each step loads them into a fresh module, runs it, and chains the LM's
gradient with respect to the virtual tokens through it with torch's autograd.
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


def init_lstm(prompt: np.ndarray, hidden: int, rng: np.random.Generator) -> Arrays:
    """A fresh encoder's weights, its input embeddings set to ``prompt`` ``[n, d]`` (e.g. the text init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(rng.integers(2**31)))
        module = _module(prompt.shape[0], prompt.shape[1], hidden)
    weights = [v.detach().numpy().astype(np.float32) for v in module.state_dict().values()]
    weights[0] = np.asarray(prompt, dtype=np.float32).copy()  # embedding.weight comes first
    return tuple(weights)


def _loaded(params: Sequence[np.ndarray], hidden: int):
    n, width = params[0].shape
    module = _module(n, width, hidden)
    module.load_state_dict({k: torch.from_numpy(np.asarray(p, dtype=np.float64))
                            for k, p in zip(module.state_dict(), params)})
    return module


def lstm_forward(params: Sequence[np.ndarray], hidden: int):
    """The virtual tokens ``[n, d]`` float32, and what :func:`lstm_backward` needs."""
    module = _loaded(params, hidden)
    out = module(torch.arange(params[0].shape[0]))
    return out.detach().numpy().astype(np.float32), (module, out)


def lstm_backward(cache, grad: np.ndarray) -> Arrays:
    """The gradient of each weight (in ``params`` order), given the gradient wrt the virtual tokens."""
    module, out = cache
    out.backward(torch.from_numpy(np.asarray(grad, dtype=np.float64)))
    return tuple(p.grad.numpy().astype(np.float32) if p.grad is not None else np.zeros(tuple(p.shape), np.float32)
                 for p in module.state_dict(keep_vars=True).values())
