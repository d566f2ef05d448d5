"""Scoring prompts on examples by label log-likelihood: one batched LM call per use.

Classification and multiple choice are scored by the log-likelihood of each label
continuation, never by generating and parsing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from methods.lm import LM, PROMPT_SLOT, PrefixPrompt, Prompt, Request, TextPrompt
from tasks.core import Example, Task


def slot_text(prompt: Prompt) -> str:
    """What goes into the template's ``{instruction}`` slot for ``prompt``.

    A prefix prompt sits before the whole context (where PEFT puts it), so its slot is empty.
    """
    if isinstance(prompt, TextPrompt):
        return prompt.text
    return "" if isinstance(prompt, PrefixPrompt) else PROMPT_SLOT


def requests_for(task: Task, prompt: Prompt, examples: Sequence[Example]) -> list[Request]:
    """Every request needed to classify ``examples`` under ``prompt``, in example then choice order.

    A text prompt is rendered into the context; any other prompt rides on each request.
    """
    instruction = slot_text(prompt)
    spliced = None if isinstance(prompt, TextPrompt) else prompt
    return [Request(task.render(instruction, ex), c, spliced) for ex in examples for c in task.choices(ex)]


def predictions(task: Task, examples: Sequence[Example], loglik: np.ndarray) -> np.ndarray:
    """Argmax label per example from the flat log-likelihoods that :func:`requests_for` ordered."""
    preds, i = np.empty(len(examples), dtype=np.int64), 0
    for k, ex in enumerate(examples):
        choices = task.choices(ex)
        ll = np.asarray(loglik[i : i + len(choices)], dtype=np.float64)
        if task.length_normalize:
            ll = ll / np.maximum([len(c) for c in choices], 1)
        preds[k], i = int(np.argmax(ll)), i + len(choices)
    return preds


def score_prompts(
    task: Task, prompts: Sequence[Prompt], examples: Sequence[Example], scorer: LM
) -> list[float]:
    """Task metric of each prompt on ``examples``, all prompts in one batched call."""
    if not prompts:
        return []
    requests = [r for p in prompts for r in requests_for(task, p, examples)]
    loglik = scorer.loglikelihood(requests)
    per = len(requests) // len(prompts)
    return [
        task.score(predictions(task, examples, loglik[j * per : (j + 1) * per]), examples)
        for j in range(len(prompts))
    ]


def predict(task: Task, prompt: Prompt, examples: Sequence[Example], scorer: LM) -> np.ndarray:
    """Predicted label ids for ``examples`` under ``prompt`` (one batched call)."""
    return predictions(task, examples, scorer.loglikelihood(requests_for(task, prompt, examples)))


def subsample(examples: Sequence[Example], n: int, rng: np.random.Generator) -> tuple[Example, ...]:
    """``n`` examples drawn without replacement (all of them when ``n`` is 0 or too large)."""
    if n <= 0 or n >= len(examples):
        return tuple(examples)
    idx = rng.choice(len(examples), size=n, replace=False)
    return tuple(examples[i] for i in sorted(idx))
