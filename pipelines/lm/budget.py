"""Per-trial budgets in example-evaluations, LM calls, tokens and money, checked before dispatch.

A trial's two LM roles each get a :class:`BudgetedLM` with their own :class:`Limits`. Before
every call it compares what the role has used so far, plus what the call would add, with
its limits and raises :class:`BudgetExhausted` instead of dispatching.

The unit every method is compared in is the **example-evaluation**: one prompt applied to
one example, whatever it costs inside. Scoring a candidate's label words on one example is
one (however many labels there are), so is one generated answer, one sampled proposal, and
one example in a gradient batch. The number a call needs is known before it is sent
(distinct context-and-prompt pairs, or contexts times samples), so a cap in examples is
never exceeded by even one; calls never exceed theirs either. Tokens and money are known
only afterwards, so they overshoot by at most the one call that crossed them.

What counts is the work the *method asked for*: a call served entirely from the evaluation
cache counts as a call, with the tokens its result cost when it was first computed. A
capped trial therefore stops at the same step whether or not the cache was warm, two
methods with the same budget get the same amount of search however the trials were
scheduled, and re-running a capped sweep replays it with no new model calls. The money and
tokens actually sent to the model are the ``calls``/``tokens`` counters of :class:`Meter`.

The trial scores its final prompt on test outside the budget: that is the report, not
the search (it is still metered in ``scorer_calls``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from methods.lm import Request
from pipelines.lm.client import Meter, forward_to_inner

ROLES = ("scorer", "proposer")


class BudgetExhausted(RuntimeError):
    """A role's budget was used up before a call could start; nothing was dispatched."""


def _check_cap(name: str, value, integer: bool):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and value != int(value)):
        raise ValueError(f"{name}={value!r}: expected a positive {'integer' if integer else 'number'} or null")
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{name}={value!r}: a budget must be a positive, finite number (null = unlimited)")
    return int(value) if integer else float(value)


@dataclass(frozen=True)
class Limits:
    """One role's caps per trial; ``None`` is unlimited.

    Attributes:
        examples: example-evaluations (see the module docstring): the unit budgets compare in.
        calls: LM calls (each batched call counts once, however many requests it holds).
        tokens: tokens of those calls, as the LM actor counts them (contexts once, plus
            continuations or generated text).
        usd: estimated price in US dollars (needs the model's ``price_*_per_1k``).
    """

    examples: int | None = None
    calls: int | None = None
    tokens: int | None = None
    usd: float | None = None

    @classmethod
    def parse(cls, role: str, raw: dict | None) -> Limits:
        raw = dict(raw or {})
        unknown = sorted(set(raw) - {"examples", "calls", "tokens", "usd"})
        if unknown:
            raise ValueError(f"budget.{role}: unknown key(s) {unknown}; expected examples, calls, tokens, usd")
        return cls(
            examples=_check_cap(f"budget.{role}.examples", raw.get("examples"), True),
            calls=_check_cap(f"budget.{role}.calls", raw.get("calls"), True),
            tokens=_check_cap(f"budget.{role}.tokens", raw.get("tokens"), True),
            usd=_check_cap(f"budget.{role}.usd", raw.get("usd"), False),
        )

    def unbounded(self) -> bool:
        return self.examples is None and self.calls is None and self.tokens is None and self.usd is None

    def exceeded(self, meter: Meter, examples: int = 0) -> str:
        """Why a call needing ``examples`` example-evaluations may not start (empty if it may)."""
        if self.examples is not None and meter.examples + examples > self.examples:
            return f"{meter.examples:,} of {self.examples:,} example-evaluations used, the next call needs {examples:,}"
        if self.calls is not None and meter.charged_calls() >= self.calls:
            return f"{meter.charged_calls()} of {self.calls} calls used"
        if self.tokens is not None and meter.charged_tokens() >= self.tokens:
            return f"{meter.charged_tokens():.0f} of {self.tokens} tokens used"
        if self.usd is not None and meter.usd >= self.usd:
            return f"${meter.usd:.4f} of ${self.usd} used"
        return ""

    def describe(self, times: int = 1) -> str:
        caps = [
            f"<={self.examples * times:,} example-evaluations" if self.examples is not None else "",
            f"<={self.calls * times:,} calls" if self.calls is not None else "",
            f"<={self.tokens * times:,} tokens" if self.tokens is not None else "",
            f"<=${self.usd * times:,.2f}" if self.usd is not None else "",
        ]
        return ", ".join(c for c in caps if c) or "unbounded"


@dataclass(frozen=True)
class Budget:
    """Per-trial limits of both roles (the ``budget`` config group)."""

    scorer: Limits = Limits()
    proposer: Limits = Limits()

    @classmethod
    def parse(cls, raw: dict | None) -> Budget:
        """From the plain ``budget`` config; ``ValueError`` (one line) on a bad key or value."""
        raw = dict(raw or {})
        unknown = sorted(set(raw) - set(ROLES))
        if unknown:
            raise ValueError(f"budget: unknown key(s) {unknown}; expected scorer and proposer")
        return cls(*(Limits.parse(role, raw.get(role)) for role in ROLES))


@dataclass(frozen=True)
class Price:
    """US dollars per 1,000 tokens sent to (``prompt``) and produced by (``completion``) a model."""

    prompt: float = 0.0
    completion: float = 0.0

    @classmethod
    def of(cls, model: dict) -> Price:
        """The price a model config declares (``price_in_per_1k``/``price_out_per_1k``; else free)."""
        return cls(float(model.get("price_in_per_1k") or 0.0), float(model.get("price_out_per_1k") or 0.0))

    def free(self) -> bool:
        return self.prompt == 0 and self.completion == 0

    def cost(self, tokens: float, prompt_share: float = 1.0, prompt_repeats: int = 1) -> float:
        """Price of ``tokens``, of which ``prompt_share`` were prompt tokens sent ``prompt_repeats`` times."""
        prompt = tokens * prompt_share
        return (prompt * prompt_repeats * self.prompt + (tokens - prompt) * self.completion) / 1000.0


