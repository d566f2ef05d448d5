"""RLPrompt (Deng et al. 2022, "RLPrompt: Optimizing Discrete Text Prompts with Reinforcement
Learning"): a small policy network on a frozen LM writes the prompt token by token, trained on
the scorer's reward with soft Q-learning.

As the reference (mingkaid/rl-prompt) runs few-shot classification (``run_fsc.py``,
``fsc_config.yaml``, ``fsc_reward.py``, ``rlprompt/modules/sql_module.py``,
``rlprompt/losses/sql_losses.py``, ``rlprompt/models/lm_adaptor_model.py``):

- **Policy.** The proposer LM is frozen; its final hidden state ``h`` after the policy's input
  (a fixed context string, then the prompt tokens so far) goes through a trainable MLP
  (Linear-ReLU-Linear, hidden width ``mlp_hidden``, initialised near zero as the reference's
  Xavier init with gain 1e-4 and biases -1e-4), and the LM head's weight (``output_embeddings``)
  turns the result into next-token logits. ``residual=false`` is the reference's head,
  ``logits = E (MLP(h))``, which starts near uniform over the whole vocabulary;
  ``residual=true`` (a departure, the CPU default) reads ``E (h + MLP(h))``, so the policy starts
  at the frozen LM's own next-token distribution and a handful of updates explore likely words.
- **Sampling.** ``n_prompts`` prompts of exactly ``prompt_length`` tokens a step, token by
  token, from the ``top_k`` most likely tokens of the policy's logits (0: all), as the
  reference samples; one batched ``answer_states`` call per position over every prompt being
  built. No vocabulary filter, as in the reference; ``fluent_top_k`` is its optional ``fluent``
  mode, which keeps only the frozen LM's top tokens (in sampling, greedy decoding and the loss).
- **Reward.** Each prompt's decoded text fills the task's ``{instruction}`` slot (the
  reference inserts the prompt text into its template) and is scored on one minibatch of
  ``batch_size`` train examples, every prompt in one ``loglikelihood`` call. Per example, with
  the label probabilities normalised over the label words, ``gap = p(gold) - max p(wrong)`` and
  the reward is ``gap * correct_coeff`` when ``gap > 0`` else ``gap * incorrect_coeff`` (the
  paper's lambda_2 = 200, lambda_1 = 180). ``zscore="batch"`` is the reference's
  normalisation: each prompt's mean reward over the minibatch, z-scored across the step's
  prompts (``(r - mean) / (std + 1e-4)``: the minibatch is the one "input" they share);
  ``zscore="example"`` z-scores each example's rewards across prompts, then averages (the
  paper's per-input normalisation read per example). The result is shaped linearly from
  ``[shaping_old_min, shaping_old_max]`` to ``[shaping_new_min, shaping_new_max]``.
- **Update.** Soft Q-learning, on-policy (the reference's ``sql-onpolicy``, the only mode it
  runs), with its default loss ``v2_v2r_v3_v3r`` without a coefficient: the mean of the
  single-step (v2) and multi-step (v3) path-consistency losses, per position, summed over the
  prompt and averaged over prompts, with the policy's logits as Q-values and a target network
  that is a Polyak average of the policy (rate ``target_lr``, updated before each step's loss).
  Gradients are taken with torch's autograd on the head alone (the LM's states are inputs, never
  differentiated), clipped to ``max_grad_norm`` and applied by Adam on the numpy weights the
  state holds.
- **Selection.** At the first step and every ``eval_every`` steps the policy's greedy (argmax)
  prompt is scored on a fixed dev subset with the task metric; the best is kept and is
  :meth:`RLPrompt.best`.

Departures, stated: the policy reads its prefix as text (the context string plus the decoded
tokens so far, re-tokenized by the proposer), where the reference feeds the sampled ids through
its KV cache, since ``answer_states`` takes strings; the policy's input defaults to the task's
own instruction (``policy_context=""``), where the reference starts from ``<|endoftext|>``
(the paper preset's value); the prompt text sits in the task's instruction slot, not after the
input as the reference's ``"{sentence_1} {prompt}"`` template puts it; each step's reward
minibatch is drawn at random from train (the reference scores every step on its whole 16-shot
train set); a wrong label tied with the gold one counts as the best wrong label (the reference
drops every label whose probability equals the gold one's, so a tie scores as a win); rewards
use the raw label probabilities even when the task selects with contextual calibration (dev
scores are calibrated, as every method's); dev is scored with the task metric (the reference
logs the mean gap reward) and the best greedy prompt is kept, where the reference reports its
last. :meth:`RLPrompt.best` is a text prompt (what the scorer read); the greedy prompt's token
ids are shown through :meth:`RLPrompt.snapshot`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from methods.base import Evaluated, Report, Snapshot
from methods.evaluate import calibrated, content_free_log_prior, label_probabilities, predictions, requests_for, subsample
from methods.lm import ANSWER_STATES, LM, Needs, TextPrompt, TokenPrompt
from methods.optim import adam
from methods.racing import fixed_dev
from methods.soft_prompt import clip
from tasks.core import Example, Task
from tasks.generative import is_generative

Arrays = tuple[np.ndarray, ...]
ZSCORES = ("batch", "example", "none")


@dataclass(frozen=True, eq=False)
class RLPromptState:
    """The policy head, its target copy, Adam's moments and the prompts found: the checkpoint.

    Attributes:
        context: the policy's fixed input text, before the prompt tokens.
        params: the head ``(w1 [d, h], b1 [h], w2 [h, d], b2 [d])``, float32.
        target: the target network's copy of ``params`` (a Polyak average of them).
        m, v, t: Adam's moments and its step count (= policy updates made).
        greedy_ids, greedy_text: the policy's greedy prompt at the last evaluation.
        greedy_dev, greedy_reward: its dev score and mean gap reward on the dev subset.
        best_ids, best_text, best_dev: the greedy prompt with the highest dev score so far.
    """

    context: str
    params: Arrays = field(repr=False)
    target: Arrays = field(repr=False)
    m: Arrays = field(repr=False)
    v: Arrays = field(repr=False)
    t: int = 0
    greedy_ids: tuple[int, ...] = ()
    greedy_text: str = ""
    greedy_dev: float = float("nan")
    greedy_reward: float = float("nan")
    best_ids: tuple[int, ...] = ()
    best_text: str = ""
    best_dev: float = float("-inf")


@dataclass(frozen=True)
class RLPrompt:
    """Discrete prompts written by an MLP policy on the frozen proposer, trained by soft Q-learning.

    Args:
        prompt_length: tokens per prompt (the reference's ``prompt_length``).
        n_prompts: prompts sampled per step (``prompt_train_batch_size``).
        batch_size: train examples every prompt of a step is rewarded on (0: all of train).
        policy_context: the text the policy reads before its prompt tokens; empty means the
            task's own instruction (the reference: ``source_str``, ``<|endoftext|>``).
        mlp_hidden: the head's hidden width (``hidden_size``).
        residual: logits from ``h + MLP(h)``, so the policy starts at the frozen LM's
            distribution; false is the reference's ``MLP(h)``.
        logit_bias: added to every logit (``logit_bias``; it shifts the soft values).
        top_k: sample among the policy's ``top_k`` most likely tokens (0: all).
        fluent_top_k: keep only the frozen LM's ``fluent_top_k`` most likely tokens everywhere
            (the reference's ``fluent`` mode; 0: off).
        correct_coeff, incorrect_coeff: the gap reward's scale when the gold label wins / loses.
        zscore: "batch" (each prompt's mean reward, z-scored across prompts: the reference),
            "example" (z-scored per example across prompts, then averaged) or "none".
        shaping_old_min, shaping_old_max, shaping_new_min, shaping_new_max: the linear reward
            shaping from the old range to the new one.
        target_lr: Polyak rate of the target network (``target_learning_rate``).
        lr, beta1, beta2, eps: Adam (``learning_rate``; torch.optim.Adam's defaults).
        max_grad_norm: clip the head's global gradient norm (``gradient_clip_norm``; 0: off).
        eval_every: steps between dev evaluations of the greedy prompt (also at step 1).
        n_eval: dev examples (a fixed subset) per evaluation; 0 is the whole dev split.
    """

    prompt_length: int = 5
    n_prompts: int = 8
    batch_size: int = 16
    policy_context: str = ""
    mlp_hidden: int = 64
    residual: bool = True
    logit_bias: float = 0.0
    top_k: int = 50
    fluent_top_k: int = 0
    correct_coeff: float = 200.0
    incorrect_coeff: float = 180.0
    zscore: str = "batch"
    shaping_old_min: float = 0.0
    shaping_old_max: float = 1.0
    shaping_new_min: float = 0.0
    shaping_new_max: float = 5.0
    target_lr: float = 0.001
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 5.0
    eval_every: int = 5
    n_eval: int = 64

    def __post_init__(self) -> None:
        if min(self.prompt_length, self.n_prompts, self.mlp_hidden, self.eval_every) < 1:
            raise ValueError("prompt_length, n_prompts, mlp_hidden and eval_every must be >= 1")
        if min(self.batch_size, self.top_k, self.fluent_top_k, self.n_eval) < 0:
            raise ValueError("batch_size, top_k, fluent_top_k and n_eval must be >= 0")
        if self.zscore not in ZSCORES:
            raise ValueError(f"zscore must be one of {list(ZSCORES)}, got {self.zscore!r}")
        if self.zscore != "none" and self.n_prompts < 2:
            raise ValueError("z-scoring across prompts needs n_prompts >= 2 (or zscore='none')")
        if self.shaping_old_max == self.shaping_old_min:
            raise ValueError("shaping_old_min and shaping_old_max must differ")
        if not 0.0 <= self.target_lr <= 1.0 or self.lr <= 0 or self.max_grad_norm < 0:
            raise ValueError("target_lr must be in [0, 1], lr > 0 and max_grad_norm >= 0")
        if min(self.correct_coeff, self.incorrect_coeff) < 0:
            raise ValueError("correct_coeff and incorrect_coeff must be >= 0")

    def needs(self) -> Needs:
        # The prompt is rendered as text, so any scorer can reward it.
        return Needs(proposer=frozenset({ANSWER_STATES}))

    def check_task(self, task) -> None:
        """The reward reads label probabilities: a generative task has none."""
        if is_generative(task):
            raise ValueError("rlprompt rewards the gap between label probabilities; it needs a label-scored "
                             "task, and this one is generative")

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> RLPromptState:
        context = self.policy_context or task.instruction
        if not context.strip():
            raise ValueError(f"task {task.name!r} has no instruction for the policy to read; set policy_context "
                             "(e.g. method.policy_context='<|endoftext|>')")
        d = np.asarray(proposer.output_embeddings()).shape[1]
        params = init_head(d, self.mlp_hidden, rng)
        zeros = tuple(np.zeros_like(p) for p in params)
        return RLPromptState(context=context, params=params, target=tuple(p.copy() for p in params), m=zeros, v=zeros)

    # ------------------------------------------------------------------ one step

    def step(self, state: RLPromptState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        out = np.asarray(proposer.output_embeddings(), dtype=np.float32)
        batch = subsample(task.train, self.batch_size, rng)
        ids, states, texts = self._rollout(state, proposer, out, self.n_prompts, rng)
        raw = self._rewards(task, texts, batch, scorer)
        rewards = self._shape(normalize(raw, self.zscore))
        new, loss, entropy, grad_norm = self._update(state, out, states, ids, rewards)
        new, evaluated = self._maybe_eval(new, task, scorer, proposer, out)
        metrics = {
            "dev_score": new.best_dev, "reward": float(raw.mean()), "reward_max": float(raw.mean(axis=1).max()),
            "train_acc": float((raw > 0).mean()), "greedy_reward": new.greedy_reward, "greedy_dev": new.greedy_dev,
            "loss": loss, "entropy": entropy, "grad_norm": grad_norm,
        }
        return new, Report(metrics, evaluated)

    def _rollout(self, state: RLPromptState, proposer: LM, out: np.ndarray, n: int, rng: np.random.Generator | None):
        """``n`` prompts written token by token (sampled, or greedy when ``rng`` is None).

        Returns:
            ``(ids [n, L] int64, states [n, L, d] float32, texts)``: the tokens, the state the
            policy read before each, and each prompt's decoded text.
        """
        decoded: dict[tuple[int, ...], str] = {}
        ids = np.zeros((n, 0), dtype=np.int64)
        states = []
        for _ in range(self.prompt_length):
            h = self._states(state.context, [tuple(map(int, row)) for row in ids], proposer, decoded)
            logits = self._logits(state.params, h, out)
            if rng is None:
                action = logits.argmax(axis=1)
            else:
                action = sample_top_k(logits, self.top_k, rng)
            ids = np.concatenate([ids, action[:, None].astype(np.int64)], axis=1)
            states.append(h)
        texts = [_decode(tuple(map(int, row)), proposer, decoded) for row in ids]
        return ids, np.stack(states, axis=1), texts

    def _states(self, context: str, prefixes: Sequence[tuple[int, ...]], proposer: LM, decoded: dict) -> np.ndarray:
        """The proposer's answer state after ``context`` + each prefix's text, in one call
        (each distinct context read once: at the first position every prompt shares it)."""
        contexts = [context + _decode(p, proposer, decoded) for p in prefixes]
        distinct = list(dict.fromkeys(contexts))
        read = np.asarray(proposer.answer_states(distinct), dtype=np.float32)
        row = {c: i for i, c in enumerate(distinct)}
        return read[[row[c] for c in contexts]]

    def _logits(self, params: Arrays, h: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The policy's next-token logits ``[n, vocab]`` (float64) at states ``h`` ``[n, d]``."""
        with torch.no_grad():
            logits = head_logits(_torch(params), torch.from_numpy(h), torch.from_numpy(out),
                                 self.residual, self.logit_bias, self.fluent_top_k)
        return logits.double().numpy()

    def next_token_logits(self, state: RLPromptState, proposer: LM, prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """The policy's logits ``[len(prefixes), vocab]`` after each prefix of prompt tokens."""
        out = np.asarray(proposer.output_embeddings(), dtype=np.float32)
        h = self._states(state.context, [tuple(map(int, p)) for p in prefixes], proposer, {})
        return self._logits(state.params, h, out)

    def _rewards(self, task: Task, texts: Sequence[str], batch: Sequence[Example], scorer: LM) -> np.ndarray:
        """``[n_prompts, n_examples]`` gap rewards, every prompt scored in one call."""
        requests = [r for text in texts for r in requests_for(task, TextPrompt(text), batch)]
        loglik = np.asarray(scorer.loglikelihood(requests), dtype=np.float64).reshape(len(texts), -1)
        return np.stack([gap_rewards(label_probabilities(task, batch, row), [ex.label for ex in batch],
                                     self.correct_coeff, self.incorrect_coeff) for row in loglik])

    def _shape(self, rewards: np.ndarray) -> np.ndarray:
        """The reference's linear reward shaping from the old range onto the new one."""
        fraction = (rewards - self.shaping_old_min) / (self.shaping_old_max - self.shaping_old_min)
        return fraction * (self.shaping_new_max - self.shaping_new_min) + self.shaping_new_min

    def _update(self, state: RLPromptState, out: np.ndarray, states: np.ndarray, ids: np.ndarray, rewards: np.ndarray):
        """One soft Q-learning update of the head: ``(state, loss, entropy, grad_norm)``."""
        # The reference moves its target network before the step's forward pass.
        target = tuple(((1 - self.target_lr) * q + self.target_lr * p).astype(np.float32)
                       for q, p in zip(state.target, state.params))
        params = [torch.tensor(p, requires_grad=True) for p in state.params]
        h, emb = torch.from_numpy(np.ascontiguousarray(states)), torch.from_numpy(out)
        logits = head_logits(params, h, emb, self.residual, self.logit_bias, self.fluent_top_k)
        with torch.no_grad():
            target_logits = head_logits(_torch(target), h, emb, self.residual, self.logit_bias, self.fluent_top_k)
        loss = sql_loss(logits, target_logits, torch.from_numpy(ids), torch.from_numpy(rewards.astype(np.float32)))
        loss.backward()
        grads, grad_norm = clip(tuple(p.grad.numpy().astype(np.float32) for p in params), self.max_grad_norm)
        new_params, m, v = adam(state.params, grads, state.m, state.v, state.t + 1, self)
        new = replace(state, params=new_params, target=target, m=m, v=v, t=state.t + 1)
        return new, float(loss.detach()), entropy(logits.detach()), grad_norm

    def _maybe_eval(self, state: RLPromptState, task: Task, scorer: LM, proposer: LM, out: np.ndarray):
        """At the first step and every ``eval_every``: the greedy prompt on the fixed dev subset."""
        if state.t != 1 and state.t % self.eval_every:
            return state, ()
        ids, _, (text,) = self._rollout(state, proposer, out, 1, None)
        dev = fixed_dev(task, self.n_eval)
        score, reward = self._dev_score(task, text, dev, scorer)
        greedy = tuple(int(i) for i in ids[0])
        state = replace(state, greedy_ids=greedy, greedy_text=text, greedy_dev=score, greedy_reward=reward)
        if score > state.best_dev:
            state = replace(state, best_ids=greedy, best_text=text, best_dev=score)
        return state, (Evaluated(text, score, len(dev), "greedy"),)

    def _dev_score(self, task: Task, text: str, dev: Sequence[Example], scorer: LM) -> tuple[float, float]:
        """The task metric of ``text`` on ``dev`` (calibrated when the task is) and its mean gap
        reward, from one call (the content-free inputs ride along when calibrating)."""
        free = task.content_free_examples() if calibrated(task) else ()
        loglik = np.asarray(scorer.loglikelihood(requests_for(task, TextPrompt(text), tuple(dev) + free)))
        n = sum(len(task.choices(ex)) for ex in dev)
        prior = content_free_log_prior(task, loglik[n:]) if free else None
        score = task.score(predictions(task, dev, loglik[:n], prior), dev)
        gaps = gap_rewards(label_probabilities(task, dev, loglik[:n]), [ex.label for ex in dev],
                           self.correct_coeff, self.incorrect_coeff)
        return float(score), float(gaps.mean())

    # ------------------------------------------------------------------ what the pipeline reads

    def best(self, state: RLPromptState) -> TextPrompt:
        # Text, as the scorer read it on dev: it needs no splicing and is the same on any scorer.
        # Before the first evaluation it is the empty instruction.
        return TextPrompt(state.best_text)

    def snapshot(self, state: RLPromptState) -> Snapshot:
        return Snapshot(current=TokenPrompt(state.greedy_ids, state.greedy_text)) if state.greedy_ids else Snapshot()

    def done(self, state: RLPromptState) -> bool:
        return False


# ---------------------------------------------------------------------- the policy head


def init_head(d: int, hidden: int, rng: np.random.Generator) -> Arrays:
    """``(w1 [d, h], b1 [h], w2 [h, d], b2 [d])``: the reference's init, Xavier-uniform weights
    with gain 1e-4 and biases -1e-4, so the head's output starts near zero."""
    def xavier(fan_in: int, fan_out: int) -> np.ndarray:
        bound = 1e-4 * math.sqrt(6.0 / (fan_in + fan_out))
        return rng.uniform(-bound, bound, (fan_in, fan_out)).astype(np.float32)

    return (xavier(d, hidden), np.full(hidden, -1e-4, np.float32), xavier(hidden, d), np.full(d, -1e-4, np.float32))


def head_logits(params, h: torch.Tensor, out: torch.Tensor, residual: bool, bias: float, fluent_top_k: int) -> torch.Tensor:
    """Next-token logits ``[..., vocab]`` of the head at states ``h`` ``[..., d]``.

    ``out`` is the LM head's weight; with ``fluent_top_k`` every token outside the frozen LM's
    own top tokens is ruled out (logit ``-inf``), as the reference's ``fluent`` mode does.
    """
    w1, b1, w2, b2 = params
    mlp = torch.relu(h @ w1 + b1) @ w2 + b2
    logits = (h + mlp if residual else mlp) @ out.T + bias
    if 0 < fluent_top_k < out.shape[0]:
        lm = h @ out.T
        kth = torch.topk(lm, fluent_top_k, dim=-1).values[..., -1:]
        logits = torch.where(lm < kth, torch.full_like(logits, float("-inf")), logits)
    return logits


def _torch(params: Arrays) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(p)) for p in params]


def _decode(ids: tuple[int, ...], lm: LM, decoded: dict) -> str:
    """``lm.decode(ids)``, each prefix decoded once per rollout ("" for no tokens)."""
    if ids not in decoded:
        decoded[ids] = lm.decode(list(ids)) if ids else ""
    return decoded[ids]


def sample_top_k(logits: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """One token per row of ``logits`` ``[n, vocab]``, drawn from the softmax over its ``k`` largest
    (ties with the k-th kept, as the reference's top-k; ``k`` 0 or >= vocab: all)."""
    logits = np.array(logits, dtype=np.float64)
    if 0 < k < logits.shape[1]:
        kth = np.partition(logits, -k, axis=1)[:, -k][:, None]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    cdf = np.cumsum(probs, axis=1)
    # The first token whose cumulative mass passes the draw; a zero-mass token never does.
    draw = rng.random(len(logits))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draw).sum(axis=1), logits.shape[1] - 1)


# ---------------------------------------------------------------------- reward


def gap_rewards(probs: Sequence[np.ndarray], labels: Sequence[int], correct_coeff: float,
                incorrect_coeff: float) -> np.ndarray:
    """The paper's piecewise gap reward per example: ``gap = p(gold) - max p(wrong)``, times
    ``correct_coeff`` when the gold label wins (``gap > 0``), else ``incorrect_coeff``."""
    rewards = []
    for p, y in zip(probs, labels):
        gap = p[y] - np.max(np.delete(p, y))
        rewards.append(gap * (correct_coeff if gap > 0 else incorrect_coeff))
    return np.asarray(rewards, dtype=np.float64)


def normalize(rewards: np.ndarray, mode: str) -> np.ndarray:
    """One reward per prompt from ``[n_prompts, n_examples]`` gap rewards.

    "batch": each prompt's mean, z-scored across prompts (the reference: ``(r - mean) /
    (std + 1e-4)``, population std); "example": each example's column z-scored across prompts,
    then each prompt's mean; "none": each prompt's mean.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if mode == "batch":
        mean = rewards.mean(axis=1)
        return (mean - mean.mean()) / (mean.std() + 1e-4)
    if mode == "example":
        return ((rewards - rewards.mean(axis=0)) / (rewards.std(axis=0) + 1e-4)).mean(axis=1)
    return rewards.mean(axis=1)


# ---------------------------------------------------------------------- soft Q-learning


def sql_loss(logits: torch.Tensor, target_logits: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The reference's default soft Q-learning loss for a reward that comes at the last token.

    With the logits as Q-values, ``V = logsumexp(Q)``, ``A_t = Q(a_t) - V_t`` and the target
    network's ``V'``: the single-step loss fits ``A_t`` to ``V'_{t+1} - V'_t`` (to ``r - V'_T``
    at the last token); the multi-step loss fits ``sum_{s >= t} A_s`` to ``r - V'_t``. Their
    mean per position is summed over the prompt and averaged over prompts.

    Args:
        logits, target_logits: ``[n, L, vocab]`` (only ``logits`` carries gradients).
        actions: ``[n, L]`` the tokens taken; rewards: ``[n]`` shaped rewards.
    """
    q = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    advantage = q - torch.logsumexp(logits, dim=-1)
    v_target = torch.logsumexp(target_logits, dim=-1)
    single_target = torch.cat([v_target[:, 1:] - v_target[:, :-1], (rewards - v_target[:, -1]).unsqueeze(1)], dim=1)
    single = (advantage - single_target) ** 2
    to_go = advantage.flip(1).cumsum(1).flip(1)
    multi = (to_go - (rewards.unsqueeze(1) - v_target)) ** 2
    return ((single + multi) / 2).sum(dim=1).mean()


def entropy(logits: torch.Tensor) -> float:
    """Mean entropy (nats) of the policy's distributions (tokens ruled out contribute nothing)."""
    logp = torch.log_softmax(logits, dim=-1)
    terms = torch.where(torch.isfinite(logp), logp.exp() * logp, torch.zeros_like(logp))
    return float(-terms.sum(dim=-1).mean())
