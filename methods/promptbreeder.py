"""Promptbreeder (Fernando et al. 2023): self-referential evolution of task and mutation prompts.

A unit is a (task prompt, mutation prompt) pair with a fitness (dev score). The first step
writes each unit's task prompt from a random mutation prompt + thinking style + the problem
description. Every later step is one generation of binary tournaments: the population is
paired at random, and in each pair the loser is overwritten by a mutated copy of the winner.
Mutation operators: zero-order and first-order direct mutation, EDA and EDA rank-and-index
mutation, zero-order and first-order hypermutation (which rewrite the mutation prompt itself
before applying it), and Lamarckian mutation (the instruction re-derived from examples the
winner got right). The fittest unit always wins its tournament, so it is never lost.

Near-duplicates are filtered, as the paper filters mutants by similarity to the population:
a mutant whose text is at least ``max_similarity`` alike to a task prompt in the population
(or to a mutant kept earlier in the step) is dropped, with ``difflib``'s ratio on lowercased
text standing in for the paper's embedding similarity (``max_similarity=1`` drops exact
copies only).

Simplified from the paper: one task prompt per unit, no lineage mutation, prompt crossover
or context shuffling, character similarity instead of embedding similarity, and fitness
on a fixed dev subset. Per step: at most one scorer call for Lamarckian workings, two
generate calls (the second only for hypermutations) and one scorer call for all mutants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import score_prompts, subsample
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev, predict_many
from methods.text import clean_one, demo_block
from tasks.core import Example, Task

MUTATION_PROMPTS = (
    "Modify the following instruction creatively, giving some advice on how to solve it:",
    "Just change this instruction to make it more fun, think WELL outside the box:",
    "Modify this instruction in a way that no self-respecting LLM would!",
    "How would you encourage someone and help them cheat on this following instruction?",
    "How would you help an LLM to follow the instruction?",
    "Elaborate on the instruction giving some detailed advice on how to do what it wants.",
    "Elaborate on the instruction giving some detailed advice on how to do what it wants, as if you "
    "were explaining it to a child.",
    "As a really good teacher, explain the instruction, as if you were explaining it to a child.",
    "Imagine you need to follow this instruction. What would you tell yourself if you wanted to be "
    "the best in the world at it?",
    "How would someone with derailment follow this instruction?",
    "Don't think about the instruction at all, but let it inspire you to do something related. "
    "Talk about what that might be.",
    "Rephrase the instruction without using any of the same words. Use all you know to improve the "
    "instruction so the person hearing it is more likely to do well.",
    "Say that instruction again in another way. DON'T use any of the words in the original "
    "instruction or you're fired.",
    "Say that instruction again in another way. DON'T use any of the words in the original "
    "instruction there is a good chap.",
    "What do people who are good at creative thinking normally do with this kind of mutation question?",
    "Detailed additional advice for people wishing to follow this instruction is as follows:",
    "In one short sentence, here is how I would best follow this instruction.",
    "In one word, what do I need to focus on to follow this instruction?",
    "Make a variant of the prompt.",
    "Change the instruction so that it is more precise and easier to follow.",
    "Improve the instruction so that someone new to the task gets it right the first time.",
    "Write the instruction as a short list of steps.",
    "Simplify the instruction, keeping only what matters.",
    "What is the most important thing this instruction asks for? Rewrite it around that.",
)
THINKING_STYLES = (
    "How could I devise an experiment to help solve that problem?",
    "Make a list of ideas for solving this problem, and apply them one by one to the problem to see "
    "if any progress can be made.",
    "How could I measure progress on this problem?",
    "How can I simplify the problem so that it is easier to solve?",
    "What are the key assumptions underlying this problem?",
    "What are the potential risks and drawbacks of each solution?",
    "What are the alternative perspectives or viewpoints on this problem?",
    "What are the long-term implications of this problem and its solutions?",
    "How can I break down this problem into smaller, more manageable parts?",
    "Critical Thinking: This style involves analyzing the problem from different perspectives, "
    "questioning assumptions, and evaluating the evidence or information available.",
    "Try creative thinking, generate innovative and out-of-the-box ideas to solve the problem.",
    "Seek input and collaboration from others to solve the problem.",
    "Use systems thinking: Consider the problem as part of a larger system and understanding the "
    "interconnectedness of various elements.",
    "Use Risk Analysis: Evaluate potential risks, uncertainties, and tradeoffs associated with "
    "different solutions or approaches to a problem.",
    "Use Reflective Thinking: Step back from the problem, take the time for introspection and "
    "self-reflection.",
    "What is the core issue or problem that needs to be addressed?",
    "What are the underlying causes or factors contributing to the problem?",
    "Are there any potential solutions or strategies that have been tried before? If yes, what were "
    "the outcomes and lessons learned?",
    "What are the potential obstacles or challenges that might arise in solving this problem?",
    "Are there any relevant data or information that can provide insights into the problem?",
    "How can progress or success in solving the problem be measured or evaluated?",
    "Is the problem a technical or practical one that requires a specific expertise or skill set?",
    "Let's think step by step.",
    "Let's make a step by step plan and implement it with good notion and explanation.",
)
OPERATORS = ("zero_order", "first_order", "eda", "eda_rank", "hyper_zero", "hyper_first", "lamarckian")
HYPER = ("hyper_zero", "hyper_first")
MUTANT_CUE = "{mutation}\nINSTRUCTION: {prompt}\nINSTRUCTION MUTANT:"
LAMARCK = (
    "I gave a friend an instruction and some advice. Here are the correct examples of his workings "
    "out:\n\n{workings}\n\nThe instruction was:"
)

Unit = tuple[str, str, float]  # (task prompt, mutation prompt, fitness)


@dataclass(frozen=True)
class BreederState:
    """The population of units, and counters."""

    units: tuple[Unit, ...] = ()
    step: int = 0
    proposed: int = 0
    usable: int = 0


@dataclass(frozen=True)
class Promptbreeder:
    """Promptbreeder's tournament evolution of (task prompt, mutation prompt) units.

    Args:
        pop_size: units in the population (the paper uses 50; an odd one sits out each round).
        operators: mutation operators drawn uniformly per tournament (names in ``OPERATORS``).
        description: the problem description D; empty means the task's baseline instruction.
        n_eval: dev examples each task prompt is scored on (0 = whole dev split).
        lamarck_batch: train examples a Lamarckian winner is run on to find correct workings.
        n_workings: correct workings shown to the Lamarckian operator.
        temperature: proposer temperature.
        max_new_tokens: length cap of a task or mutation prompt.
        max_similarity: a mutant at least this alike (difflib ratio) to a task prompt already
            in the population is dropped (1.0: exact copies only).
    """

    pop_size: int = 6
    operators: tuple[str, ...] = OPERATORS
    description: str = ""
    n_eval: int = 32
    lamarck_batch: int = 8
    n_workings: int = 3
    temperature: float = 0.9
    max_new_tokens: int = 40
    max_similarity: float = 0.95

    def __post_init__(self) -> None:
        object.__setattr__(self, "operators", tuple(self.operators))  # a YAML list arrives as a list
        unknown = [op for op in self.operators if op not in OPERATORS]
        if unknown or not self.operators:
            raise ValueError(f"Promptbreeder operators must be a non-empty subset of {OPERATORS}: {unknown}")
        if self.pop_size < 2:
            raise ValueError("Promptbreeder needs pop_size >= 2 for tournaments")

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> BreederState:
        return BreederState()

    def step(self, state: BreederState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if not state.units:
            return self._initialize(task, scorer, proposer, rng)
        pairs = tournaments(state.units, rng)
        ops = [self.operators[int(rng.integers(len(self.operators)))] for _ in pairs]
        workings = self._workings(state, pairs, ops, task, scorer, rng)
        contexts = [
            self._context(op, state.units[w], state, task, w, workings, rng) for (w, _), op in zip(pairs, ops)
        ]
        first = self._generate(proposer, contexts, rng)
        mutations = [state.units[w][1] for w, _ in pairs]
        prompts, mutations = self._hypermutate(ops, first, mutations, pairs, state, proposer, rng)
        return self._replace_losers(state, pairs, prompts, mutations, task, scorer, len(contexts))

    def _description(self, task: Task) -> str:
        return self.description or task.instruction or f"Solve the {task.name} task."

    def _initialize(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        """Task prompts from mutation prompt + thinking style + problem description."""
        mutations = [pick(MUTATION_PROMPTS, rng) for _ in range(self.pop_size)]
        styles = [pick(THINKING_STYLES, rng) for _ in range(self.pop_size)]
        described = self._description(task)
        contexts = [
            MUTANT_CUE.format(mutation=f"{m} {t}", prompt=described) for m, t in zip(mutations, styles)
        ]
        prompts = [clean_one(o) for o in self._generate(proposer, contexts, rng)]
        # An unusable proposal leaves the problem description itself in that slot.
        texts = [p or self._description(task) for p in prompts]
        scores, evaluated = self._score(texts, task, scorer, "init")
        units = tuple(zip(texts, mutations, scores))
        new = BreederState(units=units, step=1, proposed=len(contexts), usable=sum(bool(p) for p in prompts))
        return new, Report(self._metrics(new), evaluated)

    def _context(self, op: str, unit: Unit, state: BreederState, task: Task, w: int, workings, rng) -> str:
        """The first meta-prompt of operator ``op`` applied to the winning ``unit``."""
        prompt, mutation, _ = unit
        if op == "zero_order":
            return f"{self._description(task)} A list of 100 hints:\n1."
        if op in ("eda", "eda_rank"):
            return eda_context(state.units, mutation, ranked=op == "eda_rank", rng=rng)
        if op == "hyper_zero":
            style = pick(THINKING_STYLES, rng)
            return f"{self._description(task)} {style}\nNew instruction-rewriting prompt:"
        if op == "hyper_first":
            return f"Please summarize and improve the following instruction: {mutation}\nImproved:"
        if op == "lamarckian" and workings.get(w):
            return LAMARCK.format(workings=demo_block(task, workings[w]))
        return MUTANT_CUE.format(mutation=mutation, prompt=prompt)  # first order (and Lamarckian fallback)

    def _workings(self, state, pairs, ops, task: Task, scorer: LM, rng) -> dict[int, list[Example]]:
        """Train examples each Lamarckian winner answers correctly (one scorer call for all)."""
        winners = sorted({w for (w, _), op in zip(pairs, ops) if op == "lamarckian"})
        if not winners:
            return {}
        batch = subsample(task.train, self.lamarck_batch, rng)
        preds = predict_many(task, [state.units[w][0] for w in winners], batch, scorer)
        right = {w: [ex for ex, p in zip(batch, row) if task.is_correct(p, ex)] for w, row in zip(winners, preds)}
        return {w: exs[: self.n_workings] for w, exs in right.items()}

    def _generate(self, proposer: LM, contexts: Sequence[str], rng: np.random.Generator) -> list[str]:
        if not contexts:
            return []
        outs = proposer.generate(
            list(contexts), max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=int(rng.integers(2**31)), stop=("\n\n",),
        )
        return [o[0] for o in outs]

    def _hypermutate(self, ops, first, mutations, pairs, state, proposer, rng):
        """For hypermutations, the first output is a new mutation prompt: apply it to the task prompt."""
        prompts = [clean_one(o) if op not in HYPER else "" for op, o in zip(ops, first)]
        slots = [i for i, op in enumerate(ops) if op in HYPER and clean_one(first[i])]
        for i in slots:
            mutations[i] = clean_one(first[i])
        winners = [state.units[pairs[i][0]][0] for i in slots]
        contexts = [MUTANT_CUE.format(mutation=mutations[i], prompt=w) for i, w in zip(slots, winners)]
        for i, out in zip(slots, self._generate(proposer, contexts, rng)):
            prompts[i] = clean_one(out)
        return prompts, mutations

    def _replace_losers(self, state, pairs, prompts, mutations, task, scorer, n_contexts):
        """Score usable, new mutants in one call; each overwrites its tournament's loser."""
        known, keep = [u[0] for u in state.units], []
        for i, p in enumerate(prompts):
            if p and not near_duplicate(p, known, self.max_similarity):
                known.append(p)
                keep.append(i)
        scores, evaluated = self._score([prompts[i] for i in keep], task, scorer, "mutant")
        units = list(state.units)
        for i, score in zip(keep, scores):
            units[pairs[i][1]] = (prompts[i], mutations[i], score)
        new = replace(
            state, units=tuple(units), step=state.step + 1,
            proposed=state.proposed + n_contexts, usable=state.usable + len(keep),
        )
        return new, Report(self._metrics(new), evaluated)

    def _score(self, texts: Sequence[str], task: Task, scorer: LM, kind: str):
        dev = fixed_dev(task, self.n_eval)
        scores = score_prompts(task, [TextPrompt(t) for t in texts], dev, scorer)
        return scores, tuple(Evaluated(t, s, len(dev), kind) for t, s in zip(texts, scores))

    def _metrics(self, state: BreederState) -> dict[str, float]:
        scores = [u[2] for u in state.units]
        return {
            "dev_score": max(scores),
            "population_mean": float(np.mean(scores)),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "mutation_prompts": float(len({u[1] for u in state.units})),
            "evolved_mutation_prompts": float(sum(u[1] not in MUTATION_PROMPTS for u in state.units)),
        }

    def best(self, state: BreederState) -> TextPrompt:
        if not state.units:
            raise ValueError("Promptbreeder has no population yet; run at least one step")
        return TextPrompt(state.units[elite(state.units)][0])

    def snapshot(self, state: BreederState) -> Snapshot:
        return Snapshot(population=ranked((task_prompt, fitness) for task_prompt, _, fitness in state.units))

    def done(self, state: BreederState) -> bool:
        return False


def pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One of ``options`` uniformly at random."""
    return options[int(rng.integers(len(options)))]


def elite(units: Sequence[Unit]) -> int:
    """Index of the fittest unit (the first one on a tie)."""
    return max(range(len(units)), key=lambda i: (units[i][2], -i))


def tournaments(units: Sequence[Unit], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random disjoint pairs as (winner, loser): higher fitness wins, a tie goes to the lower index.

    The tie rule makes the elite (:func:`elite`) win every tournament it is drawn into.
    """
    order = rng.permutation(len(units))
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        a, b = sorted((int(a), int(b)))
        pairs.append((a, b) if units[a][2] >= units[b][2] else (b, a))
    return pairs


def near_duplicate(text: str, others: Sequence[str], threshold: float) -> bool:
    """True if ``text`` is at least ``threshold`` alike to one of ``others`` (difflib ratio,
    case-insensitive); an exact copy always is."""
    from difflib import SequenceMatcher

    low = text.lower()
    return any(low == o.lower() or SequenceMatcher(None, low, o.lower()).ratio() >= threshold for o in others)


def eda_context(units: Sequence[Unit], mutation: str, ranked: bool, rng: np.random.Generator) -> str:
    """EDA mutation: the population's distinct task prompts as a list the LM continues.

    ``ranked``: the paper's rank-and-index variant, listed in ascending fitness while the header
    (deliberately) claims descending order, so the LM imitates the last, best entries.
    """
    distinct = {}
    for prompt, _, score in units:
        distinct.setdefault(prompt.lower(), (prompt, score))
    items = list(distinct.values())
    n = len(items)
    if ranked:
        items.sort(key=lambda p: p[1])
        head = f"INSTRUCTION: {mutation}\nA List of Responses in descending order of score."
        tail = f"{n + 1} is the best response. It resembles {n} more than it does (1).\n"
    else:
        items = [items[i] for i in rng.permutation(n)]
        head, tail = "A List of Responses in random order of score.", ""
    lines = "\n".join(f"{k}. {p}" for k, (p, _) in enumerate(items, 1))
    return f"{head}\n{lines}\n{tail}{n + 1}."
