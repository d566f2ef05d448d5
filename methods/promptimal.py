"""Promptimal-style rewriting: a rewriter LM is shown an instruction and what it gets wrong, and writes a better one.

Promptimal (NoahBSchwartz/Promptimal) mined prompts a model answered badly, had a large
model rewrite them ("Here is the first attempt ... it resulted in a score of only N/10 because
the chatbot gave the answer ... Can you rewrite the prompt to be better?"), scored the
rewrites, fed scores and answers back for three more rounds, and fine-tuned Llama-2 7B with
LoRA on the resulting (prompt -> better prompt) pairs, so that one call of a small model does
what OPRO or Promptbreeder pay 20+ generations of a large one for.

Here the rewriter's input is :func:`rewrite_request`: the task (its answer options and its
template with the instruction slot marked), the current instruction, its dev score and the dev
examples it gets wrong, hardest first (those the most prompts of the run have missed). Each
step rewrites every lineage's current instruction ``n_samples`` times (one ``generate`` call),
scores all rewrites on the same dev examples (one scorer call) and keeps a rewrite only when it
scores strictly higher. The same text is what ``pipelines.distill`` trains the rewriter on, so
a distilled rewriter is served the format it learned; with the base proposer this method is
the data-generating loop of ``pipelines.distill rounds`` (Promptimal's steps 2-4).

Departures from Promptimal: it rewrites task instructions scored on a labelled dev set, not
single questions scored by a reward model; the feedback is the examples the instruction gets
wrong rather than one answer; the rewriter is whatever small causal LM the sweep's proposer
is (SmolLM2-135M on the CPU default, which writes poor instructions before distillation),
fine-tuned on pairs mined from this project's own sweep logs (see ``pipelines/distill.py``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import scored_prompts
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev
from methods.text import clean_candidates, input_texts
from tasks.core import Example, Task, example_key
from tasks.generative import is_generative

REQUEST = (
    "Rewrite the instruction so that a language model answers the task correctly.\n\n"
    "Task: {description}\n"
    "Instruction: {prompt}\n"
    "Score: {score}/100\n"
    "{failures}"
    "Improved instruction:"
)
FAILURE = "Input: {input}\nCorrect answer: {answer}\n"
STOP = ("\n",)  # a rewrite is one line; the trained rewriter ends it with a newline


def task_description(task: Task) -> str:
    """What the rewriter is told about a task: its answer options (label tasks) and its template, slot marked."""
    fields = {f: "{" + f + "}" for f in task.fields}
    shape = " / ".join(ln for ln in task.template.format(instruction="<instruction>", **fields).splitlines() if ln.strip())
    if is_generative(task):
        return f"the model writes the answer. Format: {shape}"
    options = ", ".join(w.strip() for w in task.verbalizer)
    return f"the answer is one of: {options}. Format: {shape}"


def failure_lines(task: Task, examples: Sequence[Example], limit: int) -> str:
    """Up to ``limit`` examples as the rewriter sees them (input fields and the correct answer)."""
    lines = []
    for ex in list(examples)[:limit]:
        text = " | ".join(str(v).replace("\n", " ") for v in ex.inputs.values())
        lines.append(FAILURE.format(input=text[:300], answer=task.answer_text(ex)))
    return ("Examples it gets wrong:\n" + "".join(lines)) if lines else ""


def rewrite_request(description: str, prompt: str, score: float, failures: str) -> str:
    """The rewriter's input; ``pipelines.distill`` trains on exactly this text."""
    return REQUEST.format(description=description, prompt=prompt or "(none)", score=round(100 * score),
                          failures=failures)


def hardest_first(keys: Sequence[str], outcomes: Sequence[float], misses: dict[str, int]) -> list[int]:
    """Positions of the examples a prompt got wrong, most-missed across the run first (ties: dev order)."""
    wrong = [i for i, o in enumerate(outcomes) if o < 1.0]
    return sorted(wrong, key=lambda i: -misses.get(keys[i], 0))


@dataclass(frozen=True)
class Lineage:
    """One start prompt's line: its current best text, score and per-example outcomes on dev."""

    text: str
    score: float
    outcomes: tuple[float, ...]


