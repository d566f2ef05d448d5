"""Soft prompt tuning (Lester et al. 2021), P-tuning (Liu et al. 2021) and prefix tuning
(Li & Liang 2021) over a shared frozen LM.

The LM stays stateless and shared between trials: the method holds the trainable arrays in
its own state, sends the current prompt with each ``prompt_grad`` request, and updates the
arrays with the returned gradient by a small numpy Adam.

``space="input"`` trains ``[n_virtual, d_model]`` vectors in the input-embedding space, at the
task's ``{instruction}`` slot (prompt tuning). ``space="prefix"`` trains key/value states at
every layer, prepended to the whole context (prefix tuning); they start from the states of
real words, as Li & Liang recommend, and travel as a :class:`methods.lm.PrefixPrompt`.

``encoder="none"`` trains the prompt directly. ``encoder="lstm"`` is P-tuning's (Liu et al.
2021): the prompt is a bidirectional two-layer LSTM plus an MLP head over trainable
virtual-token embeddings, PEFT's own ``PromptEncoder`` (``methods/peft_encoders.py``), with
the gradient chained through it by torch. ``encoder="mlp"`` is PEFT's MLP alternative
(Linear-ReLU-Linear-ReLU-Linear), in numpy here; ``residual=true`` adds its output to its
input with the last layer at zero, so training starts from the initial prompt (residual
prompt tuning's form, neither P-tuning's nor PEFT's). Only the encoder's *output* ever
reaches the LM, so it runs through the same protocol; like PEFT, the encoder is discarded
after training and its output is exported.

For prefixes, ``encoder="projection"`` is Li & Liang's reparameterization, PEFT's
``PrefixEncoder`` with ``prefix_projection=True`` (``methods/peft_encoders.py``); with
``residual=true`` (a departure) its output is added to the instruction's states and its last
layer starts at zero, so training starts from the baseline; ``encoder="none"`` trains the
states directly (PEFT's ``prefix_projection=False``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from methods.autoprompt import label_requests
from methods.optim import adam
from methods.base import Evaluated, Report, Snapshot
from methods.evaluate import score_prompts, slot_text, subsample
from methods.peft_encoders import (
    init_lstm, init_projection, lstm_backward, lstm_forward, projection_backward, projection_forward,
)
from methods.lm import LM, Needs, PREFIX_STATES, PROMPT_GRAD, PrefixPrompt, SoftPrompt, TOKEN_EMBEDDINGS
from tasks.core import Task

Arrays = tuple[np.ndarray, ...]


@dataclass(frozen=True, eq=False)
class SoftPromptState:
    """Trainable arrays, Adam moments and the best prompt so far: the whole checkpoint.

    Attributes:
        params: ``(prompt [n, d],)``, or for the MLP encoder
            ``(emb [n, d], w1 [d, h], b1 [h], w2 [h, h], b2 [h], w3 [h, d], b3 [d])``.
        m, v: Adam's first and second moments, shaped like ``params``.
        t: optimizer steps taken.
        loss: the label NLL of the last minibatch (before its update).
        best: the soft prompt ``[n, d]`` with the highest dev score so far (None before any).
        best_nearest: nearest vocabulary token per virtual token of ``best``.
        best_dev: its dev score.
        origin: the text the prompt started from (named in logs of prefix prompts).
    """

    params: Arrays
    m: Arrays
    v: Arrays
    t: int = 0
    loss: float = float("nan")
    best: np.ndarray | None = field(default=None, repr=False)
    best_nearest: tuple[str, ...] = ()
    best_dev: float = float("-inf")
    origin: str = ""


@dataclass(frozen=True)
class SoftPromptTuning:
    """Gradient descent on continuous prompt vectors through the shared frozen LM.

    Args:
        n_virtual: virtual tokens.
        space: "input" (vectors in the input-embedding space at the instruction slot) or
            "prefix" (key/value states at every layer before the context).
        init_from: "text" (the tokens of ``init_text``, repeated or cut to ``n_virtual``: PEFT's
            TEXT init), "sample_vocab" (embeddings of random vocabulary tokens: PEFT's
            SAMPLE_VOCAB) or "random" (Gaussian with the vocabulary's per-dimension mean and std).
        init_text: text for ``init_from="text"``; empty means the task's baseline instruction.
        encoder: "none" (the vectors themselves), "lstm" (P-tuning's LSTM encoder, PEFT's),
            "mlp" (PEFT's MLP encoder) or, for prefixes, "projection" (Li & Liang's MLP, PEFT's).
        encoder_hidden: hidden width of the encoder.
        residual: MLP output is added to its input and the last layer starts at zero, so
            training starts from the initial prompt (as in residual prompt tuning); false
            gives PEFT's plain MLP, whose first prompt is unrelated to the init.
        lr: Adam learning rate.
        beta1, beta2, eps: Adam constants (torch.optim.Adam's defaults).
        max_grad_norm: clip the global gradient norm to this (0 = no clipping).
        batch_size: train examples per step.
        eval_every: steps between dev evaluations (and nearest-token read-outs).
        n_eval: dev examples (a fixed subset) per evaluation; 0 means the whole dev split.
    """

    n_virtual: int = 16
    space: str = "input"
    init_from: str = "text"
    init_text: str = ""
    encoder: str = "none"
    encoder_hidden: int = 128
    residual: bool = True
    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    batch_size: int = 8
    eval_every: int = 5
    n_eval: int = 64

    def __post_init__(self) -> None:
        if self.init_from not in ("text", "sample_vocab", "random"):
            raise ValueError(f"init_from must be text, sample_vocab or random, got {self.init_from!r}")
        if self.space not in ("input", "prefix"):
            raise ValueError(f"space must be 'input' or 'prefix', got {self.space!r}")
        if self.encoder not in ("none", "mlp", "lstm", "projection"):
            raise ValueError(f"encoder must be 'none', 'mlp', 'lstm' or 'projection', got {self.encoder!r}")
        if self.encoder in ("lstm", "mlp") and self.space != "input":
            raise ValueError(f"encoder={self.encoder!r} makes input-space prompts; use space='input' "
                             "(or encoder='projection' for a prefix)")
        if self.encoder == "projection" and self.space != "prefix":
            raise ValueError("encoder='projection' is prefix tuning's reparameterization; use space='prefix'")
        if min(self.n_virtual, self.batch_size, self.encoder_hidden) < 1:
            raise ValueError("n_virtual, batch_size and encoder_hidden must be >= 1")

    def needs(self) -> Needs:
        # Both spaces read the vocabulary (init, nearest tokens); prefixes need every layer's states.
        extra = {PREFIX_STATES} if self.space == "prefix" else set()
        return Needs(scorer=frozenset({PROMPT_GRAD, TOKEN_EMBEDDINGS, *extra}))

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> SoftPromptState:
        vocab = np.asarray(scorer.token_embeddings(), dtype=np.float32)
        if self.space == "prefix":
            prompt, origin = self._initial_prefix(task, scorer, vocab, rng)
        else:
            prompt, origin = self._initial_prompt(task, scorer, vocab, rng), ""
        if self.encoder == "lstm":
            params = init_lstm(prompt, self.encoder_hidden, rng)
        elif self.encoder == "projection":
            params = init_projection(prompt, self.encoder_hidden, self.residual, rng)
        elif self.encoder == "mlp":
            params = init_mlp(prompt, self.encoder_hidden, self.residual, rng)
        else:
            params = (prompt,)
        zeros = tuple(np.zeros_like(p) for p in params)
        return SoftPromptState(params=params, m=zeros, v=zeros, origin=origin)

    def _initial_prompt(self, task: Task, scorer: LM, vocab: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The starting ``[n_virtual, d]`` prompt, float32."""
        if self.init_from == "text":
            return text_init(scorer.tokenize(self._init_text(task)), vocab, self.n_virtual)
        if self.init_from == "sample_vocab":
            return vocab[rng.integers(0, vocab.shape[0], size=self.n_virtual)].copy()
        mean, std = vocab.mean(axis=0), vocab.std(axis=0)
        return (mean + std * rng.standard_normal((self.n_virtual, vocab.shape[1]))).astype(np.float32)

    def _initial_prefix(self, task: Task, scorer: LM, vocab: np.ndarray, rng: np.random.Generator):
        """The starting ``[n_virtual, n_layers * 2 * kv_dim]`` prefix and the text it came from.

        Text and sampled-vocabulary inits are the states of real tokens (Li & Liang); "random"
        draws each column from the mean and spread of the instruction's states.
        """
        if self.init_from == "sample_vocab":
            text = scorer.decode([int(i) for i in rng.integers(0, vocab.shape[0], size=self.n_virtual)])
        else:
            text = self._init_text(task)
        states = prefix_init(scorer, text, self.n_virtual)
        if self.init_from != "random":
            return states, text
        noise = rng.standard_normal(states.shape)
        return (states.mean(axis=0) + states.std(axis=0) * noise).astype(np.float32), "random"

    def _init_text(self, task: Task) -> str:
        text = self.init_text or task.instruction
        if not text.strip():
            raise ValueError(f"init_from='text' needs text, and task {task.name!r} has no baseline instruction: "
                             "set init_text (e.g. method.init_text='Answer the question.') or init_from=sample_vocab")
        return text

    def step(self, state: SoftPromptState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        batch = subsample(task.train, self.batch_size, rng)
        prompt, cache = self._forward(state.params)
        spliced = self._wrap(prompt, state.origin)
        loss, grad = scorer.prompt_grad(label_requests(task, batch, slot_text(spliced)), spliced)
        grads = self._backward(state.params, cache, np.asarray(grad, dtype=np.float32))
        grads, grad_norm = clip(grads, self.max_grad_norm)
        params, m, v = adam(state.params, grads, state.m, state.v, state.t + 1, self)
        new = replace(state, params=params, m=m, v=v, t=state.t + 1, loss=float(loss))
        new, evaluated = self._maybe_eval(new, task, scorer)
        current = self._forward(params)[0]
        metrics = {
            "dev_score": new.best_dev, "loss": new.loss, "grad_norm": grad_norm,
            "prompt_norm": float(np.linalg.norm(current, axis=1).mean()),
        }
        return new, Report(metrics, evaluated)

    def _forward(self, params: Arrays):
        """The soft prompt ``[n, d]`` from the trainable arrays, and what backward needs."""
        if self.encoder == "none":
            return params[0], None
        if self.encoder == "lstm":
            return lstm_forward(params, self.encoder_hidden)
        if self.encoder == "projection":
            return projection_forward(params, self.encoder_hidden)
        return mlp_forward(params, self.residual)

    def _backward(self, params: Arrays, cache, grad: np.ndarray) -> Arrays:
        if self.encoder == "none":
            return (grad,)
        if self.encoder == "lstm":
            return lstm_backward(cache, grad)
        if self.encoder == "projection":
            return projection_backward(cache, grad)
        return mlp_backward(params, cache, grad, self.residual)

    def _maybe_eval(self, state: SoftPromptState, task: Task, scorer: LM):
        if state.t != 1 and state.t % max(1, self.eval_every):
            return state, ()
        # A fixed dev subset keeps scores comparable across steps.
        dev = subsample(task.dev, self.n_eval, np.random.default_rng(0))
        prompt = self._forward(state.params)[0]
        nearest = ()
        if self.space == "input":  # prefix states live in no vocabulary space
            vocab = np.asarray(scorer.token_embeddings(), dtype=np.float32)
            nearest = tuple(scorer.decode([i]) for i in nearest_tokens(prompt, vocab))
        spliced = self._wrap(prompt, state.origin, nearest)
        (score,) = score_prompts(task, [spliced], dev, scorer)
        record = Evaluated(spliced.describe(), score, len(dev), "prefix" if self.space == "prefix" else "soft")
        if score > state.best_dev:
            state = replace(state, best=prompt.copy(), best_nearest=nearest, best_dev=score)
        return state, (record,)

    def _wrap(self, prompt: np.ndarray, origin: str, nearest: tuple[str, ...] = ()) -> SoftPrompt | PrefixPrompt:
        """The array as the prompt type of this method's space."""
        return PrefixPrompt(prompt, origin) if self.space == "prefix" else SoftPrompt(prompt, nearest)

    def best(self, state: SoftPromptState) -> SoftPrompt | PrefixPrompt:
        if state.best is not None:
            return self._wrap(state.best, state.origin, state.best_nearest)
        return self._wrap(self._forward(state.params)[0], state.origin)

    def snapshot(self, state: SoftPromptState) -> Snapshot:
        return Snapshot(current=self._wrap(self._forward(state.params)[0], state.origin))

    def done(self, state: SoftPromptState) -> bool:
        return False


def text_init(ids: Sequence[int], vocab: np.ndarray, n_virtual: int) -> np.ndarray:
    """PEFT's TEXT init: the embeddings of ``ids`` repeated, then cut, to ``n_virtual`` rows.

    Args:
        ids: token ids of the init text (no special tokens).
        vocab: ``[vocab, d]`` input embeddings.

    Returns:
        ``[n_virtual, d]`` float32.
    """
    if not ids:
        raise ValueError("init text tokenizes to nothing")
    reps = -(-n_virtual // len(ids))
    return vocab[(list(ids) * reps)[:n_virtual]].astype(np.float32)


def prefix_init(scorer: LM, text: str, n_virtual: int) -> np.ndarray:
    """The states of the first ``n_virtual`` tokens of ``text`` (repeated until long enough).

    Repeating the text, not the rows, keeps every row a state of a real token at its own
    position (keys carry their position through rotary embeddings).

    Returns:
        ``[n_virtual, n_layers * 2 * kv_dim]`` float32.
    """
    n_tokens = len(scorer.tokenize(text))
    if n_tokens == 0:
        raise ValueError("init text tokenizes to nothing")
    reps = -(-n_virtual // n_tokens)
    states = np.asarray(scorer.prefix_states(" ".join([text] * reps)), dtype=np.float32)
    if states.shape[0] < n_virtual:
        raise ValueError(f"init text gives {states.shape[0]} prefix states, fewer than n_virtual={n_virtual}")
    return states[:n_virtual].copy()


def nearest_tokens(prompt: np.ndarray, vocab: np.ndarray) -> list[int]:
    """Nearest vocabulary id by cosine for each row of ``prompt`` ``[n, d]`` (``vocab`` ``[V, d]``)."""
    unit = vocab / np.maximum(np.linalg.norm(vocab, axis=1, keepdims=True), 1e-12)
    rows = prompt / np.maximum(np.linalg.norm(prompt, axis=1, keepdims=True), 1e-12)
    return [int(i) for i in np.argmax(rows @ unit.T, axis=1)]


def clip(grads: Arrays, max_norm: float) -> tuple[Arrays, float]:
    """Gradients scaled so their global L2 norm is at most ``max_norm`` (0 = unclipped), and that norm."""
    norm = float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads)))
    if max_norm <= 0 or norm <= max_norm:
        return grads, norm
    scale = np.float32(max_norm / (norm + 1e-6))
    return tuple(g * scale for g in grads), norm


def init_mlp(emb: np.ndarray, hidden: int, residual: bool, rng: np.random.Generator) -> Arrays:
    """P-tuning's encoder parameters, with torch.nn.Linear's default uniform init.

    With ``residual`` the last layer starts at zero, so the first prompt equals ``emb``.
    """
    d = emb.shape[1]

    def linear(fan_in: int, fan_out: int, zero: bool = False):
        bound = 0.0 if zero else 1.0 / np.sqrt(fan_in)
        w = rng.uniform(-bound, bound, size=(fan_in, fan_out)).astype(np.float32)
        return w, rng.uniform(-bound, bound, size=fan_out).astype(np.float32)

    w1, b1 = linear(d, hidden)
    w2, b2 = linear(hidden, hidden)
    w3, b3 = linear(hidden, d, zero=residual)
    return (emb.astype(np.float32), w1, b1, w2, b2, w3, b3)


def mlp_forward(params: Arrays, residual: bool):
    """Prompt ``[n, d]`` = MLP(emb) (+ emb), and the activations backward needs."""
    emb, w1, b1, w2, b2, w3, b3 = params
    z1 = emb @ w1 + b1
    a1 = np.maximum(z1, 0)
    z2 = a1 @ w2 + b2
    a2 = np.maximum(z2, 0)
    out = a2 @ w3 + b3
    return (out + emb if residual else out), (z1, a1, z2, a2)


def mlp_backward(params: Arrays, cache, grad: np.ndarray, residual: bool) -> Arrays:
    """Gradients of every encoder array from the gradient ``[n, d]`` wrt the prompt."""
    emb, w1, _, w2, _, w3, _ = params
    z1, a1, z2, a2 = cache
    dz2 = (grad @ w3.T) * (z2 > 0)
    dz1 = (dz2 @ w2.T) * (z1 > 0)
    demb = dz1 @ w1.T + (grad if residual else 0)
    return (demb, emb.T @ dz1, dz1.sum(0), a1.T @ dz2, dz2.sum(0), a2.T @ grad, grad.sum(0))
