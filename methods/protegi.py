"""ProTeGi / APO (Pryzant et al. 2023): textual gradients, edits, and bandit beam selection.

One step expands every beam member as the reference code does (microsoft/LMOps
``prompt_optimization/optimizers.py``, ``ProTeGi.expand_candidates``): ``n_gradients`` error
samples are drawn from its errors on a train minibatch, each goes to the proposer, which
writes ``reasons_per_error`` "gradients" (reasons the prompt failed) from it; each reason,
with its own error sample, yields edited prompts; then Monte-Carlo paraphrases are drawn of
each edit and of the member itself. A member's new prompts are de-duplicated and, beyond
``max_expansion``, randomly cut to that many (the reference's ``max_expansion_factor``
without ``--reject_on_errors``). The beam and all successors race under
a fixed budget of pulls (one pull = one candidate scored on a small random dev minibatch;
UCB or Successive Rejects), and the ``beam_size`` best survive. Survivors are also scored
on a fixed dev subset, so ``dev_score`` is comparable across steps and methods.

Per step: one scorer call for the errors, one per race round, one for new survivors; three
generate calls (gradients, edits, paraphrases), each batched over the whole beam.

Departures: the default sizes are CPU-sized (beam 2, minibatch 16, 2 error samples per member,
1 paraphrase per prompt; ``protegi_paper.yaml`` has the reference's 4, 64, 4 and 2); the
selection races on small dev minibatches (the reference's bandit evaluators pull train
examples); the meta-prompts end on an opened ``<START>`` and each sample gives one item.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.ape import RESAMPLE_TEMPLATE
from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import scored_prompts, subsample
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import Race, fixed_dev, minibatch_pull, predict_many, successive_rejects, ucb_race
from methods.text import clean_candidates, clean_one
from tasks.core import Example, Task

# The paper's templates; each ends on an opened <START> so a small model writes one item
# straight away (several items come from sampling n completions, not from one long reply).
# The gradient's opened item starts the sentence: a 135M model then writes a reason instead
# of more examples, and the reason reads on from "the problem with this prompt is that".
GRADIENT_CUE = "This prompt could have gotten these examples wrong because"
GRADIENT_TEMPLATE = (
    "I'm trying to write a zero-shot classifier prompt.\n\nMy current prompt is:\n\"{prompt}\"\n\n"
    "But this prompt gets the following examples wrong:\n{errors}\n\n"
    "give {n} reasons why the prompt could have gotten these examples wrong.\n"
    "Wrap each reason with <START> and <END>\n\n<START>" + GRADIENT_CUE
)
EDIT_TEMPLATE = (
    "I'm trying to write a zero-shot classifier.\n\nMy current prompt is:\n\"{prompt}\"\n\n"
    "But it gets the following examples wrong:\n{errors}\n\n"
    "Based on these examples the problem with this prompt is that {gradient}\n\n"
    "Based on the above information, I wrote {n} different improved prompts.\n"
    "Each prompt is wrapped with <START> and <END>.\n\nThe {n} new prompts are:\n<START>"
)
_NO_FEWSHOT = ("shots", "header")
# Lines that copy the meta-prompt's own scaffolding rather than writing an item.
_ECHO = re.compile(
    r"^(?:the \d+ new prompts?\b|prompt \d*:|text:|label:|prediction:|example \d)", re.IGNORECASE
)


def example_text(task: Task, ex: Example) -> str:
    """The example's input fields as one line of text (few-shot blocks left out)."""
    return " ".join(ex.inputs[f] for f in task.fields if f not in _NO_FEWSHOT)


def error_block(task: Task, errors: Sequence[tuple[Example, object]]) -> str:
    """Errors in the paper's format: text, gold label and the prompt's prediction (on a
    generative task, the gold answer and what the model wrote)."""
    blocks = []
    for i, (ex, pred) in enumerate(errors, 1):
        blocks.append(
            f"## Example {i}\nText: \"{example_text(task, ex)}\"\n"
            f"Label: {task.answer_text(ex)}\nPrediction: {task.shown(pred, ex)}"
        )
    return "\n".join(blocks)


def sample_errors(
    task: Task, examples: Sequence[Example], preds: np.ndarray, k: int, rng: np.random.Generator
) -> list[tuple[Example, object]]:
    """Up to ``k`` random (example, wrong prediction) pairs, in minibatch order."""
    wrong = [i for i, ex in enumerate(examples) if not task.is_correct(preds[i], ex)]
    if len(wrong) > k:
        wrong = sorted(rng.choice(wrong, size=k, replace=False).tolist())
    return [(examples[i], preds[i]) for i in wrong]


@dataclass(frozen=True)
class ProTeGiState:
    """The beam (texts), every fixed-dev score so far, and counters."""

    beam: tuple[str, ...] = ()
    scored: tuple[tuple[str, float], ...] = ()
    step: int = 0
    proposed: int = 0
    usable: int = 0
    pulls: int = 0