@dataclass(frozen=True)
class PromptimalState:
    lineages: tuple[Lineage, ...] = ()
    scored: tuple[tuple[str, float], ...] = ()  # every prompt scored, discovery order
    misses: tuple[tuple[str, int], ...] = ()  # example key -> prompts that got it wrong
    step: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Promptimal:
    """Rewrite each lineage's instruction from its failures; keep strict improvements.

    Args:
        steps: rewriting rounds after the first step, which scores the start prompts.
        n_samples: rewrites sampled per lineage per step (one generate call for all lineages).
        n_failures: wrong dev examples shown per request, hardest first.
        n_eval: dev examples every prompt is scored on (0 = the whole dev split; fixed per run).
        temperature: the rewriter's sampling temperature (0: greedy, then ``n_samples`` is 1).
        max_new_tokens: rewrite length cap.
        starts: start prompts (one lineage each); empty: the task's own instruction.
        starts_file: a JSON file ``{task name: [prompts]}`` read for this task's starts
            (``pipelines.distill rounds`` writes one per round); overrides ``starts`` when it
            names the task.
    """

    steps: int = 2
    n_samples: int = 4
    n_failures: int = 3
    n_eval: int = 32
    temperature: float = 0.7
    max_new_tokens: int = 48
    starts: tuple[str, ...] = ()
    starts_file: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "starts", tuple(self.starts))
        for name in ("steps", "n_samples", "n_failures"):
            if getattr(self, name) < (0 if name == "steps" else 1):
                raise ValueError(f"promptimal: {name} must be >= {0 if name == 'steps' else 1}, got {getattr(self, name)}")
        if self.starts_file and not Path(self.starts_file).is_file():
            raise ValueError(f"promptimal: starts_file {self.starts_file!r} does not exist")

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def planned_steps(self) -> int:
        return self.steps + 1

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> PromptimalState:
        return PromptimalState()

    def start_prompts(self, task: Task) -> tuple[str, ...]:
        if self.starts_file:
            named = json.loads(Path(self.starts_file).read_text(encoding="utf-8")).get(task.name)
            if named:
                return tuple(dict.fromkeys(named))
        return tuple(dict.fromkeys(self.starts)) or (task.instruction,)

    def step(self, state: PromptimalState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        dev = fixed_dev(task, self.n_eval)
        if not state.lineages:
            return self._seed(state, task, dev, scorer)
        texts, parents = self._rewrite(state, task, dev, proposer, rng)
        results = scored_prompts(task, [TextPrompt(t) for t in texts], dev, scorer)
        lineages, accepted = list(state.lineages), 0
        for text, parent, (score, prov) in zip(texts, parents, results):
            if score > lineages[parent].score:  # strictly better than the lineage's current text
                lineages[parent] = Lineage(text, score, prov["outcomes"])
                accepted += 1
        evaluated = tuple(Evaluated(t, s, len(dev), "rewrite", parent=state.lineages[p].text, **prov)
                          for t, p, (s, prov) in zip(texts, parents, results))
        new = replace(state, lineages=tuple(lineages), scored=state.scored + tuple((t, s) for t, (s, _) in zip(texts, results)),
                      misses=_count_misses(state.misses, results), step=state.step + 1, accepted=state.accepted + accepted)
        return new, Report(self._metrics(new, len(texts), accepted), evaluated)

    def _seed(self, state: PromptimalState, task: Task, dev, scorer: LM):
        starts = self.start_prompts(task)
        results = scored_prompts(task, [TextPrompt(t) for t in starts], dev, scorer)
        lineages = tuple(Lineage(t, s, prov["outcomes"]) for t, (s, prov) in zip(starts, results))
        new = replace(state, lineages=lineages, scored=tuple((t, s) for t, (s, _) in zip(starts, results)),
                      misses=_count_misses((), results), step=1)
        evaluated = tuple(Evaluated(t, s, len(dev), "start", **prov) for t, (s, prov) in zip(starts, results))
        return new, Report(self._metrics(new, 0, 0), evaluated)

    def _rewrite(self, state: PromptimalState, task: Task, dev, proposer: LM, rng: np.random.Generator):
        """Every lineage's request in one generate call; returns usable rewrites and their lineage."""
        keys = [example_key(ex) for ex in dev]
        misses, description = dict(state.misses), task_description(task)
        contexts, shown = [], []
        for line in state.lineages:
            wrong = [dev[i] for i in hardest_first(keys, line.outcomes, misses)][: self.n_failures]
            contexts.append(rewrite_request(description, line.text, line.score, failure_lines(task, wrong, self.n_failures)))
            shown += input_texts(wrong)
        n = self.n_samples if self.temperature > 0 else 1
        outs = proposer.generate(contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 n=n, seed=int(rng.integers(2**31)), stop=STOP)
        seen = [t for t, _ in state.scored]
        texts, parents = [], []
        for j, raws in enumerate(outs):
            # a rewrite that copies an example it was shown is a demo, not an instruction
            for text in clean_candidates(raws, shown, seen + texts):
                texts.append(text)
                parents.append(j)
        return texts, parents

    def _metrics(self, state: PromptimalState, proposed: int, accepted: int) -> dict[str, float]:
        return {"dev_score": max(s for _, s in state.scored), "rewrites": float(proposed),
                "accepted": float(accepted), "accepted_total": float(state.accepted)}

    def best(self, state: PromptimalState) -> TextPrompt:
        return TextPrompt(ranked(state.scored, 1)[0][0]) if state.scored else TextPrompt("")

    def snapshot(self, state: PromptimalState) -> Snapshot:
        return Snapshot(population=tuple((ln.text, ln.score) for ln in state.lineages))

    def done(self, state: PromptimalState) -> bool:
        return state.step > self.steps


def _count_misses(misses, results) -> tuple[tuple[str, int], ...]:
    counts = dict(misses)
    for _, prov in results:
        for key, outcome in zip(prov["examples"], prov["outcomes"]):
            counts[key] = counts.get(key, 0) + (outcome < 1.0)
    return tuple(sorted(counts.items()))
