"""GRIPS (Prasad et al. 2022): gradient-free, edit-based search over an instruction's phrases.

The instruction is split into phrases; an edit deletes a phrase, swaps two, paraphrases one
(with the proposer) or adds back a phrase deleted earlier. Each step samples
``num_candidates`` edited instructions, scores them in one batched call, and accepts the best
only if it beats the current instruction; ``patience`` steps without improvement end the
search. With ``paraphrase=False`` no proposer call is ever made.

Candidates are ranked, as in the reference code (``score()`` in archiki/GrIPS
``run_search.py``), by ``100 * balanced accuracy + 10 * entropy of the predicted-label
distribution`` on 100 examples (``objective="paper"``): the entropy term keeps the search from
an instruction that predicts one label for everything, which plain accuracy rewards on
unbalanced data. The reported ``dev_score`` is the task metric of the current instruction,
so GRIPS stays comparable with every other method. ``objective="metric"`` ranks by the task
metric instead; a generative task (no label set) always does.

Still simplified from the paper: phrases come from a punctuation/conjunction splitter plus a
word window instead of a constituency parser; the paraphraser is the proposer LM instead of
PEGASUS; the score set is the fixed dev subset, not a sample of train; no simulated annealing
(the reference's optional ``--simulated-anneal``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.ape import RESAMPLE_TEMPLATE
from methods.base import Evaluated, Report
from methods.evaluate import predict_many, provenance
from methods.lm import LM, Needs, PROPOSER_WRITES, TextPrompt
from methods.racing import fixed_dev
from tasks.core import Task
from tasks.generative import is_generative

_CLAUSE_END = re.compile(r"(?<=[,;:.!?])\s+")
_CONJUNCTION = re.compile(r"\s+(?=\b(?:and|but|or|then|so|because|which|while|if)\b)", re.IGNORECASE)
_QUOTES = "\"'`“”‘’"

Phrases = tuple[str, ...]


OBJECTIVES = ("paper", "metric")


def balanced_accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Mean recall over the classes present in ``labels`` (scikit-learn's ``balanced_accuracy_score``)."""
    p, y = np.asarray(predictions), np.asarray(labels)
    return float(np.mean([np.mean(p[y == c] == c) for c in np.unique(y)])) if len(y) else 0.0


def label_entropy(predictions: Sequence[int], n_labels: int) -> float:
    """Entropy (nats) of the predicted-label frequencies over all ``n_labels`` labels."""
    from scipy.stats import entropy

    counts = np.bincount(np.asarray(predictions, dtype=int), minlength=n_labels)
    return float(entropy(counts)) if counts.sum() else 0.0


def paper_objective(predictions: Sequence[int], labels: Sequence[int], n_labels: int) -> float:
    """GRIPS's search score: ``100 * balanced accuracy + 10 * entropy`` of the predicted labels."""
    return 100.0 * balanced_accuracy(predictions, labels) + 10.0 * label_entropy(predictions, n_labels)


