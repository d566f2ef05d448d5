"""Scoring prompts on examples: one batched LM call per use, whatever the task kind.

Classification and multiple choice are scored by the log-likelihood of each label
continuation, never by generating and parsing. A task with ``calibration="contextual"``
also scores its content-free inputs under each prompt, in the same call, and divides the
label probabilities by theirs (Zhao et al. 2021) for selection and test alike. Generative tasks
(:class:`tasks.generative.GenTask`) are scored by greedy generation, then the task's
extractor and metric. A *prediction* is a label id for the first kind and the written
output for the second; methods compare predictions with ``task.is_correct`` and show them
with ``task.shown``, so they need not know which kind they optimize.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from methods.lm import LM, PROMPT_SLOT, PrefixPrompt, Prompt, Request, TextPrompt
from tasks.core import Example, Task, example_key
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


def _choice_scores(task: Task, examples: Sequence[Example], loglik: np.ndarray) -> list[np.ndarray]:
    """Per example, its choices' scores from the flat log-likelihoods :func:`requests_for` ordered."""
    out, i = [], 0
    for ex in examples:
        choices = task.choices(ex)
        ll = np.asarray(loglik[i : i + len(choices)], dtype=np.float64)
        if task.length_normalize:
            ll = ll / np.maximum([len(c) for c in choices], 1)
        out.append(ll)
        i += len(choices)
    return out


def label_probabilities(task: Task, examples: Sequence[Example], loglik: np.ndarray,
                        log_prior: np.ndarray | None = None) -> list[np.ndarray]:
    """Per example, its choices' probabilities normalized over its label words (what GEPA shows a
    reflection and RLPrompt's reward reads), contextually calibrated when ``log_prior`` is given."""
    out = []
    for scores in _choice_scores(task, examples, loglik):
        scores = scores if log_prior is None else scores - log_prior
        out.append(np.exp(scores - np.logaddexp.reduce(scores)))
    return out


def predictions(task: Task, examples: Sequence[Example], loglik: np.ndarray, log_prior: np.ndarray | None = None) -> np.ndarray:
    """Argmax label per example; with ``log_prior``, of ``log p(label | x) - log p(label | content-free)``.

    Dividing the normalized label probabilities by the content-free ones (contextual
    calibration) only shifts each label's score by a constant, so the argmax needs no softmax.
    """
    scores = _choice_scores(task, examples, loglik)
    shift = 0.0 if log_prior is None else log_prior
    return np.array([int(np.argmax(s - shift)) for s in scores], dtype=np.int64)


def content_free_log_prior(task: Task, loglik: np.ndarray) -> np.ndarray:
    """``log`` of the mean normalized label probabilities over the task's content-free examples."""
    scores = np.stack(_choice_scores(task, task.content_free_examples(), loglik))
    probs = np.exp(scores - np.logaddexp.reduce(scores, axis=1, keepdims=True))
    return np.log(probs.mean(axis=0))


def calibrated(task) -> bool:
    """Whether ``task`` selects and reports with contextually calibrated label scores."""
    return getattr(task, "calibration", "none") == "contextual"


def headline(task, raw: list, cal: list | None) -> list:
    """Of :func:`predict_raw_and_calibrated`'s two, the predictions ``task`` selects and reports with."""
    return cal if cal is not None and calibrated(task) else raw


def _label_predictions(task: Task, prompts: Sequence[Prompt], examples: Sequence, scorer: LM, calibrate: bool):
    """Per prompt ``(raw, calibrated or None)`` label ids; content-free inputs ride in the same call."""
    free = task.content_free_examples() if calibrate else ()
    requests = [r for p in prompts for r in requests_for(task, p, tuple(examples) + free)]
    loglik = scorer.loglikelihood(requests)
    per, n_ex = len(requests) // len(prompts), sum(len(task.choices(ex)) for ex in examples)
    out = []
    for j in range(len(prompts)):
        block = loglik[j * per : (j + 1) * per]
        raw = predictions(task, examples, block[:n_ex])
        cal = predictions(task, examples, block[:n_ex], content_free_log_prior(task, block[n_ex:])) if calibrate else None
        out.append((raw, cal))
    return out


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
        both = _label_predictions(task, prompts, examples, scorer, calibrated(task))
        return [list(raw if cal is None else cal) for raw, cal in both]
    if all(isinstance(p, TextPrompt) for p in prompts):
        # every instruction on every example, instruction-major, in one call
        flat = _greedy(task, [task.render(p.text, ex) for p in prompts for ex in examples], scorer)
        return [flat[j * len(examples) : (j + 1) * len(examples)] for j in range(len(prompts))]
    return [outputs(task, p, examples, scorer) for p in prompts]


def score_prompts(task, prompts: Sequence[Prompt], examples: Sequence, scorer: LM) -> list[float]:
    """Task metric of each prompt on ``examples``, all prompts in one batched call."""
    return [task.score(preds, examples) for preds in predict_many(task, prompts, examples, scorer)]


def example_scores(task, predictions: Sequence, examples: Sequence) -> tuple[float, ...]:
    """Each example's outcome under one prompt: 1/0 on a label task, the metric on a generative one."""
    if is_generative(task):
        return tuple(float(task.example_score(p, ex)) for p, ex in zip(predictions, examples))
    return tuple(float(task.is_correct(p, ex)) for p, ex in zip(predictions, examples))


def provenance(task, predictions: Sequence, examples: Sequence) -> dict:
    """``Evaluated``'s ``examples`` and ``outcomes`` for one prompt's predictions (``Evaluated(..., **provenance(...))``)."""
    return {"examples": tuple(example_key(ex) for ex in examples),
            "outcomes": example_scores(task, predictions, examples)}


def scored_prompts(task, prompts: Sequence[Prompt], examples: Sequence, scorer: LM) -> list[tuple[float, dict]]:
    """:func:`score_prompts` with each prompt's :func:`provenance`, from the same one call."""
    return [(task.score(preds, examples), provenance(task, preds, examples))
            for preds in predict_many(task, prompts, examples, scorer)]


def predict(task, prompt: Prompt, examples: Sequence, scorer: LM) -> list:
    """Predictions for ``examples`` under ``prompt``: label ids, or a generative task's outputs."""
    return predict_many(task, [prompt], examples, scorer)[0]


def predict_raw_and_calibrated(task, prompt: Prompt, examples: Sequence, scorer: LM) -> tuple[list, list | None]:
    """A label task's raw and contextually calibrated predictions from one call (what a report
    shows side by side); a generative task's outputs and ``None``, as for a task that cannot be
    calibrated (per-example options)."""
    if is_generative(task):
        return predict(task, prompt, examples, scorer), None
    ((raw, cal),) = _label_predictions(task, [prompt], examples, scorer, task.calibratable())
    return list(raw), None if cal is None else list(cal)


def subsample(examples: Sequence[Example], n: int, rng: np.random.Generator) -> tuple[Example, ...]:
    """``n`` examples drawn without replacement (all of them when ``n`` is 0 or too large)."""
    if n <= 0 or n >= len(examples):
        return tuple(examples)
    idx = rng.choice(len(examples), size=n, replace=False)
    return tuple(examples[i] for i in sorted(idx))