@dataclass(frozen=True)
class ProTeGi:
    """Prompt optimization with textual gradients and beam search.

    Args:
        beam_size: prompts kept per step (b).
        minibatch: train examples each beam member is run on to find its errors.
        n_errors: errors shown per gradient meta-prompt (the paper shows 4).
        n_gradients: error samples drawn per beam member, one gradient meta-prompt each.
        reasons_per_error: reasons sampled per error sample.
        edits_per_gradient: edited prompts sampled per reason.
        mc_samples: Monte-Carlo paraphrases per edited prompt (and of the member itself).
        paraphrase_parent: also paraphrase the member, as the reference does.
        max_expansion: new prompts kept per member, a random subset beyond it (0: no cap).
        selector: "ucb" or "successive_rejects".
        budget: pulls per step's race.
        pull_size: dev examples per pull.
        per_round: arms pulled per UCB round (one scorer call each round).
        ucb_c: UCB exploration weight.
        n_eval: fixed dev examples every survivor is scored on (0 = whole dev split).
        temperature: proposer temperature.
        max_new_tokens: length cap of a reason or a prompt.
    """

    beam_size: int = 2
    minibatch: int = 16
    n_errors: int = 4
    n_gradients: int = 2
    reasons_per_error: int = 1
    edits_per_gradient: int = 1
    mc_samples: int = 1
    paraphrase_parent: bool = True
    max_expansion: int = 8
    selector: str = "ucb"
    budget: int = 24
    pull_size: int = 8
    per_round: int = 4
    ucb_c: float = 1.0
    n_eval: int = 32
    temperature: float = 0.7
    max_new_tokens: int = 48

    def __post_init__(self) -> None:
        if self.selector not in ("ucb", "successive_rejects"):
            raise ValueError(
                f"ProTeGi selector must be 'ucb' or 'successive_rejects', got {self.selector!r}"
            )

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> ProTeGiState:
        return ProTeGiState(beam=(task.instruction,))

    def step(self, state: ProTeGiState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        errors = self._errors(state.beam, task, scorer, rng)
        edits, raw_n, banned = self._expand(state.beam, errors, task, proposer, rng)
        paraphrases = self._paraphrase(state.beam, edits, proposer, rng)
        per_member = self._successors(state.beam, edits, paraphrases, banned, rng)
        arms = list(state.beam) + [t for texts in per_member for t in texts]
        # a successor's parent is the member it was expanded from (edits and paraphrases alike)
        parents = {t: state.beam[j] for j, texts in enumerate(per_member) for t in texts}
        race = self._race(arms, task, scorer, rng)
        beam = tuple(arms[i] for i in (race.top(self.beam_size) if race else range(len(arms))))
        scored, beam_eval = self._score_new(state, beam, parents, task, scorer)
        new = replace(
            state, beam=beam, scored=scored, step=state.step + 1,
            pulls=state.pulls + (race.pulls if race else 0),
            proposed=state.proposed + raw_n + sum(len(p) for p in paraphrases),
            usable=state.usable + len(arms) - len(state.beam),
        )
        evaluated = self._race_log(arms, parents, race) + beam_eval
        return new, Report(self._metrics(new, errors, len(arms), race), evaluated)

    def _errors(
        self, beam, task: Task, scorer: LM, rng: np.random.Generator
    ) -> list[list[list[tuple[Example, int]]]]:
        """Per beam member, ``n_gradients`` error samples from its predictions on one shared
        train minibatch (one scorer call); empty for a member that made no error."""
        batch = subsample(task.train, self.minibatch, rng)
        preds = predict_many(task, beam, batch, scorer)
        out = []
        for j in range(len(beam)):
            samples = [sample_errors(task, batch, preds[j], self.n_errors, rng) for _ in range(self.n_gradients)]
            out.append([e for e in samples if e])
        return out

    def _generate(
        self, proposer: LM, contexts: list[str], n: int, rng: np.random.Generator
    ) -> list[list[str]]:
        if not contexts or n < 1:
            return [[] for _ in contexts]
        return proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature, n=n,
            # No blank-line stop: after an opened <START> small models often begin with blank
            # lines, and a stop there would return nothing; first_usable finds the item.
            seed=int(rng.integers(2**31)), stop=("<END>",),
        )

    def _expand(self, beam, errors, task: Task, proposer: LM, rng: np.random.Generator):
        """Gradients from every error sample of every member, then edits for every gradient,
        each edit with the error sample its reason came from; edits are ``(member, text)``."""
        jobs = [(j, beam[j], error_block(task, e)) for j, samples in enumerate(errors) for e in samples]
        grad_ctx = [GRADIENT_TEMPLATE.format(prompt=p, errors=b, n=self.reasons_per_error) for _, p, b in jobs]
        grads = self._generate(proposer, grad_ctx, self.reasons_per_error, rng)
        edit_jobs = [(j, EDIT_TEMPLATE.format(prompt=p, errors=b, gradient=g, n=self.edits_per_gradient))
                     for (j, p, b), row in zip(jobs, grads) for g in _reasons(row)]
        outs = self._generate(proposer, [c for _, c in edit_jobs], self.edits_per_gradient, rng)
        edits = [(j, first_usable(s)) for (j, _), row in zip(edit_jobs, outs) for s in row]
        banned = [example_text(task, ex) for samples in errors for e in samples for ex, _ in e]
        return edits, len(edits), banned

    def _paraphrase(self, beam, edits: list[tuple[int, str]], proposer: LM, rng: np.random.Generator):
        """Monte-Carlo paraphrases of every edit (and of every member), by member: ``[[text]]``."""
        sources = [(j, e) for j, e in edits if e]
        if self.paraphrase_parent:
            sources += list(enumerate(beam))
        rows = self._generate(proposer, [RESAMPLE_TEMPLATE.format(instruction=t) for _, t in sources],
                              self.mc_samples, rng)
        out: list[list[str]] = [[] for _ in beam]
        for (j, _), row in zip(sources, rows):
            out[j] += row
        return out

    def _successors(self, beam, edits, paraphrases, banned, rng: np.random.Generator) -> list[list[str]]:
        """Each member's new prompts (edits, then paraphrases), cleaned, de-duplicated against the
        beam and every other member's, and cut to a random ``max_expansion`` of them."""
        seen, out = list(beam), []
        for j in range(len(beam)):
            mine = clean_candidates([e for k, e in edits if k == j] + paraphrases[j], banned, seen)
            if self.max_expansion and len(mine) > self.max_expansion:
                keep = sorted(rng.choice(len(mine), size=self.max_expansion, replace=False).tolist())
                mine = [mine[i] for i in keep]
            seen += mine
            out.append(mine)
        return out

    def _race(self, arms: list[str], task: Task, scorer: LM, rng: np.random.Generator) -> Race | None:
        """Bandit selection of the next beam; ``None`` when every arm survives anyway."""
        if len(arms) <= self.beam_size:
            return None
        pull = minibatch_pull(task, arms, self.pull_size, rng, scorer)
        if self.selector == "ucb":
            return ucb_race(len(arms), pull, self.budget, self.per_round, rng, self.ucb_c)
        return successive_rejects(len(arms), pull, self.budget, self.beam_size)

    def _score_new(self, state: ProTeGiState, beam: tuple[str, ...], parents, task: Task, scorer: LM):
        """Fixed-dev scores for survivors not scored before (one scorer call)."""
        known = dict(state.scored)
        new = [b for b in beam if b not in known]
        dev = fixed_dev(task, self.n_eval)
        results = scored_prompts(task, [TextPrompt(b) for b in new], dev, scorer)
        evaluated = tuple(Evaluated(b, s, len(dev), "beam", parents.get(b, ""), **seen)
                          for b, (s, seen) in zip(new, results))
        return state.scored + tuple((b, s) for b, (s, _) in zip(new, results)), evaluated

    def _race_log(self, arms: list[str], parents, race: Race | None) -> tuple[Evaluated, ...]:
        """The race's means; no per-example outcomes (its minibatches are drawn per pull, not kept).
        A member carried over from the last beam gets no parent here: its own record has it."""
        if race is None:
            return ()
        return tuple(
            Evaluated(a, m, c * self.pull_size, "race", parents.get(a, ""))
            for a, m, c in zip(arms, race.means, race.counts)
            if c > 0
        )

    def _metrics(self, state: ProTeGiState, errors, n_arms: int, race: Race | None) -> dict[str, float]:
        known = dict(state.scored)
        return {
            "dev_score": max(known.values()),
            "beam_mean": float(np.mean([known[b] for b in state.beam])),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "errors": float(sum(len(e) for samples in errors for e in samples)),
            "arms": float(n_arms),
            "pulls": float(race.pulls if race else 0),
            "race_rounds": float(race.rounds if race else 0),
        }

    def best(self, state: ProTeGiState) -> TextPrompt:
        if not state.scored:
            raise ValueError("ProTeGi has scored nothing yet; run at least one step")
        return TextPrompt(max(state.scored, key=lambda p: p[1])[0])

    def snapshot(self, state: ProTeGiState) -> Snapshot:
        scores = dict(state.scored)
        return Snapshot(population=ranked((text, scores.get(text, float("nan"))) for text in state.beam))

    def done(self, state: ProTeGiState) -> bool:
        return False


def first_usable(raw: str, open_tag: str = "<START>", close_tag: str = "<END>") -> str:
    """The first usable line of the first usable tagged item (the tags themselves are optional).

    The meta-prompts end on an opened ``<START>``, so the reply's first item needs no opening
    tag. Small models open with a blank line, a code fence or a markdown heading before the
    item, so lines that :func:`~methods.text.clean_one` rejects (and echoes of the meta-prompt's
    own scaffolding) are skipped rather than fatal.
    """
    for segment in raw.split(close_tag):
        item = clean_one(segment.rsplit(open_tag, 1)[-1], skip=_ECHO)
        if item:
            return item
    return ""


def _reasons(raws: Sequence[str]) -> list[str]:
    """Usable reasons, de-duplicated in order."""
    out: list[str] = []
    for raw in raws:
        reason = first_usable(raw)
        reason = reason[:1].lower() + reason[1:]  # it continues "... the problem is that"
        if reason and reason not in out:
            out.append(reason)
    return out
