"""Promptbreeder (Fernando et al. 2023, arXiv 2309.16797): self-referential evolution of task and mutation prompts.

A unit of evolution (:class:`Unit`) holds task prompts (two by default, P1 and P2, as in the
paper's §3.1), a mutation prompt, a fitness, in the few-shot case a context of correct workings
out (§3.2.5), and the lineage of elites it descends from (§3.2.2).

The first step writes each unit's task prompts: for each one, the unit's mutation prompt and a
thinking style, both drawn from the paper's seed lists, are put before the problem description
("... INSTRUCTION: D INSTRUCTION MUTANT:", §3.1). Every later step is one generation of binary
tournaments (§3, §4): the population is paired at random and in each pair the loser is
overwritten by a mutated copy of the winner. The mutation operator is drawn uniformly per
tournament (§3.2) and rewrites one of the winner's task prompts, chosen at random (the run in
the paper's Appendix B shows one prompt of a pair changing while the other stays):

- zero-order and first-order direct mutation (§3.2.1);
- EDA and EDA rank-and-index mutation (§3.2.2), over the population's prompts, similar ones
  filtered out of the list;
- lineage mutation (§3.2.2): the winner's lineage of elites, oldest first, under the heading
  "GENOTYPES FOUND IN ASCENDING ORDER OF QUALITY";
- zero-order and first-order hypermutation (§3.2.3), which write a new mutation prompt and apply
  it at once;
- Lamarckian mutation (§3.2.4): the instruction re-derived from correct workings out (the
  winner's context when it has one, else its correct answers on a small train batch).

Then, with probability ``crossover_p`` (the paper's 10%), prompt crossover (§3.2.5) replaces one
of the child's task prompts with the same prompt of another unit, picked fitness-proportionately
(never the child's own parent, nor the loser it replaces); mutation prompts never cross.

Two task prompts. The paper applies P1 to the question, then P2 to the model's continuation (two
LLM calls per answer). Here a task has one ``{instruction}`` slot (``tasks/core.py``), a label
task is scored by the log-likelihood of its label words in one call, and the pipeline scores
:meth:`Promptbreeder.best` on test through that same slot; so a unit's instruction is its
context, then P1 and P2 one per line (:func:`instruction_text`), in the slot wherever the task
puts it. Both prompts are evolved and scored, in the paper's order, but P2 reads the input
rather than the model's first output.

Fitness: ``fitness_split="dev"`` (default, comparable with the other methods' dev scores)
scores every new child on one fixed dev subset and keeps the scores of units that did not
change. ``fitness_split="train"`` is the paper's (§3, Appendix J.2): every generation, all units
are scored afresh on a new random batch of ``n_eval`` training examples (one batch shared by the
generation, so tournaments compare like with like; the paper's "generation is 25 pair
evaluations" of a population of 50). With random batches the elite can lose a tournament, as
in the paper; :meth:`Promptbreeder.best` is the fittest prompt of the whole run (Appendix J.2),
and ``dev_score`` reports that fitness, measured on training batches.

Context shuffling (§3.2.5, ``max_context > 0``; needs ``fitness_split="train"``, since dev
examples in a prompt scored on dev would hand it their answers): after each evaluation, a
unit's context is filled up with workings out it got right on that batch; once full, one
random new correct working out replaces one entry; and with probability
``context_refresh_p`` (the paper's 10%) the whole list is resampled from that batch's correct
ones. A working out is shown as "Input: ...\\nOutput: ..." with the model's own answer (for a
generative task, its written output; for a label task, the label word). A child inherits its
parent's context.

An unusable mutant (no usable line, or at least ``max_similarity`` alike to a task prompt in
the population or to one written earlier in the step). The paper always overwrites the loser
with the mutated copy of the winner; with ``on_unusable="copy"`` (default) a mutation that
produced nothing usable leaves that copy unmutated, so the loser still gives way to the winner
(on fixed dev examples a copy keeps the winner's fitness and is not scored again, unless
crossover changed it); ``on_unusable="keep"`` leaves the loser in place instead (more
diversity, fewer evaluations).

Seed lists. :data:`MUTATION_PROMPTS` (56) and :data:`THINKING_STYLES` (39) are the paper's
Appendix C (Table 2, "Mutator Prompts") and Appendix D ("Thinking Styles") in full, in the
paper's order, with typographic apostrophes and quotes written as ASCII.

Where this still departs from the paper: P2 reads the input, not the model's first output (see
above); character similarity (``difflib`` on lowercased text) stands in for BERT embedding
cosine; mutants are also dropped when too similar to the population (the paper filters only
the EDA lists); one fixed proposer temperature, where the paper starts each unit's from U[1, 2]
and evolves it, and none of Appendix J.2's other diversity measures (random character strings,
fitness sharing); the problem description is the task's baseline instruction unless
``description`` is given (the paper's are in its Appendix G); prompt crossover follows every
mutation and context shuffling every evaluation, rather than counting among the operators drawn
(the paper counts nine operators; eight are drawn here); the second half of the paper's sentence "with a
10% chance we resample the whole context list with probability inverse to the maximum context
list length" is not modelled; ``fitness_split="dev"`` (the default) evaluates each child once on
fixed dev examples instead of random training batches.

Per step: at most one scorer call for Lamarckian workings (none when every Lamarckian winner
has a context), one or two generate calls (the second only for hypermutations), and at most one
scorer call for everything scored.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from methods import evaluate
from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import subsample
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev
from methods.text import clean_one, input_texts
from tasks.core import Example, Task

# The paper's Appendix C, Table 2 ("Mutator Prompts"), entries 1-56 in order.
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
    "Imagine you need to follow this instruction. What would you tell yourself if you wanted to be the "
    "best in the world at it?",
    "How would someone with derailment follow this instruction?",
    "Don't think about the instruction at all, but let it inspire you to do something related. Talk "
    "about what that might be.",
    "Rephrase the instruction without using any of the same words. Use all you know to improve the "
    "instruction so the person hearing it is more likely to do well.",
    "Say that instruction again in another way. DON'T use any of the words in the original instruction "
    "or you're fired.",
    "Say that instruction again in another way. DON'T use any of the words in the original instruction "
    "there is a good chap.",
    "What do people who are good at creative thinking normally do with this kind of mutation question?",
    "Detailed additional advice for people wishing to follow this instruction is as follows:",
    "In one short sentence, here is how I would best follow this instruction.",
    "In one short sentence, here is some detailed expert advice. Notice how I don't use any of the same "
    "words as in the INSTRUCTION.",
    "In one short sentence, the general solution is as follows. Notice how I don't use any of the same "
    "words as in the INSTRUCTION.",
    "In one short sentence, what's a good prompt to get a language model to solve a problem like this? "
    "Notice how I don't use any of the same words as in the INSTRUCTION.",
    "Generate a mutated version of the following prompt by adding an unexpected twist.",
    "Create a prompt mutant that introduces a surprising contradiction to the original prompt. Mutate the "
    "prompt to provide an alternative perspective or viewpoint.",
    "Generate a prompt mutant that incorporates humor or a playful element. Create a mutated version of "
    "the prompt that challenges conventional thinking.",
    "Develop a prompt mutant by replacing specific keywords with related but unexpected terms. Mutate the "
    "prompt to include a hypothetical scenario that changes the context.",
    "Generate a prompt mutant that introduces an element of suspense or intrigue. Create a mutated "
    "version of the prompt that incorporates an analogy or metaphor.",
    "Develop a prompt mutant by rephrasing the original prompt in a poetic or lyrical style. Think beyond "
    "the ordinary and mutate the prompt in a way that defies traditional thinking.",
    "Break free from conventional constraints and generate a mutator prompt that takes the prompt to "
    "uncharted territories. Challenge the norm and create a mutator prompt that pushes the boundaries of "
    "traditional interpretations.",
    "Embrace unconventional ideas and mutate the prompt in a way that surprises and inspires unique "
    "variations. Think outside the box and develop a mutator prompt that encourages unconventional "
    "approaches and fresh perspectives.",
    "Step into the realm of imagination and create a mutator prompt that transcends limitations and "
    "encourages innovative mutations. Break through the ordinary and think outside the box to generate a "
    "mutator prompt that unlocks new possibilities and unconventional paths.",
    "Embrace the power of unconventional thinking and create a mutator prompt that sparks unconventional "
    "mutations and imaginative outcomes. Challenge traditional assumptions and break the mold with a "
    "mutator prompt that encourages revolutionary and out-of-the-box variations.",
    # one entry in the paper's table (its index 31), though it reads as two
    "Go beyond the expected and create a mutator prompt that leads to unexpected and extraordinary "
    "mutations, opening doors to unexplored realms. Increase Specificity: If the original prompt is too "
    "general, like 'Tell me about X,' the modified version could be, 'Discuss the history, impact, and "
    "current status of X.'",
    "Ask for Opinions/Analysis: If the original prompt only asks for a fact, such as 'What is X?', the "
    "improved prompt could be, 'What is X, and what are its implications for Y?'",
    "Encourage Creativity: For creative writing prompts like 'Write a story about X,' an improved version "
    "could be, 'Write a fantasy story about X set in a world where Y is possible.'",
    "Include Multiple Perspectives: For a prompt like 'What is the impact of X on Y?', an improved version "
    "could be, 'What is the impact of X on Y from the perspective of A, B, and C?'",
    "Request More Detailed Responses: If the original prompt is 'Describe X,' the improved version could "
    "be, 'Describe X, focusing on its physical features, historical significance, and cultural relevance.'",
    "Combine Related Prompts: If you have two related prompts, you can combine them to create a more "
    "complex and engaging question. For instance, 'What is X?' and 'Why is Y important?' could be combined "
    "to form 'What is X and why is it important in the context of Y?'",
    "Break Down Complex Questions: If a prompt seems too complex, like 'Discuss X,' the improved version "
    "could be, 'What is X? What are its main characteristics? What effects does it have on Y and Z?'",
    "Use Open-Ended Questions: Instead of 'Is X true?', you could ask, 'What are the arguments for and "
    "against the truth of X?'",
    "Request Comparisons: Instead of 'Describe X,' ask 'Compare and contrast X and Y.'",
    "Include Context: If a prompt seems to lack context, like 'Describe X,' the improved version could be, "
    "'Describe X in the context of its impact on Y during the Z period.'",
    "Make the prompt more visual: Ask the user to visualize the problem or scenario being presented in "
    "the prompt.",
    "Ask for a thorough review: Instead of just presenting the problem, ask the user to write down all "
    "the relevant information and identify what's missing.",
    "Invoke previous experiences: Modify the prompt to ask the user to recall a similar problem they've "
    "successfully solved before.",
    "Encourage a fresh perspective: Suggest in your prompt that the user take a moment to clear their "
    "mind before re-approaching the problem.",
    "Promote breaking down problems: Instead of asking the user to solve the problem as a whole, prompt "
    "them to break it down into smaller, more manageable parts.",
    "Ask for comprehension: Modify the prompt to ask the user to review and confirm their understanding "
    "of all aspects of the problem.",
    "Suggest explanation to others: Change the prompt to suggest that the user try to explain the problem "
    "to someone else as a way to simplify it.",
    "Prompt for solution visualization: Instead of just asking for the solution, encourage the user to "
    "imagine the solution and the steps required to get there in your prompt.",
    "Encourage reverse thinking: Improve the prompt by asking the user to think about the problem in "
    "reverse, starting with the solution and working backwards.",
    "Recommend taking a break: Modify the prompt to suggest that the user take a short break, allowing "
    "their subconscious to work on the problem.",
    "What errors are there in the solution?",
    "How could you improve the working out of the problem?",
    "Look carefully to see what you did wrong, how could you fix the problem?",
    "CORRECTION =",
    "Does the above text make sense? What seems wrong with it? Here is an attempt to fix it:",
    "The above working out has some errors, here is a version with the errors fixed.",
)
# The paper's Appendix D ("Thinking Styles"), entries 1-39 in order.
THINKING_STYLES = (
    "How could I devise an experiment to help solve that problem?",
    "Make a list of ideas for solving this problem, and apply them one by one to the problem to see if "
    "any progress can be made.",
    "How could I measure progress on this problem?",
    "How can I simplify the problem so that it is easier to solve?",
    "What are the key assumptions underlying this problem?",
    "What are the potential risks and drawbacks of each solution?",
    "What are the alternative perspectives or viewpoints on this problem?",
    "What are the long-term implications of this problem and its solutions?",
    "How can I break down this problem into smaller, more manageable parts?",
    "Critical Thinking: This style involves analyzing the problem from different perspectives, "
    "questioning assumptions, and evaluating the evidence or information available. It focuses on "
    "logical reasoning, evidence-based decision-making, and identifying potential biases or flaws in "
    "thinking.",
    "Try creative thinking, generate innovative and out-of-the-box ideas to solve the problem. Explore "
    "unconventional solutions, thinking beyond traditional boundaries, and encouraging imagination and "
    "originality.",
    "Seek input and collaboration from others to solve the problem. Emphasize teamwork, open "
    "communication, and leveraging the diverse perspectives and expertise of a group to come up with "
    "effective solutions.",
    "Use systems thinking: Consider the problem as part of a larger system and understanding the "
    "interconnectedness of various elements. Focuses on identifying the underlying causes, feedback "
    "loops, and interdependencies that influence the problem, and developing holistic solutions that "
    "address the system as a whole.",
    "Use Risk Analysis: Evaluate potential risks, uncertainties, and tradeoffs associated with different "
    "solutions or approaches to a problem. Emphasize assessing the potential consequences and likelihood "
    "of success or failure, and making informed decisions based on a balanced analysis of risks and "
    "benefits.",
    "Use Reflective Thinking: Step back from the problem, take the time for introspection and "
    "self-reflection. Examine personal biases, assumptions, and mental models that may influence "
    "problem-solving, and being open to learning from past experiences to improve future approaches.",
    "What is the core issue or problem that needs to be addressed?",
    "What are the underlying causes or factors contributing to the problem?",
    "Are there any potential solutions or strategies that have been tried before? If yes, what were the "
    "outcomes and lessons learned?",
    "What are the potential obstacles or challenges that might arise in solving this problem?",
    "Are there any relevant data or information that can provide insights into the problem? If yes, what "
    "data sources are available, and how can they be analyzed?",
    "Are there any stakeholders or individuals who are directly affected by the problem? What are their "
    "perspectives and needs?",
    "What resources (financial, human, technological, etc.) are needed to tackle the problem effectively?",
    "How can progress or success in solving the problem be measured or evaluated?",
    "What indicators or metrics can be used?",
    "Is the problem a technical or practical one that requires a specific expertise or skill set? Or is "
    "it more of a conceptual or theoretical problem?",
    "Does the problem involve a physical constraint, such as limited resources, infrastructure, or space?",
    "Is the problem related to human behavior, such as a social, cultural, or psychological issue?",
    "Does the problem involve decision-making or planning, where choices need to be made under "
    "uncertainty or with competing objectives?",
    "Is the problem an analytical one that requires data analysis, modeling, or optimization techniques?",
    "Is the problem a design challenge that requires creative solutions and innovation?",
    "Does the problem require addressing systemic or structural issues rather than just individual "
    "instances?",
    "Is the problem time-sensitive or urgent, requiring immediate attention and action?",
    "What kinds of solution typically are produced for this kind of problem specification?",
    "Given the problem specification and the current best solution, have a guess about other possible "
    "solutions.",
    "Let's imagine the current best solution is totally wrong, what other ways are there to think about "
    "the problem specification?",
    "What is the best way to modify this current best solution, given what you know about these kinds of "
    "problem specification?",
    "Ignoring the current best solution, create an entirely new solution to the problem.",
    "Let's think step by step.",
    "Let's make a step by step plan and implement it with good notion and explanation.",
)
OPERATORS = ("zero_order", "first_order", "eda", "eda_rank", "lineage", "hyper_zero", "hyper_first", "lamarckian")
HYPER = ("hyper_zero", "hyper_first")
FITNESS_SPLITS = ("dev", "train")
ON_UNUSABLE = ("copy", "keep")
MUTANT_CUE = "{mutation}\nINSTRUCTION: {prompt}\nINSTRUCTION MUTANT:"
LAMARCK = (
    "I gave a friend an instruction and some advice. Here are the correct examples of his workings "
    "out:\n\n{workings}\n\nThe instruction was:"
)
LINEAGE_HEAD = "GENOTYPES FOUND IN ASCENDING ORDER OF QUALITY"


@dataclass(frozen=True)
class Unit:
    """One unit of evolution.

    Attributes:
        prompts: the task prompts, in the order they apply (P1, P2).
        mutation: the mutation prompt that travels with them.
        fitness: the score of :attr:`text` as it was on the unit's latest evaluation.
        context: correct workings out shown before the task prompts (few-shot; empty zero-shot).
        lineage: the task prompts of the elites among its ancestors and itself, oldest first.
    """

    prompts: tuple[str, ...]
    mutation: str
    fitness: float
    context: tuple[str, ...] = ()
    lineage: tuple[tuple[str, ...], ...] = ()

    @property
    def text(self) -> str:
        return instruction_text(self.prompts, self.context)


@dataclass(frozen=True)
class BreederState:
    """The population, the fittest prompt of the run so far, and counters."""

    units: tuple[Unit, ...] = ()
    step: int = 0
    proposed: int = 0
    usable: int = 0
    crossovers: int = 0
    copies: int = 0
    best_text: str = ""
    best_score: float = float("-inf")


@dataclass(frozen=True)
class Promptbreeder:
    """Promptbreeder's tournament evolution of units of task prompts and a mutation prompt.

    Args:
        pop_size: units in the population (the paper uses 50; an odd one sits out each round).
        n_task_prompts: task prompts per unit, rendered in order (the paper's P1 and P2: 2).
        operators: mutation operators drawn uniformly per tournament (names in ``OPERATORS``).
        description: the problem description D; empty means the task's baseline instruction.
        n_eval: examples each task prompt is scored on (0 = the whole split).
        fitness_split: ``"dev"``: a fixed dev subset, each unit scored once; ``"train"``: a new
            random training batch every generation, every unit scored afresh (the paper's).
        crossover_p: chance that a child's task prompt is replaced by another unit's (paper: 0.1).
        max_context: correct workings out a unit keeps as few-shot context (0: zero-shot).
        context_refresh_p: chance that a context is resampled whole after an evaluation.
        on_unusable: ``"copy"``: an unusable mutant leaves the winner's copy unmutated in the
            loser's place; ``"keep"``: the loser stays.
        lamarck_batch: train examples a Lamarckian winner with no context is run on to find
            correct workings out.
        n_workings: correct workings out shown to the Lamarckian operator.
        temperature: proposer temperature.
        max_new_tokens: length cap of a task or mutation prompt.
        max_similarity: a mutant at least this alike (difflib ratio) to a task prompt already in
            the population is unusable, and EDA lists leave out entries this alike to an earlier one
            (1.0: exact copies only).
        mutation_prompts: the seed mutation prompts (default: the paper's Appendix C).
        thinking_styles: the seed thinking styles (default: the paper's Appendix D).
    """

    pop_size: int = 6
    n_task_prompts: int = 2
    operators: tuple[str, ...] = OPERATORS
    description: str = ""
    n_eval: int = 32
    fitness_split: str = "dev"
    crossover_p: float = 0.1
    max_context: int = 0
    context_refresh_p: float = 0.1
    on_unusable: str = "copy"
    lamarck_batch: int = 8
    n_workings: int = 3
    temperature: float = 0.9
    max_new_tokens: int = 40
    max_similarity: float = 0.95
    mutation_prompts: tuple[str, ...] = field(default=MUTATION_PROMPTS, repr=False)
    thinking_styles: tuple[str, ...] = field(default=THINKING_STYLES, repr=False)

    def __post_init__(self) -> None:
        for name in ("operators", "mutation_prompts", "thinking_styles"):  # a YAML list arrives as a list
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [op for op in self.operators if op not in OPERATORS]
        if unknown or not self.operators:
            raise ValueError(f"Promptbreeder operators must be a non-empty subset of {OPERATORS}: {unknown}")
        if self.pop_size < 2:
            raise ValueError("Promptbreeder needs pop_size >= 2 for tournaments")
        if self.n_task_prompts < 1 or self.max_context < 0:
            raise ValueError("Promptbreeder needs n_task_prompts >= 1 and max_context >= 0")
        if not (0.0 <= self.crossover_p <= 1.0 and 0.0 <= self.context_refresh_p <= 1.0):
            raise ValueError("Promptbreeder crossover_p and context_refresh_p are probabilities in [0, 1]")
        if self.fitness_split not in FITNESS_SPLITS or self.on_unusable not in ON_UNUSABLE:
            raise ValueError(f"Promptbreeder fitness_split must be one of {FITNESS_SPLITS} and on_unusable "
                             f"one of {ON_UNUSABLE}")
        if self.max_context and self.fitness_split != "train":
            raise ValueError("Promptbreeder max_context > 0 needs fitness_split=train: its workings out come "
                             "from the fitness batch, and dev examples in a prompt scored on dev leak answers")
        if not self.mutation_prompts or not self.thinking_styles:
            raise ValueError("Promptbreeder needs at least one mutation prompt and one thinking style")

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> BreederState:
        return BreederState()

    def step(self, state: BreederState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if not state.units:
            return self._initialize(task, scorer, proposer, rng)
        units = state.units
        pairs = tournaments(units, rng)
        ops = [pick(self.operators, rng) for _ in pairs]
        slots = [int(rng.integers(self.n_task_prompts)) for _ in pairs]
        workings = self._workings(units, pairs, ops, task, scorer, rng)
        contexts = [
            self._context(op, units[w], k, units, task, workings.get(w, ()), rng)
            for (w, _), op, k in zip(pairs, ops, slots)
        ]
        first = self._generate(proposer, contexts, rng)
        mutants, mutations = self._hypermutate(ops, first, units, pairs, slots, proposer, rng)
        children, usable = self._offspring(units, pairs, slots, mutants, mutations)
        children, crossed = self._crossover(children, units, pairs, rng)
        return self._next_generation(state, pairs, children, task, scorer, rng, len(contexts), usable, crossed)

    def _description(self, task: Task) -> str:
        return self.description or task.instruction or f"Solve the {task.name} task."

    def _initialize(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        """Each task prompt from the unit's mutation prompt + a thinking style + the problem description."""
        described, n = self._description(task), self.n_task_prompts
        mutations = [pick(self.mutation_prompts, rng) for _ in range(self.pop_size)]
        cues = [
            MUTANT_CUE.format(mutation=f"{m} {pick(self.thinking_styles, rng)}", prompt=described)
            for m in mutations for _ in range(n)
        ]
        outs = [clean_one(o) for o in self._generate(proposer, cues, rng)]
        # An unusable proposal leaves the problem description itself in that slot.
        units = [
            Unit(tuple(o or described for o in outs[i * n : (i + 1) * n]), m, 0.0) for i, m in enumerate(mutations)
        ]
        units, evaluated = self._evaluate(units, dict.fromkeys(range(len(units)), "init"), task, scorer, rng)
        new = record(BreederState(step=1, proposed=len(cues), usable=sum(bool(o) for o in outs)), units, evaluated)
        return new, Report(self._metrics(new), evaluated)

    def _context(self, op: str, winner: Unit, k: int, units, task: Task, workings: Sequence[str], rng) -> str:
        """The first meta-prompt of operator ``op`` for the winner's task prompt ``k``."""
        prompt = winner.prompts[k]
        if op == "zero_order":
            return f"{self._description(task)} A list of 100 hints:\n1."
        if op in ("eda", "eda_rank"):
            scored = [(u.prompts[k], u.fitness) for u in units]
            return eda_context(scored, winner.mutation, ranked=op == "eda_rank", rng=rng, threshold=self.max_similarity)
        if op == "lineage":
            # a winner with no elite among its ancestors starts its lineage from itself
            return lineage_context([g[k] for g in winner.lineage] or [prompt])
        if op == "hyper_zero":
            style = pick(self.thinking_styles, rng)
            return f"{self._description(task)} {style}\nNew instruction-rewriting prompt:"
        if op == "hyper_first":
            return f"Please summarize and improve the following instruction: {winner.mutation}\nImproved:"
        if op == "lamarckian" and workings:
            return LAMARCK.format(workings="\n\n".join(workings))
        return MUTANT_CUE.format(mutation=winner.mutation, prompt=prompt)  # first order (and Lamarckian fallback)

    def _workings(self, units, pairs, ops, task: Task, scorer: LM, rng) -> dict[int, tuple[str, ...]]:
        """Correct workings out for each Lamarckian winner: its context, else one scorer call on train."""
        winners = sorted({w for (w, _), op in zip(pairs, ops) if op == "lamarckian"})
        shown = {w: units[w].context[: self.n_workings] for w in winners if units[w].context}
        rest = [w for w in winners if w not in shown]
        if rest:
            batch = subsample(task.train, self.lamarck_batch, rng)
            rows = evaluate.predict_many(task, [TextPrompt(units[w].text) for w in rest], batch, scorer)
            for w, row in zip(rest, rows):
                shown[w] = tuple(correct_workings(task, batch, row)[: self.n_workings])
        return shown

    def _generate(self, proposer: LM, contexts: Sequence[str], rng: np.random.Generator) -> list[str]:
        if not contexts:
            return []
        outs = proposer.generate(
            list(contexts), max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            seed=int(rng.integers(2**31)), stop=("\n\n",),
        )
        return [o[0] for o in outs]

    def _hypermutate(self, ops, first, units, pairs, slots, proposer, rng):
        """For hypermutations the first output is a new mutation prompt: apply it to the winner's prompt."""
        mutants = [clean_one(o) if op not in HYPER else "" for op, o in zip(ops, first)]
        mutations = [units[w].mutation for w, _ in pairs]
        redo = [i for i, op in enumerate(ops) if op in HYPER and clean_one(first[i])]
        for i in redo:
            mutations[i] = clean_one(first[i])
        cues = [MUTANT_CUE.format(mutation=mutations[i], prompt=units[pairs[i][0]].prompts[slots[i]]) for i in redo]
        for i, out in zip(redo, self._generate(proposer, cues, rng)):
            mutants[i] = clean_one(out)
        return mutants, mutations

    def _offspring(self, units, pairs, slots, mutants, mutations) -> tuple[list[Unit | None], int]:
        """Each tournament's child: the winner with its mutated task prompt (and new mutation prompt).

        An unusable mutant gives the winner unchanged (``on_unusable="copy"``) or ``None``: the
        loser stays (``"keep"``). The child carries the winner's fitness until it is scored.
        """
        known, children, usable = [p for u in units for p in u.prompts], [], 0
        for (w, _), k, text, mutation in zip(pairs, slots, mutants, mutations):
            winner = units[w]
            if text and not near_duplicate(text, known, self.max_similarity):
                known.append(text)
                usable += 1
                children.append(replace(winner, prompts=swap(winner.prompts, k, text), mutation=mutation))
            else:
                children.append(winner if self.on_unusable == "copy" else None)
        return children, usable

    def _crossover(self, children, units, pairs, rng) -> tuple[list[Unit | None], int]:
        """Prompt crossover (§3.2.5): with ``crossover_p``, one task prompt comes from another unit."""
        out, crossed = [], 0
        for child, (w, loser) in zip(children, pairs):
            if child is None or rng.random() >= self.crossover_p:
                out.append(child)
                continue
            donor = fitness_proportionate(units, {w, loser}, rng)
            if donor is None:  # no third unit to take a prompt from
                out.append(child)
                continue
            k = int(rng.integers(self.n_task_prompts))
            out.append(replace(child, prompts=swap(child.prompts, k, units[donor].prompts[k])))
            crossed += 1
        return out, crossed

    def _next_generation(self, state, pairs, children, task, scorer, rng, n_contexts, usable, crossed):
        """Children overwrite their losers; then what needs a score is scored, in one call."""
        units = list(state.units)
        for child, (_, loser) in zip(children, pairs):
            if child is not None:
                units[loser] = child
        copies = [i for (w, i), c in zip(pairs, children) if c is not None and c.text == state.units[w].text]
        changed = [i for (_, i), c in zip(pairs, children) if c is not None and i not in copies]
        if self.fitness_split == "train":  # a new batch: every unit is scored afresh
            kinds = {i: "mutant" if i in changed else "rescored" for i in range(len(units))}
        else:  # fixed dev examples: only changed children need a score, a copy keeps its winner's
            kinds = {i: "mutant" for i in changed}
        # a mutant is its winner's copy, mutated (and maybe crossed over): the winner is its parent
        parents = {i: state.units[w].text for w, i in pairs if i in changed}
        units, evaluated = self._evaluate(units, kinds, task, scorer, rng, parents)
        new = record(
            replace(
                state, step=state.step + 1, proposed=state.proposed + n_contexts, usable=state.usable + usable,
                crossovers=state.crossovers + crossed, copies=state.copies + len(copies),
            ),
            units, evaluated,
        )
        return new, Report(self._metrics(new), evaluated)

    def _fitness_examples(self, task: Task, rng: np.random.Generator) -> tuple[Example, ...]:
        if self.fitness_split == "dev":
            return fixed_dev(task, self.n_eval)
        if not task.train:
            raise ValueError(f"Promptbreeder fitness_split=train needs training examples; task {task.name!r} has none")
        return subsample(task.train, self.n_eval, rng)

    def _evaluate(self, units: Sequence[Unit], kinds: Mapping[int, str], task: Task, scorer: LM, rng,
                  parents: Mapping[int, str] | None = None):
        """Score the units ``kinds`` names, each logged under its kind and parent ('' if ``parents``
        names none) with its per-example outcomes (one scorer call); then shuffle each one's context
        with what it got right."""
        parents = parents or {}
        which, out = sorted(kinds), list(units)
        if not which:
            return out, ()
        examples = self._fitness_examples(task, rng)
        texts = [units[i].text for i in which]
        rows = evaluate.predict_many(task, [TextPrompt(t) for t in texts], examples, scorer)
        evaluated = []
        for i, text, row in zip(which, texts, rows):
            score = float(task.score(row, examples))
            context = units[i].context
            if self.max_context:
                right = correct_workings(task, examples, row)
                context = shuffle_context(context, right, self.max_context, self.context_refresh_p, rng)
            out[i] = replace(units[i], fitness=score, context=context)
            evaluated.append(Evaluated(text, score, len(examples), kinds[i], parents.get(i, ""),
                                       **evaluate.provenance(task, row, examples)))
        return out, tuple(evaluated)

    def _metrics(self, state: BreederState) -> dict[str, float]:
        scores = [u.fitness for u in state.units]
        return {
            "dev_score": state.best_score,
            "population_best": max(scores),
            "population_mean": float(np.mean(scores)),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "crossovers": float(state.crossovers),
            "copies": float(state.copies),
            "mutation_prompts": float(len({u.mutation for u in state.units})),
            "evolved_mutation_prompts": float(sum(u.mutation not in self.mutation_prompts for u in state.units)),
        }

    def best(self, state: BreederState) -> TextPrompt:
        if not state.units:
            raise ValueError("Promptbreeder has no population yet; run at least one step")
        return TextPrompt(state.best_text)

    def snapshot(self, state: BreederState) -> Snapshot:
        return Snapshot(population=ranked((u.text, u.fitness) for u in state.units))

    def done(self, state: BreederState) -> bool:
        return False


def instruction_text(prompts: Sequence[str], context: Sequence[str] = ()) -> str:
    """What a unit puts in the task's ``{instruction}`` slot: its context, then its task prompts in
    order, one per line (P1, then P2)."""
    return "\n\n".join((*context, "\n".join(prompts)))


def record(state: BreederState, units: Sequence[Unit], evaluated: Sequence[Evaluated]) -> BreederState:
    """``state`` with ``units``, the elite's lineage extended, and the run's fittest prompt updated."""
    units = list(units)
    e = elite(units)
    if not units[e].lineage or units[e].lineage[-1] != units[e].prompts:
        units[e] = replace(units[e], lineage=units[e].lineage + (units[e].prompts,))
    best_text, best_score = state.best_text, state.best_score
    for ev in evaluated:  # strictly better only: on a tie the earlier prompt stays
        if ev.score > best_score:
            best_text, best_score = ev.prompt, ev.score
    return replace(state, units=tuple(units), best_text=best_text, best_score=best_score)


def swap(prompts: tuple[str, ...], k: int, text: str) -> tuple[str, ...]:
    """``prompts`` with entry ``k`` replaced by ``text``."""
    return prompts[:k] + (text,) + prompts[k + 1 :]


def pick(options: Sequence[str], rng: np.random.Generator) -> str:
    """One of ``options`` uniformly at random."""
    return options[int(rng.integers(len(options)))]


def elite(units: Sequence[Unit]) -> int:
    """Index of the fittest unit (the first one on a tie)."""
    return max(range(len(units)), key=lambda i: (units[i].fitness, -i))


def tournaments(units: Sequence[Unit], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Random disjoint pairs as (winner, loser): higher fitness wins, a tie goes to the lower index.

    The tie rule makes the elite (:func:`elite`) win every tournament it is drawn into.
    """
    order = rng.permutation(len(units))
    pairs = []
    for a, b in zip(order[0::2], order[1::2]):
        a, b = sorted((int(a), int(b)))
        pairs.append((a, b) if units[a].fitness >= units[b].fitness else (b, a))
    return pairs


def fitness_proportionate(units: Sequence[Unit], exclude: set[int], rng: np.random.Generator) -> int | None:
    """A unit not in ``exclude``, drawn with probability proportional to its fitness (roulette wheel);
    uniformly when none has a positive fitness; ``None`` when there is none to draw."""
    candidates = [i for i in range(len(units)) if i not in exclude]
    if not candidates:
        return None
    weights = np.array([max(units[i].fitness, 0.0) for i in candidates])
    p = weights / weights.sum() if weights.sum() > 0 else None
    return candidates[int(rng.choice(len(candidates), p=p))]


def correct_workings(task: Task, examples: Sequence[Example], predictions: Sequence) -> list[str]:
    """The examples answered correctly, each as "Input: ...\\nOutput: <the model's answer>"."""
    return [
        f"Input: {' '.join(input_texts([ex]))}\nOutput: {task.shown(p, ex)}"
        for ex, p in zip(examples, predictions)
        if task.is_correct(p, ex)
    ]


def shuffle_context(
    context: tuple[str, ...], correct: Sequence[str], max_context: int, refresh_p: float, rng: np.random.Generator
) -> tuple[str, ...]:
    """A unit's few-shot context after an evaluation in which it got ``correct`` right (§3.2.5).

    With probability ``refresh_p`` the whole list is resampled from ``correct``. Otherwise a list
    with room is filled up with new correct workings out, and a full one has one entry, at random,
    replaced by one new correct working out. Nothing right: the context stays.
    """
    if not correct:
        return context
    if rng.random() < refresh_p:
        idx = rng.choice(len(correct), size=min(max_context, len(correct)), replace=False)
        return tuple(correct[i] for i in sorted(idx))
    fresh = [c for c in dict.fromkeys(correct) if c not in context]
    if not fresh:
        return context
    if len(context) < max_context:
        idx = rng.choice(len(fresh), size=min(max_context - len(context), len(fresh)), replace=False)
        return context + tuple(fresh[i] for i in sorted(idx))
    return swap(context, int(rng.integers(len(context))), fresh[int(rng.integers(len(fresh)))])


def near_duplicate(text: str, others: Sequence[str], threshold: float) -> bool:
    """True if ``text`` is at least ``threshold`` alike to one of ``others`` (difflib ratio,
    case-insensitive); an exact copy always is."""
    from difflib import SequenceMatcher

    low = text.lower()
    return any(low == o.lower() or SequenceMatcher(None, low, o.lower()).ratio() >= threshold for o in others)


def eda_context(
    scored: Sequence[tuple[str, float]], mutation: str, ranked: bool, rng: np.random.Generator, threshold: float = 1.0
) -> str:
    """EDA mutation: the population's task prompts as a numbered list the LM continues.

    An entry at least ``threshold`` alike to an earlier one is left out (the paper's filter at
    0.95 BERT similarity; 1.0: exact copies only). ``ranked``: the paper's rank-and-index variant,
    listed in ascending fitness while the header (deliberately) claims descending order, so the LM
    imitates the last, best entries.
    """
    items: list[tuple[str, float]] = []
    for prompt, score in scored:
        if not near_duplicate(prompt, [p for p, _ in items], threshold):
            items.append((prompt, score))
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


def lineage_context(genotypes: Sequence[str]) -> str:
    """Lineage mutation (§3.2.2): a unit's elites, oldest first, unfiltered, for the LM to continue."""
    lines = "\n".join(f"{k}. {g}" for k, g in enumerate(genotypes, 1))
    return f"{LINEAGE_HEAD}\n{lines}\n{len(genotypes) + 1}."
