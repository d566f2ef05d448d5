"""EvoPrompt (Guo et al. 2023): evolutionary operators written as instructions to the proposer.

``variant="ga"``: each child comes from two parents picked by roulette wheel on dev score; one
meta-prompt asks the LM to cross them over and mutate the result; the next population is the
top ``pop_size`` of parents and children. ``variant="de"``: for every member, the LM is asked to
find the parts where two other members differ, mutate those parts, splice them into the
current best and cross the result over with the member; the child replaces the member only if
it scores strictly better. All children of a step go to the proposer in one generate call
and to the scorer in one scorer call.

The population starts as the reference code's ``--initial all --initial_mode para_topk``
(beeevita/EvoPrompt ``evoluter.py``, used by its SST-2 and CR scripts): the hand-written
instruction and APE-generated ones are scored, the top ``pop_size // 2`` are kept, and each
is paraphrased once, the paraphrases filling the population (``initial="para_topk"``, two
steps: the pool, then the paraphrases). ``initial="paraphrase"`` starts from the seed
instruction and paraphrases of it in one step, for a cheap run.

Departures: the reference reads its APE prompts from a file made offline
(``prompts_auto.txt``) and several hand-written ones (``prompts.txt``); here the proposer
writes ``init_pool`` prompts with APE's forward template at the first step, and the task has
one hand-written instruction. When paraphrases are unusable the population is filled with
the next-best pool prompts (the reference asserts the size instead). The default sizes are
CPU-sized (population 4, temperature 0.7); ``evoprompt_paper.yaml`` has the paper's 10 and 0.5.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from methods.ape import RESAMPLE_TEMPLATE, forward_proposals
from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import scored_prompts
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev
from methods.text import clean_candidates, clean_one, clean_with_parents
from tasks.core import Task

# The one-shot demonstrations' prompts: a neutral text-simplification example, so no task's
# words leak into another task's prompts. Small proposers tend to copy a demo's answer, so
# children too close to any of these are dropped (see :func:`copies_demo`).
DEMO = (
    "Rewrite the input text into simpler text.",
    "Rewrite my complex sentence in simpler terms, but keep the meaning.",
    "Rewrite the complex text into simpler text while keeping its meaning.",
    "Transform the provided text into simpler language, maintaining its essence.",
    "Simplify the given text so that a child can understand it.",
    "Make the sentence easier to read.",
    "Simplify the given passage into plain words without changing its meaning, so that a child "
    "can understand it.",
    "Make the given passage easier to read, using plain words without changing its meaning.",
)
# The paper's GA template, after its demonstration.
_GA_BODY = (
    "Please follow the instruction step-by-step to generate a better prompt.\n"
    "1. Cross over the following prompts and generate a new prompt:\n"
    "Prompt 1: {p1}\nPrompt 2: {p2}\n"
    "2. Mutate the prompt generated in Step 1 and generate a final prompt bracketed with "
    "<prompt> and </prompt>.\n\n"
)
GA_TEMPLATE = (
    _GA_BODY.format(p1=DEMO[0], p2=DEMO[1])
    + f"1. Crossover Prompt: {DEMO[2]}\n2. <prompt>{DEMO[3]}</prompt>\n\n"
    + _GA_BODY
    + "1. Crossover Prompt:"
)
# The paper's DE template, after a demonstration of the same form.
_DE_BODY = (
    "Please follow the instruction step-by-step to generate a better prompt.\n"
    "1. Identify the different parts between the Prompt 1 and Prompt 2:\n"
    "Prompt 1: {p1}\nPrompt 2: {p2}\n"
    "2. Randomly mutate the different parts\n"
    "3. Combine the different parts with Prompt 3, selectively replace it with the different "
    "parts in Step 2 and generate a new prompt.\nPrompt 3: {p3}\n"
    "4. Cross over the prompt in the Step 3 with the following basic prompt and generate a final "
    "prompt bracketed with <prompt> and </prompt>:\nBasic Prompt: {basic}\n\n"
)
DE_TEMPLATE = (
    _DE_BODY.format(p1=DEMO[0], p2=DEMO[1], p3=DEMO[4], basic=DEMO[5])
    + "1. Different parts: \"input text\" vs \"my complex sentence\"; \"simpler text\" vs "
    "\"simpler terms, but keep the meaning\"\n"
    "2. Mutated parts: \"given passage\"; \"plain words without changing its meaning\"\n"
    f"3. New Prompt: {DEMO[6]}\n4. Final Prompt: <prompt>{DEMO[7]}</prompt>\n\n"
    + _DE_BODY
    + "1. Different parts:"
)
# The operator's own result lines (the DE demo's steps 3 and 4), preferred when a tag is missing.
_RESULT = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:final|new)\s+prompt\s*:", re.IGNORECASE)
_LABEL = re.compile(
    r"^\s*(?:\d+[.)]\s*)?(?:final|new|basic|crossover)?\s*prompt\s*\d*\s*:\s*", re.IGNORECASE
)


def tagged(raw: str, open_tag: str = "<prompt>", close_tag: str = "</prompt>") -> str:
    """The text a proposer bracketed with ``open_tag``/``close_tag``, robust to a missing tag.

    The last opening tag wins (a model may echo the template's own tags first); a missing
    closing tag (generation stopped on it, or was cut) ends the text at the end of the line.
    Without an opening tag: the last line before a closing tag, else the last line labelled
    "Final/New Prompt:", else the first non-empty line, each with its "Prompt:" label removed.
    """
    if open_tag in raw:
        inner = raw.rsplit(open_tag, 1)[1].split(close_tag, 1)[0].strip()
        return inner.splitlines()[0] if inner else ""
    lines = [ln for ln in raw.split(close_tag, 1)[0].splitlines() if ln.strip()]
    if not lines:
        return ""
    labelled = [ln for ln in lines if _RESULT.match(ln)]
    line = lines[-1] if close_tag in raw else (labelled[-1] if labelled else lines[0])
    return _LABEL.sub("", line).strip()


def copies_demo(text: str, threshold: float = 0.6) -> bool:
    """True if ``text`` shares at least ``threshold`` of its words (Jaccard) with a demo prompt."""
    words = set(re.findall(r"\w+", text.lower()))
    for demo in DEMO:
        other = set(re.findall(r"\w+", demo.lower()))
        if words and len(words & other) / len(words | other) >= threshold:
            return True
    return False


@dataclass(frozen=True)
class EvoState:
    """The population as (text, dev score) in member order, and counters.

    ``pool``: the scored starting candidates (seed and APE-generated) while the population is
    being built (``initial="para_topk"``).
    """

    population: tuple[tuple[str, float], ...] = ()
    pool: tuple[tuple[str, float], ...] = ()
    step: int = 0
    proposed: int = 0
    usable: int = 0
    replaced: int = 0


@dataclass(frozen=True)
class EvoPrompt:
    """EvoPrompt with a genetic-algorithm or differential-evolution operator.

    Args:
        variant: "ga" or "de".
        pop_size: population size N (children per step are N as well).
        n_eval: dev examples each prompt is scored on (0 = whole dev split).
        temperature: proposer temperature.
        max_new_tokens: room for the operator's intermediate steps plus the final prompt.
        initial: ``para_topk`` (the reference's: score the seed and APE-generated prompts, keep
            the top half, paraphrase each) or ``paraphrase`` (the seed and its paraphrases).
        init_pool: APE-generated prompts in the starting pool (``para_topk``).
        n_demos: train demos shown per APE proposal.
    """

    variant: str = "ga"
    pop_size: int = 4
    n_eval: int = 32
    temperature: float = 0.7
    max_new_tokens: int = 96
    initial: str = "para_topk"
    init_pool: int = 8
    n_demos: int = 5

    def __post_init__(self) -> None:
        if self.variant not in ("ga", "de"):
            raise ValueError(f"EvoPrompt variant must be 'ga' or 'de', got {self.variant!r}")
        if self.initial not in ("para_topk", "paraphrase"):
            raise ValueError(f"EvoPrompt initial must be 'para_topk' or 'paraphrase', got {self.initial!r}")
        if self.pop_size < 1:
            raise ValueError("EvoPrompt pop_size must be at least 1")

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> EvoState:
        return EvoState()

    def step(self, state: EvoState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if not state.population:
            if self.initial == "paraphrase":
                return self._initialize(state, task, scorer, proposer, rng)
            if not state.pool:
                return self._pool(state, task, scorer, proposer, rng)
            return self._paraphrase_top(state, task, scorer, proposer, rng)
        build = self._ga_contexts if self.variant == "ga" else self._de_contexts
        contexts, parents = build(state, rng)
        outs = proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=int(rng.integers(2**31)), stop=("</prompt>",),
        )
        children = [clean_one(tagged(o[0])) for o in outs]
        children = ["" if copies_demo(c) else c for c in children]
        merge = self._ga_merge if self.variant == "ga" else self._de_merge
        population, evaluated, replaced = merge(state, children, parents, task, scorer)
        new = replace(
            state, population=population, step=state.step + 1, proposed=state.proposed + len(outs),
            usable=state.usable + len(evaluated), replaced=state.replaced + replaced,
        )
        return new, Report(self._metrics(new), evaluated)

    def _initialize(
        self, state: EvoState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator
    ):
        raws = self._paraphrase_seed(task, proposer, rng) if self.pop_size > 1 else []
        paraphrases = clean_candidates(raws, seen=[task.instruction])[: self.pop_size - 1]
        texts = [task.instruction] + paraphrases
        parents = [""] + [task.instruction] * len(paraphrases)
        population, evaluated = self._score(texts, task, scorer, "init", parents)
        new = replace(state, population=population, step=1, proposed=len(raws), usable=len(paraphrases))
        return new, Report(self._metrics(new), evaluated)

    def _pool(self, state: EvoState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        """Step 1 of ``para_topk``: the seed and ``init_pool`` APE proposals, scored in one call."""
        raws, banned = forward_proposals(task, proposer, rng, self.init_pool, self.n_demos, 40, max(self.temperature, 0.9))
        texts = [task.instruction] + clean_candidates(raws, banned, [task.instruction])
        pool, evaluated = self._score(texts, task, scorer, "init")
        new = replace(state, pool=tuple(sorted(pool, key=lambda p: -p[1])), step=1, proposed=len(raws),
                      usable=len(texts) - 1)
        return new, Report(self._metrics(new), evaluated)

    def _paraphrase_top(self, state: EvoState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        """Step 2 of ``para_topk``: the pool's top half, each paraphrased once; the paraphrases
        fill the population (then the next-best pool prompts, if some paraphrases are unusable)."""
        top = state.pool[: max(1, self.pop_size // 2)]
        outs = proposer.generate(
            [RESAMPLE_TEMPLATE.format(instruction=t) for t, _ in top], max_new_tokens=40,
            temperature=max(self.temperature, 0.9), seed=int(rng.integers(2**31)), stop=("\n\n",),
        )
        seen = [t for t, _ in state.pool]
        kept = clean_with_parents([(o[0], t) for (t, _), o in zip(top, outs)], seen=seen)[: self.pop_size - len(top)]
        paraphrases = [p for p, _ in kept]
        scored, evaluated = self._score(paraphrases, task, scorer, "init", [t for _, t in kept])
        population = (tuple(top) + scored + state.pool[len(top):])[: self.pop_size]
        new = replace(state, population=population, step=state.step + 1, proposed=state.proposed + len(outs),
                      usable=state.usable + len(paraphrases))
        return new, Report(self._metrics(new), evaluated)

    def _paraphrase_seed(self, task: Task, proposer: LM, rng: np.random.Generator) -> list[str]:
        # Twice as many paraphrases as needed: a small proposer's output is often unusable.
        outs = proposer.generate(
            [RESAMPLE_TEMPLATE.format(instruction=task.instruction)], max_new_tokens=40,
            temperature=max(self.temperature, 0.9), n=2 * (self.pop_size - 1),
            seed=int(rng.integers(2**31)), stop=("\n\n",),
        )
        return outs[0]

    def _score(self, texts, task: Task, scorer: LM, kind: str, parents=None):
        """Each text's dev score (one scorer call) and its log record, with its parent ('' if none given)."""
        dev = fixed_dev(task, self.n_eval)
        results = scored_prompts(task, [TextPrompt(t) for t in texts], dev, scorer)
        parents = parents or [""] * len(texts)
        scored = tuple((t, s) for t, (s, _) in zip(texts, results))
        evaluated = tuple(Evaluated(t, s, len(dev), kind, parent, **seen)
                          for t, (s, seen), parent in zip(texts, results, parents))
        return scored, evaluated

    def _ga_contexts(self, state: EvoState, rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """Roulette-wheel parent pairs, one meta-prompt per child; and each child's parent: the
        better of its pair by dev score (the first drawn on a tie)."""
        texts = [t for t, _ in state.population]
        pairs = roulette_pairs(state, len(texts), rng)
        better = [a if state.population[a][1] >= state.population[b][1] else b for a, b in pairs]
        return [GA_TEMPLATE.format(p1=texts[a], p2=texts[b]) for a, b in pairs], [texts[i] for i in better]

    def _ga_merge(self, state: EvoState, children: list[str], parents: list[str], task: Task, scorer: LM):
        kept = clean_with_parents(zip(children, parents), seen=[t for t, _ in state.population])
        fresh = [c for c, _ in kept]
        scored, evaluated = self._score(fresh, task, scorer, "offspring", [p for _, p in kept])
        # Parents first, stable sort: on a tie the incumbent survives.
        pool = sorted(state.population + scored, key=lambda p: -p[1])
        survivors = tuple(pool[: self.pop_size])
        return survivors, evaluated, sum(p in scored for p in survivors)

    def _de_contexts(self, state: EvoState, rng: np.random.Generator) -> tuple[list[str], list[str]]:
        """One meta-prompt per member: two other members' differences, the best, the member; and
        each child's parent: the member it is crossed with and may replace."""
        texts = [t for t, _ in state.population]
        best = max(range(len(texts)), key=lambda i: state.population[i][1])
        contexts = []
        for i, (a, b) in enumerate(donor_pairs(len(texts), rng)):
            contexts.append(DE_TEMPLATE.format(p1=texts[a], p2=texts[b], p3=texts[best], basic=texts[i]))
        return contexts, texts

    def _de_merge(self, state: EvoState, children: list[str], parents: list[str], task: Task, scorer: LM):
        known = {t.lower() for t, _ in state.population}
        slots = [i for i, c in enumerate(children) if c and c.lower() not in known]
        scored, evaluated = self._score([children[i] for i in slots], task, scorer, "offspring",
                                        [parents[i] for i in slots])
        population = list(state.population)
        for i, (text, score) in zip(slots, scored):
            if score > population[i][1]:  # strict: a tie keeps the member
                population[i] = (text, score)
        return tuple(population), evaluated, sum(p != q for p, q in zip(population, state.population))

    def _metrics(self, state: EvoState) -> dict[str, float]:
        scores = [s for _, s in (state.population or state.pool)]
        return {
            "dev_score": max(scores),
            "population_mean": float(np.mean(scores)),
            "population_size": float(len(scores)),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "replaced": float(state.replaced),
        }

    def best(self, state: EvoState) -> TextPrompt:
        members = state.population or state.pool  # a budget may end the search before the population is built
        if not members:
            raise ValueError("EvoPrompt has no population yet; run at least one step")
        return TextPrompt(max(members, key=lambda p: p[1])[0])

    def snapshot(self, state: EvoState) -> Snapshot:
        return Snapshot(population=ranked(state.population or state.pool))

    def done(self, state: EvoState) -> bool:
        return False


def roulette_pairs(state: EvoState, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``n`` parent pairs, each two distinct members drawn with probability proportional to score."""
    size = len(state.population)
    if size == 1:
        return [(0, 0)] * n
    # A small floor keeps every member drawable (the wheel needs two non-zero slots).
    weights = np.array([s for _, s in state.population], dtype=np.float64) + 1e-6
    p = weights / weights.sum()
    return [tuple(int(i) for i in rng.choice(size, size=2, replace=False, p=p)) for _ in range(n)]


def donor_pairs(size: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Two distinct random members other than ``i`` for every member ``i`` (the DE donors)."""
    pairs = []
    for i in range(size):
        others = [j for j in range(size) if j != i] or [i]
        a, b = rng.choice(others, size=2, replace=len(others) < 2)
        pairs.append((int(a), int(b)))
    return pairs
