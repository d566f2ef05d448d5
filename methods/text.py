"""Helpers shared by the text-prompt methods: cleaning what a proposer LM writes.

Small proposers (a 135M model on CPU) often continue a meta-prompt with example inputs,
blank lines or copies of the demos instead of an instruction. Every text method runs its
raw proposals through :func:`clean_candidates` and reports how many were usable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from tasks.core import Example, Task

_SCAFFOLD = ("shots", "header", "subject")
_QUOTES = "\"'`“”‘’"
_LIST_MARK = re.compile(r"^\s*(?:\d+[.)]|[-*•]|instruction\s*\d*\s*:)\s*", re.IGNORECASE)


def clean_one(raw: str, max_words: int = 60, skip: re.Pattern | None = None) -> str:
    """First usable line of ``raw``, list markers and wrapping quotes removed; '' if none.

    Small models often open with a blank line, a code fence or a one-word heading before the
    instruction, so such lines are skipped rather than fatal; so are lines ``skip`` matches
    (at their start, once heading marks are stripped).
    """
    for line in raw.splitlines():
        line = line.strip().lstrip("#>*=").strip()
        if line.startswith("```") or (skip is not None and skip.match(line)):
            continue
        line = _LIST_MARK.sub("", line).strip().strip(_QUOTES).strip()
        if 2 <= len(line.split()) <= max_words:
            return line[0].upper() + line[1:]
    return ""


def clean_candidates(
    raws: Iterable[str], banned: Sequence[str] = (), seen: Iterable[str] = ()
) -> list[str]:
    """Usable, de-duplicated instructions from raw proposals.

    Args:
        raws: proposer outputs.
        banned: texts a candidate must not copy (the demo inputs shown to the proposer).
        seen: instructions already known (dropped as duplicates, case-insensitively).
    """
    return [cand for cand, _ in clean_with_parents(((raw, "") for raw in raws), banned, seen)]


def clean_with_parents(
    raws: Iterable[tuple[str, str]], banned: Sequence[str] = (), seen: Iterable[str] = ()
) -> list[tuple[str, str]]:
    """:func:`clean_candidates` over ``(raw, parent)`` pairs, each kept candidate with its parent.

    Cleaning drops and de-duplicates proposals, so positions no longer say which prompt a
    candidate was written from; the pair keeps that link (a duplicate keeps its first parent).
    """
    known = {_key(s) for s in seen}
    banned_keys = [_key(b) for b in banned if len(b) > 12]
    out = []
    for raw, parent in raws:
        cand = clean_one(raw)
        key = _key(cand)
        if not cand or key in known or any(b in key or key in b for b in banned_keys):
            continue
        known.add(key)
        out.append((cand, parent))
    return out


def _key(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def demo_block(task: Task, examples: Sequence[Example], output_name: str = "Output") -> str:
    """Input/output pairs in the form APE's forward-generation template shows them."""
    lines = []
    for ex in examples:
        text = " ".join(ex.inputs[f] for f in task.fields if f not in _SCAFFOLD)
        lines.append(f"Input: {text}\n{output_name}: {task.answer_text(ex)}")
    return "\n\n".join(lines)


def input_texts(examples: Sequence[Example]) -> list[str]:
    """The example-specific input values of ``examples`` (what proposals must not copy).

    Shared scaffolding (MMLU's header and shots) is left out: it is not an input.
    """
    return [v for ex in examples for k, v in ex.inputs.items() if k not in _SCAFFOLD]