def _chars(texts) -> int:
    return sum(len(t) for t in texts)


def scored_examples(requests) -> int:
    """Example-evaluations in a scoring or gradient batch: distinct (context, prompt) pairs
    (a gradient batch's ``(context, target)`` pairs share the call's one prompt).

    A label task sends one request per label word with the same context; they are one
    evaluation. Prompts compare by value where they can (token prompts) and by identity
    otherwise (soft prompts and prefixes: one object per candidate).
    """
    return len({(r[0], r[2] if len(r) > 2 else None) for r in requests})


def share_spent(step: int, examples: float, cap: int | None, max_steps: int, planned: int = 0) -> float:
    """How far a trial's search is, in [0, 1]: the furthest of its example-evaluations against
    its cap, its steps against the step cap and its steps against those its method plans."""
    shares = [step / max_steps if max_steps else 0.0, examples / cap if cap else 0.0, step / planned if planned else 0.0]
    return min(1.0, max(shares))


class BudgetedLM:
    """An ``LM`` that refuses to start a call once its role's budget is used up.

    Args:
        inner: the LM doing the work; its ``usage`` is a :class:`Meter` that it (and a cache
            below it) keeps up to date. Read on every call, so a trial that restores its
            counters from a checkpoint (:meth:`Meter.restore`) is budgeted from there on.
        limits: this role's caps.
        role: "scorer" or "proposer", for messages.
        price: what the model charges; money is estimated from the counted tokens.
    """

    def __init__(self, inner, limits: Limits, role: str = "scorer", price: Price = Price()) -> None:
        self.inner, self.limits, self.role, self.price = inner, limits, role, price

    __getattr__ = forward_to_inner  # embeddings, prefix states, tokenizing: free

    def _check(self, examples: int) -> float:
        """Raise if the call does not fit in what is left; else the tokens charged so far (to price it by)."""
        reason = self.limits.exceeded(self.usage, examples)
        if reason:
            self.usage.budget_exhausted = 1
            raise BudgetExhausted(f"{self.role} budget exhausted: {reason}")
        return self.usage.charged_tokens()

    def _charge(self, before: float, examples: int, prompt_share: float = 1.0, prompt_repeats: int = 1) -> None:
        # Charged once the call returned: a call that failed did no evaluation.
        self.usage.examples += examples
        spent = self.usage.charged_tokens() - before
        self.usage.usd += self.price.cost(spent, prompt_share, prompt_repeats)

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        requests = list(requests)
        examples = scored_examples(requests)
        before = self._check(examples)
        out = self.inner.loglikelihood(requests)
        self._charge(before, examples)
        return out

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=(), prompt=None):
        contexts = list(contexts)
        examples = len(contexts) * n
        before = self._check(examples)
        extra = {} if prompt is None else {"prompt": prompt}
        out = self.inner.generate(
            contexts, max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed, stop=stop, **extra
        )
        # The actor counts prompt and generated tokens together; split them by characters.
        # A sampling backend that sends one request per sample pays for the prompt n times.
        prompt_chars, out_chars = _chars(contexts), _chars(s for row in out for s in row)
        share = prompt_chars / max(prompt_chars + out_chars, 1)
        self._charge(before, examples, share, n if temperature > 0 else 1)
        return out

    def answer_states(self, contexts, prompt=None):
        contexts = list(contexts)
        examples = len(contexts)  # one example read under one prompt: one evaluation, as in scoring
        before = self._check(examples)
        out = self.inner.answer_states(contexts, prompt)
        self._charge(before, examples)
        return out

    def prompt_grad(self, requests, prompt):
        requests = list(requests)
        examples = scored_examples(requests)  # (context, target) pairs under one prompt: distinct contexts
        before = self._check(examples)
        out = self.inner.prompt_grad(requests, prompt)
        self._charge(before, examples)
        return out


def projection(cfg: dict, n_trials: int) -> str:
    """The line printed before a sweep starts: per-trial caps and the whole sweep's worst case.

    Raises:
        ValueError: a bad budget (unknown key, negative or non-numeric cap), in one line.
    """
    budget = Budget.parse(cfg.get("budget"))
    prices = trial_settings(cfg)["prices"]
    if budget.scorer.unbounded() and budget.proposer.unbounded():
        return f"[promptsweep] budget: unbounded for all {n_trials} trial(s) (each runs until its method is done or search.max_steps)"
    per = "; ".join(f"{role} {getattr(budget, role).describe()}" for role in ROLES)
    total = "; ".join(f"{role} {getattr(budget, role).describe(n_trials)}" for role in ROLES)
    unpriced = [r for r in ROLES if not prices[r].free() and getattr(budget, r).usd is None]
    money = f" (money unbounded for the priced {'/'.join(unpriced)} model: set budget.<role>.usd)" if unpriced else ""
    return (
        f"[promptsweep] budget per trial: {per}. Projected for {n_trials} trial(s): {total}{money}; "
        f"plus one test-scoring call per trial, outside the budget"
    )


def trial_settings(cfg: dict) -> dict:
    """The budget and price fields of a ``TrialContext``, from the plain sweep config."""
    return {
        "budget": cfg.get("budget") or {},
        "prices": {role: Price.of(cfg["lm"][role]) for role in ROLES},
    }