def split_phrases(text: str, max_words: int = 5) -> Phrases:
    """Phrases of ``text``: clauses (at punctuation and conjunctions) cut into word windows.

    A clause longer than ``max_words`` is cut into the fewest near-equal windows that fit.
    ``" ".join`` of the phrases gives back ``text`` up to whitespace.
    """
    phrases: list[str] = []
    for clause in _CLAUSE_END.split(text.strip()):
        for part in _CONJUNCTION.split(clause):
            words = part.split()
            if not words:
                continue
            n = math.ceil(len(words) / max_words)
            bounds = np.linspace(0, len(words), n + 1).round().astype(int)
            phrases += [" ".join(words[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return tuple(phrases)


def join(phrases: Phrases) -> str:
    """The instruction text of ``phrases``."""
    return " ".join(phrases)


def delete(phrases: Phrases, rng: np.random.Generator) -> tuple[Phrases, str]:
    """Remove one random phrase; returns the new phrases and the deleted one."""
    i = int(rng.integers(len(phrases)))
    return phrases[:i] + phrases[i + 1 :], phrases[i]


def swap(phrases: Phrases, rng: np.random.Generator) -> Phrases:
    """Exchange two distinct random phrases."""
    i, j = (int(k) for k in rng.choice(len(phrases), size=2, replace=False))
    out = list(phrases)
    out[i], out[j] = out[j], out[i]
    return tuple(out)


def add(phrases: Phrases, pool: Sequence[str], rng: np.random.Generator) -> Phrases:
    """Insert a phrase from ``pool`` (earlier deletions) at a random position."""
    phrase = pool[int(rng.integers(len(pool)))]
    i = int(rng.integers(len(phrases) + 1))
    return phrases[:i] + (phrase,) + phrases[i:]


def substitute(phrases: Phrases, i: int, raw: str) -> Phrases | None:
    """Phrase ``i`` replaced by a paraphrase's first line; ``None`` if the paraphrase is unusable."""
    line = next((ln.strip().strip(_QUOTES).strip() for ln in raw.splitlines() if ln.strip()), "")
    # A "paraphrase" three times longer than its phrase is a runaway continuation, not an edit.
    too_long = len(line.split()) > 3 * len(phrases[i].split()) + 3
    if not line or too_long or line.lower() == phrases[i].lower():
        return None
    return phrases[:i] + (line,) + phrases[i + 1 :]


@dataclass(frozen=True)
class GRIPSState:
    """Current phrases and score, deleted-phrase pool, every text scored, counters."""

    phrases: Phrases = ()
    score: float | None = None  # the search objective of the current phrases
    metric: float | None = None  # their task metric on the same examples (the reported dev_score)
    deleted: tuple[str, ...] = ()
    seen: tuple[str, ...] = ()
    step: int = 0
    patience_left: int = 0
    proposed: int = 0
    usable: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class _Edit:
    """One candidate in the making: its phrases, phrases it deleted, a pending paraphrase slot."""

    phrases: Phrases
    deleted: tuple[str, ...] = ()
    par_index: int = -1


@dataclass(frozen=True)
class GRIPS:
    """Gradient-free, edit-based instruction search.

    Args:
        num_candidates: edited candidates sampled and scored per step (the paper's m).
        edits_per_candidate: edit operations composed per candidate (the paper's l).
        patience: steps without improvement before the search stops (the paper's P).
        paraphrase: allow the paraphrase edit (the only one that calls the proposer).
        max_phrase_words: longest phrase the splitter keeps whole.
        n_eval: dev examples each candidate is scored on (0 = whole dev split; the paper's 100).
        objective: ``paper`` (100 * balanced accuracy + 10 * label entropy) or ``metric``.
        temperature: proposer temperature for paraphrases.
        max_new_tokens: paraphrase length cap.
    """

    num_candidates: int = 5
    edits_per_candidate: int = 1
    patience: int = 2
    paraphrase: bool = True
    max_phrase_words: int = 5
    n_eval: int = 100
    objective: str = "paper"
    temperature: float = 0.9
    max_new_tokens: int = 24

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not {self.objective!r}")

    def needs(self) -> Needs:
        return PROPOSER_WRITES if self.paraphrase else Needs()  # only paraphrases call the proposer

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> GRIPSState:
        phrases = split_phrases(task.instruction, self.max_phrase_words)
        return GRIPSState(phrases=phrases, patience_left=self.patience)

    def step(self, state: GRIPSState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        drafts = [self._draft(state, rng) for _ in range(self.num_candidates)]
        edits = self._paraphrase(drafts, proposer, rng)
        edits = self._unique(edits, state)
        # The first step scores the starting instruction in the same call.
        base = [] if state.score is not None else [join(state.phrases)]
        texts = base + [join(e.phrases) for e in edits]
        dev = fixed_dev(task, self.n_eval)
        preds = predict_many(task, [TextPrompt(t) for t in texts], dev, scorer)
        metrics = [task.score(p, dev) for p in preds]
        scores = [self._objective(task, p, dev) for p in preds]
        current = (state.score, state.metric) if state.score is not None else (scores[0], metrics[0])
        new = self._accept(state, edits, scores[len(base) :], metrics[len(base) :], current)
        new = replace(
            new, step=state.step + 1, seen=state.seen + tuple(texts),
            proposed=state.proposed + len(drafts), usable=state.usable + len(edits),
        )
        kinds = ["seed"] * len(base) + ["edit"] * len(edits)
        # every edit of a step is applied to the current instruction
        parents = [""] * len(base) + [join(state.phrases)] * len(edits)
        # Logged with the task metric, like every method's candidates; the objective is in the metrics.
        evaluated = tuple(Evaluated(t, m, len(dev), k, parent, **provenance(task, p, dev))
                          for t, m, k, parent, p in zip(texts, metrics, kinds, parents, preds))
        return new, Report(self._metrics(new, scores[len(base) :]), evaluated)

    def _objective(self, task: Task, preds, dev) -> float:
        if self.objective == "metric" or is_generative(task):
            return task.score(preds, dev)
        n_labels = max(len(task.choices(ex)) for ex in dev)  # per-example options (MMLU cloze) or the verbalizer
        return paper_objective(preds, [ex.label for ex in dev], n_labels)

    def _ops(self, phrases: Phrases, deleted: Sequence[str]) -> list[str]:
        ops = ["del", "swap"] if len(phrases) >= 2 else []
        ops += ["par"] if self.paraphrase and phrases else []
        ops += ["add"] if deleted else []
        return ops

    def _draft(self, state: GRIPSState, rng: np.random.Generator) -> _Edit:
        """Up to ``edits_per_candidate`` edits; structural ones apply now.

        A paraphrase only marks its phrase for the proposer's batched call, so it ends the
        composition (later edits would move or delete the marked phrase).
        """
        edit = _Edit(state.phrases)
        for _ in range(self.edits_per_candidate):
            ops = self._ops(edit.phrases, state.deleted)
            if not ops:
                break
            op = ops[int(rng.integers(len(ops)))]
            if op == "del":
                phrases, gone = delete(edit.phrases, rng)
                edit = replace(edit, phrases=phrases, deleted=edit.deleted + (gone,))
            elif op == "swap":
                edit = replace(edit, phrases=swap(edit.phrases, rng))
            elif op == "add":
                edit = replace(edit, phrases=add(edit.phrases, state.deleted, rng))
            else:
                return replace(edit, par_index=int(rng.integers(len(edit.phrases))))
        return edit

    def _paraphrase(self, drafts: list[_Edit], proposer: LM, rng: np.random.Generator) -> list[_Edit]:
        """Fill every pending paraphrase slot from one generate call; drop unusable ones."""
        pending = [d for d in drafts if d.par_index >= 0]
        if not pending:
            return drafts
        contexts = [RESAMPLE_TEMPLATE.format(instruction=d.phrases[d.par_index]) for d in pending]
        outs = proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=int(rng.integers(2**31)), stop=("\n",),
        )
        filled = iter(substitute(d.phrases, d.par_index, o[0]) for d, o in zip(pending, outs))
        done = []
        for d in drafts:
            phrases = next(filled) if d.par_index >= 0 else d.phrases
            if phrases is not None:
                done.append(replace(d, phrases=phrases, par_index=-1))
        return done

    def _unique(self, edits: list[_Edit], state: GRIPSState) -> list[_Edit]:
        """Drop empty candidates and any text already scored this run."""
        known, out = {t.lower() for t in state.seen} | {join(state.phrases).lower()}, []
        for e in edits:
            key = join(e.phrases).lower()
            if e.phrases and key not in known:
                known.add(key)
                out.append(e)
        return out

    def _accept(
        self, state: GRIPSState, edits: list[_Edit], scores: list[float], metrics: list[float],
        current: tuple[float, float],
    ) -> GRIPSState:
        """Move to the best candidate only if its objective strictly beats the current instruction's."""
        if edits and max(scores) > current[0]:
            i = int(np.argmax(scores))
            return replace(
                state, phrases=edits[i].phrases, score=scores[i], metric=metrics[i], patience_left=self.patience,
                deleted=state.deleted + tuple(p for p in edits[i].deleted if p not in state.deleted),
                accepted=state.accepted + 1,
            )
        return replace(state, score=current[0], metric=current[1], patience_left=state.patience_left - 1)

    def _metrics(self, state: GRIPSState, scores: list[float]) -> dict[str, float]:
        return {
            "dev_score": float(state.metric if state.metric is not None else state.score),  # older checkpoints
            "objective": float(state.score),
            "step_best": max(scores, default=float("nan")),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "accepted": float(state.accepted),
            "patience_left": float(state.patience_left),
        }

    def best(self, state: GRIPSState) -> TextPrompt:
        return TextPrompt(join(state.phrases))

    def done(self, state: GRIPSState) -> bool:
        return state.score is not None and state.patience_left <= 0
