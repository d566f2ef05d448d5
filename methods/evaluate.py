"""Scoring prompts on examples: one batched LM call per use, whatever the task kind.

Classification and multiple choice are scored by the log-likelihood of each label
continuation, never by generating and parsing. Generative tasks
(:class:`tasks.generative.GenTask`) are scored by greedy generation, then the task's
extractor and metric. A *prediction* is a label id for the first kind and the written
output for the second; methods compare predictions with ``task.is_correct`` and show them
with ``task.shown``, so they need not know which kind they optimize.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from methods.lm import LM, PROMPT_SLOT, PrefixPrompt, Prompt, Request, TextPrompt
from tasks.core import Example, Task
from tasks.generative import is_generative


def slot_text(prompt: Prompt) -> str:
    """What goes into the template's ``{instruction}`` slot for ``prompt``.

    A prefix prompt sits before the whole context (where PEFT puts it), so its slot is empty.
    """
    if isinstance(prompt, TextPrompt):
        return prompt.text
    return "" if isinstance(prompt, PrefixPrompt) else PROMPT_SLOT


def spliced_prompt(prompt: Prompt) -> Prompt | None:
    """What rides along with each request: nothing for a text prompt (it is rendered), else the prompt."""
    return None if isinstance(prompt, TextPrompt) else prompt


def requests_for(task: Task, prompt: Prompt, examples: Sequence[Example]) -> list[Request]:
    """Every request needed to classify ``examples`` under ``prompt``, in example then choice order.

    A text prompt is rendered into the context; any other prompt rides on each request.
    """
    instruction, spliced = slot_text(prompt), spliced_prompt(prompt)
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


def outputs(task, prompt: Prompt, examples: Sequence, scorer: LM) -> list[str]:
    """Greedy outputs of a generative task's ``examples`` under ``prompt`` (one ``generate`` call).

    A text prompt is rendered into each context; a token, soft or prefix prompt rides along
    (the backend splices it, or puts a prefix's states first).
    """
    return _greedy(task, [task.render(slot_text(prompt), ex) for ex in examples], scorer, spliced_prompt(prompt))


def _greedy(task, contexts: list[str], scorer: LM, prompt: Prompt | None = None) -> list[str]:
    """One greedy ``generate`` call with the task's decoding settings; the text of each context's answer."""
    if not contexts:
        return []
    extra = {} if prompt is None else {"prompt": prompt}
    outs = scorer.generate(contexts, max_new_tokens=task.max_new_tokens, temperature=0.0, stop=task.stop, **extra)
    return [row[0] for row in outs]


def predict_many(task, prompts: Sequence[Prompt], examples: Sequence, scorer: LM) -> list[list]:
    """Each prompt's predictions on ``examples``: label ids (label tasks) or outputs (generative).

    Text prompts go in one call; a generative task's token, soft or prefix prompts take one
    ``generate`` call each (the call applies one spliced prompt to all its contexts).
    """
    if not prompts:
        return []
    if not is_generative(task):
        requests = [r for p in prompts for r in requests_for(task, p, examples)]
        loglik = scorer.loglikelihood(requests)
        per = len(requests) // len(prompts)
        return [list(predictions(task, examples, loglik[j * per : (j + 1) * per])) for j in range(len(prompts))]
    if all(isinstance(p, TextPrompt) for p in prompts):
        # every instruction on every example, instruction-major, in one call
        flat = _greedy(task, [task.render(p.text, ex) for p in prompts for ex in examples], scorer)
        return [flat[j * len(examples) : (j + 1) * len(examples)] for j in range(len(prompts))]
    return [outputs(task, p, examples, scorer) for p in prompts]


def score_prompts(task, prompts: Sequence[Prompt], examples: Sequence, scorer: LM) -> list[float]:
    """Task metric of each prompt on ``examples``, all prompts in one batched call."""
    return [task.score(preds, examples) for preds in predict_many(task, prompts, examples, scorer)]


def predict(task, prompt: Prompt, examples: Sequence, scorer: LM) -> list:
    """Predictions for ``examples`` under ``prompt``: label ids, or a generative task's outputs."""
    return predict_many(task, [prompt], examples, scorer)[0]


def subsample(examples: Sequence[Example], n: int, rng: np.random.Generator) -> tuple[Example, ...]:
    """``n`` examples drawn without replacement (all of them when ``n`` is 0 or too large)."""
    if n <= 0 or n >= len(examples):
        return tuple(examples)
    idx = rng.choice(len(examples), size=n, replace=False)
    return tuple(examples[i] for i in sorted(idx))
