"""OPRO (Yang et al. 2023, "Large Language Models as Optimizers"): the LM reads a scored history.

Each step shows the proposer a meta-prompt with the top ``k`` instructions found so far and
their scores (0-100), sorted *ascending* so the best sit right before the cue, followed by a
few task exemplars with the instruction's position marked ``<INS>``. As in the reference code
(google-deepmind/opro, ``opt_utils.run_evolution``), one meta-prompt is built per step, its
exemplars drawn at random once, and the proposer samples ``n_proposals`` instructions from it
(one generate call with ``n`` samples); ``shared_meta_prompt=False`` gives each proposal its
own exemplar draw instead. Duplicates of anything already scored are dropped and the rest are
scored in one batched scorer call. The first step only scores the seed instruction.

Departures from the paper: the default sizes are CPU-sized (4 proposals and 10 past
instructions per step; ``opro_paper.yaml`` has the paper's 8 and 20); the cue asks for the
text after ``text:`` rather than in square brackets (a small model continues the history's
pattern far more reliably); scores are shown as 0-100 integers, as the reference's 100
buckets; no ``old_instruction_score_threshold`` filter (the reference's default for most tasks
is 0.0, which keeps everything).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import scored_prompts, subsample
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev
from methods.text import clean_candidates, input_texts
from tasks.core import Example, Task

HEAD = (
    "I have some texts along with their corresponding scores. The texts are arranged in ascending "
    "order based on their scores, where higher scores indicate better quality.\n\n"
)
PAIR = "text:\n{text}\nscore:\n{score}\n\n"
EXEMPLAR_HEAD = (
    "The following exemplars show how to apply your text: you replace <INS> in each input with "
    "your text, then read the input and give an output. We say your output is wrong if your output "
    "is different from the given output, and we say your output is correct if they are the same.\n\n"
)
EXEMPLAR = "input:\n{input}\noutput:\n{output}\n\n"
# The paper asks for the text "in square brackets"; a small model continues the history's own
# "text:" pattern far more reliably, and the "score:" it writes next is where generation stops.
CUE = (
    "Write your new text that is different from the old ones and has a score as high as "
    "possible.\n\ntext:\n"
)
_NO_FEWSHOT = ("shots", "header")


@dataclass(frozen=True)
class OPROState:
    """Every scored instruction (text, dev score) in discovery order, and proposal counts."""

    scored: tuple[tuple[str, float], ...] = ()
    step: int = 0
    proposed: int = 0
    usable: int = 0


def exemplar(task: Task, ex: Example) -> str:
    """One exemplar: the rendered input with ``<INS>`` in the slot, and its gold output."""
    # Few-shot blocks (MMLU) would swamp a small proposer's context; the slot position is the point.
    inputs = {k: ("" if k in _NO_FEWSHOT else v) for k, v in ex.inputs.items()}
    text = task.template.format(instruction="<INS>", **inputs)
    return EXEMPLAR.format(input=text, output=task.answer_text(ex))


def meta_prompt(
    task: Task, history: Sequence[tuple[str, float]], exemplars: Sequence[Example], top_k: int
) -> str:
    """OPRO's meta-prompt: top ``top_k`` of ``history`` ascending by score, exemplars, the cue."""
    top = shown(history, top_k)
    pairs = "".join(PAIR.format(text=t, score=round(100 * s)) for t, s in top)
    demos = "".join(exemplar(task, ex) for ex in exemplars)
    return HEAD + pairs + (EXEMPLAR_HEAD + demos if demos else "") + CUE


def shown(history: Sequence[tuple[str, float]], top_k: int) -> list[tuple[str, float]]:
    """The past instructions a meta-prompt lists: the top ``top_k`` of ``history``, ascending by score."""
    return sorted(history, key=lambda p: p[1])[-top_k:] if top_k > 0 else []


def parent_of(history: Sequence[tuple[str, float]], top_k: int) -> str:
    """What a proposal is written from: the best instruction its meta-prompt shows (listed last,
    right before the cue); '' when it shows none."""
    top = shown(history, top_k)
    return top[-1][0] if top else ""


@dataclass(frozen=True)
class OPRO:
    """Optimization by PROmpting.

    Args:
        n_proposals: new instructions asked per step (one context each, one generate call).
        top_k: best past instructions shown in the meta-prompt (the paper shows 20).
        n_exemplars: task exemplars per meta-prompt, drawn from train per context.
        n_eval: dev examples each instruction is scored on (0 = whole dev split).
        temperature: proposer temperature (the paper samples at 1.0 for diversity).
        max_new_tokens: proposal length cap.
        shared_meta_prompt: one meta-prompt (one exemplar draw) per step, sampled
            ``n_proposals`` times, as the paper does; false: one per proposal.
    """

    n_proposals: int = 4
    top_k: int = 10
    n_exemplars: int = 3
    n_eval: int = 32
    temperature: float = 1.0
    max_new_tokens: int = 40
    shared_meta_prompt: bool = True

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> OPROState:
        return OPROState()

    def step(self, state: OPROState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if not state.scored:
            candidates, raw_n, kind, parent = [task.instruction], 0, "seed", ""
        else:
            raws, banned = self._propose(state, task, proposer, rng)
            candidates = clean_candidates(raws, banned, [t for t, _ in state.scored])
            # every meta-prompt of a step shows the same trajectory, whatever its exemplars
            raw_n, kind, parent = len(raws), "candidate", parent_of(state.scored, self.top_k)
        dev = fixed_dev(task, self.n_eval)
        results = scored_prompts(task, [TextPrompt(c) for c in candidates], dev, scorer)
        scores = [s for s, _ in results]
        new = replace(
            state, scored=state.scored + tuple(zip(candidates, scores)), step=state.step + 1,
            proposed=state.proposed + raw_n, usable=state.usable + (len(candidates) if raw_n else 0),
        )
        evaluated = tuple(Evaluated(c, s, len(dev), kind, parent, **seen) for c, (s, seen) in zip(candidates, results))
        return new, Report(self._metrics(new, scores), evaluated)

    def _propose(self, state: OPROState, task: Task, proposer: LM, rng: np.random.Generator):
        shared = self.shared_meta_prompt
        draws = [subsample(task.train, self.n_exemplars, rng) for _ in range(1 if shared else self.n_proposals)]
        contexts = [meta_prompt(task, state.scored, d, self.top_k) for d in draws]
        outs = proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            n=self.n_proposals if shared else 1, seed=int(rng.integers(2**31)), stop=("\nscore", "\n\n"),
        )
        return [text for o in outs for text in o], input_texts([ex for d in draws for ex in d])

    def _metrics(self, state: OPROState, scores: Sequence[float]) -> dict[str, float]:
        top = sorted(s for _, s in state.scored)[-self.top_k :]
        return {
            "dev_score": max(s for _, s in state.scored),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "step_best": max(scores, default=float("nan")),
            "population_mean": float(np.mean(top)),
        }

    def best(self, state: OPROState) -> TextPrompt:
        if not state.scored:
            raise ValueError("OPRO has scored nothing yet; run at least one step")
        return TextPrompt(max(state.scored, key=lambda p: p[1])[0])

    def snapshot(self, state: OPROState) -> Snapshot:
        # The trajectory the next meta-prompt shows.
        return Snapshot(population=ranked(state.scored, self.top_k))

    def done(self, state: OPROState) -> bool:
        # OPRO has no natural end: the pipeline's step cap (or early stopping) ends it.
        return False
