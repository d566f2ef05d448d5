"""Reading an answer out of what a model wrote, and comparing it with the gold: for generative tasks.

Pure text functions, no model and no task type: the extractors and metrics the generative
benchmarks are scored with, so that every method and every backend is judged by the same rules.

- GSM8K (Cobbe et al. 2021): the gold is the number after ``####``; a model's answer is the
  number after its last "the answer is", else the last number it wrote (the flexible match
  lm-evaluation-harness reports beside its strict ``####`` match). Numbers compare by value,
  with thousands separators, a currency sign and a trailing period stripped.
- BBH (Suzgun et al. 2022): the answer follows the last "the answer is" of a chain of thought
  (the wording of BBH's own CoT prompts), or is the whole output when answering directly;
  exact match after stripping whitespace, a trailing period and the parentheses of an option
  letter, case-insensitive (``True``/``true``, ``(A)``/``A``).
- Token F1 (SQuAD-style: lowercased, punctuation and articles dropped) and "contains", for
  free-form answers.

A malformed output is a wrong answer (``None`` from an extractor), never an exception.
"""

from __future__ import annotations

import re
import string
from collections import Counter

# A number as people write it: optional sign, thousands separators, decimals ("-1,234.50").
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\$?\.\d+")
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def number_value(text: str) -> float | None:
    """The value of one written number (``"$1,234.50"`` -> 1234.5); ``None`` if it is not one."""
    cleaned = text.strip().rstrip(".").replace(",", "").replace("$", "")
    try:
        return float(cleaned)
    except ValueError:
        return None


def gsm8k_gold(answer: str) -> str:
    """The final answer of a GSM8K solution: what follows ``####``, separators removed."""
    _, sep, final = answer.rpartition("####")
    if not sep:
        raise ValueError("a GSM8K answer must end with '#### <number>'")
    return final.strip().replace(",", "")


def last_number(output: str) -> str | None:
    """The number a model gave as its answer: the first one after its last "the answer is",
    else the last number in the output; ``None`` when it wrote none."""
    tail = _ANSWER_IS.split(output)
    if len(tail) > 1:
        found = _NUMBER.findall(tail[-1])
        if found:
            return found[0]
    found = _NUMBER.findall(output)
    return found[-1] if found else None


def numeric_match(prediction: str | None, gold: str, tol: float = 1e-6) -> bool:
    """Whether two written numbers have the same value (``"18.00"`` equals ``"18"``)."""
    if prediction is None:
        return False
    a, b = number_value(prediction), number_value(gold)
    return a is not None and b is not None and abs(a - b) <= tol * max(1.0, abs(b))


def after_answer_is(output: str) -> str:
    """What follows the last "the answer is" up to the end of its line; the first line of the
    output when there is none (a direct answer)."""
    parts = _ANSWER_IS.split(output)
    text = parts[-1] if len(parts) > 1 else output.strip()
    return text.strip().splitlines()[0].strip() if text.strip() else ""


def normalize_choice(text: str) -> str:
    """A short answer for exact match: trimmed, no trailing period, ``(A)`` as ``a``, lowercased."""
    text = text.strip().rstrip(".").strip()
    if re.fullmatch(r"\([A-Za-z]\)", text):
        text = text[1]
    return text.lower()


def exact_match(prediction: str | None, gold: str) -> bool:
    """BBH's metric: the normalized prediction equals the normalized gold."""
    return prediction is not None and normalize_choice(prediction) == normalize_choice(gold)


def _tokens(text: str) -> list[str]:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in string.punctuation)
    return _ARTICLES.sub(" ", text).split()


def token_f1(prediction: str | None, gold: str) -> float:
    """SQuAD-style token F1 between a free-form answer and the gold (1.0 when both are empty)."""
    if prediction is None:
        return 0.0
    pred, ref = _tokens(prediction), _tokens(gold)
    if not pred or not ref:
        return float(pred == ref)
    return _f1(pred, ref)


def _f1(pred: list[str], ref: list[str]) -> float:
    """Harmonic mean of token precision and recall (0.0 when nothing is shared)."""
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def contains(prediction: str | None, gold: str) -> bool:
    """Whether the normalized gold occurs in the normalized prediction (free-form answers)."""
    if prediction is None:
        return False
    return " ".join(_tokens(gold)) in " ".join(_tokens(prediction))


# Instruction induction, scored as APE scores it (Zhou et al. 2023, whose evaluation code takes
# it from Honovich et al. 2022): the output's first line, cut at its first period, lowercased,
# " and " and "Sentence 1:/2:" dropped, hyphens as spaces, punctuation removed; then exact
# match, token F1, exact set of words, or whole-word containment against each gold answer,
# best of the answers.

def ape_normalize(text: str) -> str:
    """APE's ``normalize_prediction``."""
    text = text.replace(" and ", " ").replace("Sentence 1:", " ").replace("Sentence 2:", " ")
    text = text.strip().split("\n")[0].split(".")[0].lower().replace("-", " ")
    return text.translate(str.maketrans("", "", string.punctuation))


def ape_em(prediction: str | None, gold: str) -> float:
    return float(prediction is not None and ape_normalize(prediction) == ape_normalize(gold))


def ape_f1(prediction: str | None, gold: str) -> float:
    if prediction is None:
        return 0.0
    return _f1(ape_normalize(prediction).split(), ape_normalize(gold).split())


def ape_set(prediction: str | None, gold: str) -> float:
    return float(prediction is not None and set(ape_normalize(prediction).split()) == set(ape_normalize(gold).split()))


def ape_contains(prediction: str | None, gold: str) -> float:
    if prediction is None:
        return 0.0
    return float(re.search(rf"\b({re.escape(ape_normalize(gold))})\b", ape_normalize(prediction)) is not None)
