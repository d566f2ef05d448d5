"""GEPA (Agrawal et al. 2025, arXiv 2507.19457): reflective prompt evolution with Pareto selection.

The reference code is gepa-ai/gepa on GitHub (file paths below are under its ``src/gepa/``;
dspy's ``dspy.GEPA`` runs the same engine). GEPA keeps a pool of candidate instructions, each
scored once, when it is accepted, on every example of a fixed validation subset (the paper's
D_pareto; here ``n_val`` dev examples). One step is one GEPA iteration (the paper's §3; the
reference's ``core/engine.py:GEPAEngine.run``):

1. *Selection* (the paper's Pareto-based selection, the reference's
   ``gepa_utils.select_program_candidate_from_pareto_front``): per validation example, the
   candidates with the best score on it, ties included, form that example's front. Candidates
   that are dominated are removed (``remove_dominated_programs``: lowest aggregate first, a
   candidate is dropped while every front it is on also holds another surviving candidate).
   The parent is drawn with probability proportional to the number of fronts it is on.
2. *Reflective mutation* (``proposer/reflective_mutation/reflective_mutation.py``): a
   minibatch of ``minibatch_size`` training examples (``strategies/batch_sampler.py``:
   ``EpochShuffledBatchSampler``, train shuffled once per epoch, padded with its least used
   examples to a multiple of the minibatch) is run under the parent, capturing traces: per
   example the input, the model's answer and feedback (gold answer, correct or not, and for a
   label task the label probabilities). A parent perfect on the minibatch is skipped
   (``skip_perfect_score``, the reference's default). Otherwise one proposer call with the
   reference's instruction-proposal prompt (``strategies/instruction_proposal.py``: current
   instruction, the examples with feedback, "write a new instruction") writes the child, read
   from its ``` block as the reference's ``output_extractor`` does.
3. *Acceptance* (``strategies/acceptance.py:StrictImprovementAcceptance``): the child is run
   on the same minibatch and kept only if its sum of scores is strictly greater than the
   parent's. A kept child is then scored on the validation subset and joins the pool with its
   parent's index; a rejected one is never scored on it.
4. *Merge* (``use_merge``; ``proposer/merge.py`` and the engine's scheduling): each accepted
   child schedules a merge while fewer than ``max_merge_invocations`` were accepted; a
   scheduled merge is tried at the next iteration, instead of a mutation when a merge is
   found. Two undominated candidates, neither an ancestor of the other, with a common
   ancestor no better than either (aggregate), are combined component by component: a
   component one of them left as the ancestor had it takes the other's version. The merged
   candidate is scored on 5 validation examples picked across where each parent wins and
   where they tie (``select_eval_subsample_for_merged_program``) and accepted when its sum
   there is at least the better parent's; then it is scored on the rest of the subset and
   joins the pool with both parents. A merge tried is never retried (the reference's
   ``merges_performed``); a rejected merge ends the iteration without a mutation.

What merge means for one instruction. The reference only merges a triplet where some component
of one candidate still equals the ancestor's while the two candidates differ there
(``does_triplet_have_desirable_predictors``). A prompt here has one component, so a merge
exists only when one of the two candidates carries its common ancestor's exact text (a lineage
that came back to where it started), and the merged candidate is then a copy of the other
candidate's instruction. That is what this implements: with one instruction, merge cannot
combine lessons from two lineages; it rarely fires at all, and when it does it re-enters an
existing instruction with two parents. ``use_merge`` is off by default, as in the reference's
``gepa.optimize`` (dspy's ``dspy.GEPA`` turns it on).

Budget. Every call goes through the LMs given to ``step``, where the pipeline counts
example-evaluations. A mutation step spends ``minibatch_size`` (parent) plus, when the child is
usable, ``minibatch_size`` (child) plus, when accepted, ``n_val``; a merge step 5 plus, when
accepted, ``n_val - 5``. The ``rollouts`` metric sums them (the reference's "metric calls");
the first step scores the seed instruction on the validation subset. Per step: at most one
generate call and at most two scorer calls for a mutation (three when the child is accepted),
at most two scorer calls for a merge.

Where this departs from the reference: the aggregate of a candidate is the task's metric on the
validation subset (for accuracy and every generative metric that is the mean of the
per-example scores the reference averages; for a macro-F1 task it is the macro F1), so
``dev_score`` compares with the other methods'; a child identical to its parent is rejected
without being scored (it cannot be strictly better on the same examples under greedy
scoring); an accepted merge reuses its 5 subsample scores and is scored on the other
validation examples only (the reference's behaviour with ``cache_evaluation=True``); the
method's numpy generator drives selection, minibatches and merges (the reference shares one
``random.Random``), so runs match the reference's rules, not its draws; the feedback is written
here in the default adapter's words ("The generated response is correct/incorrect. The correct
answer is ..."), with a label task's answer probabilities added; the ``rollouts`` metric leaves
out a calibrated task's content-free inputs (the pipeline's budget counts them); a merge needs
at least 5 validation examples (the reference's ``merge_val_overlap_floor``, here always the
whole subset since every candidate is scored on all of it); there is no stop on
``max_metric_calls``: the pipeline's ``budget.scorer.examples`` ends a run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods import evaluate
from methods.base import Evaluated, Report, Snapshot, ranked
from methods.lm import LM, PROPOSER_WRITES, Needs, TextPrompt
from methods.racing import fixed_dev
from methods.text import input_texts
from tasks.core import Task, example_key
from tasks.generative import is_generative

# The reference's instruction-proposal prompt (strategies/instruction_proposal.py,
# InstructionProposalSignature.default_prompt_template); <curr_param> is the parent's
# instruction, <side_info> the minibatch's examples with feedback.
REFLECTION_PROMPT = """I provided an assistant with the following instructions to perform a task for me:
```
<curr_param>
```

The following are examples of different task inputs provided to the assistant along with the assistant's response for each of them, and some feedback on how the assistant's response could be better:
```
<side_info>
```

Your task is to write a new instruction for the assistant.

Read the inputs carefully and identify the input format and infer detailed task description about the task I wish to solve with the assistant.

Read all the assistant responses and the corresponding feedback. Identify all niche and domain specific factual information about the task and include it in the instruction, as a lot of it may not be available to the assistant in the future. The assistant may have utilized a generalizable strategy to solve the task, if so, include that in the instruction as well.

Provide the new instructions within ``` blocks."""
PLACEHOLDERS = ("<curr_param>", "<side_info>")
# proposer/merge.py: select_eval_subsample_for_merged_program(num_subsample_ids=5), and the
# API's merge_val_overlap_floor=5 (both parents must share this many scored validation examples).
MERGE_SUBSAMPLE = 5
MERGE_VAL_FLOOR = 5
# The per-example score a parent must reach on every minibatch example to be skipped (the
# reference's perfect_score).
PERFECT = 1.0


@dataclass(frozen=True)
class Candidate:
    """One pool member.

    Attributes:
        text: the instruction.
        parents: pool indices it came from: none for the seed, one for a mutation, two for a merge.
        scores: its score on each validation example, in the validation subset's order.
        score: its aggregate: the task metric on the validation subset.
    """

    text: str
    parents: tuple[int, ...]
    scores: tuple[float, ...]
    score: float


@dataclass(frozen=True)
class GEPAState:
    """The pool, the minibatch sampler's epoch, merge bookkeeping and counters.

    Attributes:
        pool: every accepted candidate, in discovery order (the seed first).
        iteration: GEPA iterations run (the seed's scoring is not one); picks the minibatch.
        order, epoch: the epoch's shuffled, padded training indices and which epoch they are.
        merges_due: merges scheduled by accepted mutations and not yet accepted.
        found_new: whether the last iteration's mutation was accepted (a merge is tried only then).
        merge_triplets: ``(i, j, ancestor)`` merges tried; merge_descs: ``(i, j, sources)`` built.
    """

    pool: tuple[Candidate, ...] = ()
    iteration: int = 0
    order: tuple[int, ...] = ()
    epoch: int = -1
    rollouts: int = 0
    proposed: int = 0
    accepted: int = 0
    rejected: int = 0
    unusable: int = 0
    skipped: int = 0
    merges_due: int = 0
    merges_tried: int = 0
    merges_accepted: int = 0
    found_new: bool = False
    merge_triplets: tuple[tuple[int, int, int], ...] = ()
    merge_descs: tuple[tuple[int, int, tuple[int, ...]], ...] = ()


@dataclass(frozen=True)
class Run:
    """One instruction run on some examples: predictions, per-example scores, and traces."""

    predictions: list
    scores: list[float]
    traces: list[dict[str, str]]


@dataclass(frozen=True)
class GEPA:
    """GEPA for one instruction.

    Args:
        n_val: validation (dev) examples every accepted candidate is scored on (0 = all of dev).
        minibatch_size: training examples per reflective mutation (the reference's 3).
        use_merge: try merges (see the module docstring for what a merge is with one instruction).
        max_merge_invocations: merges that may be accepted in a run (the reference's 5).
        skip_perfect_score: skip the mutation when the parent is perfect on its minibatch.
        temperature: proposer temperature for the reflection call.
        max_new_tokens: cap on the reflection's output (the new instruction, maybe in a ``` block).
        reflection_prompt: the meta-prompt; must hold ``<curr_param>`` and ``<side_info>``.
    """

    n_val: int = 32
    minibatch_size: int = 3
    use_merge: bool = False
    max_merge_invocations: int = 5
    skip_perfect_score: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 200
    reflection_prompt: str = REFLECTION_PROMPT

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise ValueError(problem)

    def _problem(self) -> str:
        if self.n_val < 0:
            return f"n_val must be >= 0 (0: all of dev), got {self.n_val}"
        for name in ("minibatch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                return f"{name} must be >= 1, got {getattr(self, name)}"
        if self.max_merge_invocations < 0:
            return f"max_merge_invocations must be >= 0, got {self.max_merge_invocations}"
        if not self.temperature >= 0:
            return f"temperature must be >= 0, got {self.temperature}"
        missing = [p for p in PLACEHOLDERS if p not in self.reflection_prompt]
        return f"reflection_prompt lacks {', '.join(missing)}" if missing else ""

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> GEPAState:
        if not task.train:
            raise ValueError(f"GEPA reflects on training minibatches; task {task.name!r} has no training examples")
        return GEPAState()

    def step(self, state: GEPAState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        val = fixed_dev(task, self.n_val)
        if not state.pool:
            return self._seed(state, task, val, scorer)
        if self.use_merge and state.merges_due > 0 and state.found_new:
            merged = self._merge(state, task, val, scorer, rng)
            if merged is not None:
                return merged
        return self._mutate(replace(state, found_new=False), task, val, scorer, proposer, rng)

    # ------------------------------------------------------------------ the three kinds of step

    def _seed(self, state: GEPAState, task: Task, val, scorer: LM):
        (run,) = run_many(task, [task.instruction], val, scorer)
        seed = Candidate(task.instruction, (), tuple(run.scores), float(task.score(run.predictions, val)))
        new = replace(state, pool=(seed,), rollouts=state.rollouts + len(val))
        return new, Report(self._metrics(new), (record(seed, val, "seed", ""),))

    def _mutate(self, state: GEPAState, task: Task, val, scorer: LM, proposer: LM, rng: np.random.Generator):
        parent_idx = select_parent(state.pool, rng)
        parent = state.pool[parent_idx]
        ids, order, epoch = next_minibatch(state.order, state.epoch, state.iteration, self.minibatch_size,
                                           len(task.train), rng)
        batch = [task.train[i] for i in ids]
        (before,) = run_many(task, [parent.text], batch, scorer)
        state = replace(state, iteration=state.iteration + 1, order=order, epoch=epoch,
                        rollouts=state.rollouts + len(batch))
        extra = {"parent": float(parent_idx), "minibatch_parent": float(sum(before.scores))}
        if self.skip_perfect_score and all(s >= PERFECT for s in before.scores):
            new = replace(state, skipped=state.skipped + 1)
            return new, Report(self._metrics(new, extra))
        child = self._reflect(parent.text, before, proposer, rng)
        state = replace(state, proposed=state.proposed + 1)
        if not child or child == parent.text:  # nothing new: it could not score better on the same examples
            new = replace(state, unusable=state.unusable + 1)
            return new, Report(self._metrics(new, extra))
        (after,) = run_many(task, [child], batch, scorer)
        state = replace(state, rollouts=state.rollouts + len(batch))
        extra["minibatch_child"] = float(sum(after.scores))
        if not sum(after.scores) > sum(before.scores):  # the reference's strict improvement on the minibatch
            new = replace(state, rejected=state.rejected + 1)
            return new, Report(self._metrics(new, extra))
        return self._accept(state, child, parent_idx, task, val, scorer, extra)

    def _accept(self, state: GEPAState, child: str, parent_idx: int, task: Task, val, scorer: LM, extra):
        """A child that won on its minibatch: scored on the validation examples, added, a merge scheduled."""
        new, cand = self._admit(state, child, (parent_idx,), task, val, scorer)
        due = state.merges_due + int(self.use_merge and state.merges_accepted < self.max_merge_invocations)
        new = replace(new, accepted=state.accepted + 1, found_new=True, merges_due=due)
        parent = state.pool[parent_idx].text
        return new, Report(self._metrics(new, extra), (record(cand, val, "child", parent),))

    def _merge(self, state: GEPAState, task: Task, val, scorer: LM, rng: np.random.Generator):
        """One merge attempt; ``None`` when no pair can be merged (the iteration mutates instead)."""
        if len(val) < MERGE_VAL_FLOOR:
            return None
        found = find_merge(state.pool, state.merge_triplets, state.merge_descs, rng)
        if found is None:
            return None
        text, i, j, ancestor, desc = found
        state = replace(
            state, iteration=state.iteration + 1, found_new=False, merges_tried=state.merges_tried + 1,
            merge_triplets=state.merge_triplets + ((i, j, ancestor),), merge_descs=state.merge_descs + ((i, j, desc),),
        )
        picked = merge_subsample(state.pool[i].scores, state.pool[j].scores, MERGE_SUBSAMPLE, rng)
        (sub,) = run_many(task, [text], [val[k] for k in picked], scorer)
        state = replace(state, rollouts=state.rollouts + len(picked))
        parent_sums = [sum(state.pool[p].scores[k] for k in picked) for p in (i, j)]
        if not sum(sub.scores) >= max(parent_sums):  # the reference accepts a merge as good as the better parent
            return state, Report(self._metrics(state))
        known = dict(zip(picked, zip(sub.predictions, sub.scores)))  # its subsample runs are kept
        new, cand = self._admit(state, text, (i, j), task, val, scorer, known)
        new = replace(new, merges_due=state.merges_due - 1, merges_accepted=state.merges_accepted + 1)
        # a merge has two parents; the log names the first (the lower pool index)
        return new, Report(self._metrics(new), (record(cand, val, "merge", state.pool[i].text),))

    def _admit(self, state, text, parents, task, val, scorer, known=None):
        """Score ``text`` on the validation examples not in ``known`` (one call) and add it to the pool."""
        known = known or {}
        rest = [k for k in range(len(val)) if k not in known]
        (run,) = run_many(task, [text], [val[k] for k in rest], scorer)
        both = {**known, **dict(zip(rest, zip(run.predictions, run.scores)))}
        preds = [both[k][0] for k in range(len(val))]
        scores = tuple(float(both[k][1]) for k in range(len(val)))
        cand = Candidate(text, parents, scores, float(task.score(preds, val)))
        return replace(state, pool=state.pool + (cand,), rollouts=state.rollouts + len(rest)), cand

    def _reflect(self, instruction: str, run: Run, proposer: LM, rng: np.random.Generator) -> str:
        """The child instruction: one generate call with the reflection meta-prompt."""
        context = reflection_prompt(self.reflection_prompt, instruction, run.traces)
        (row,) = proposer.generate([context], max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                   seed=int(rng.integers(2**31)))
        return extract_instruction(row[0])

    def _metrics(self, state: GEPAState, extra: dict[str, float] | None = None) -> dict[str, float]:
        fronts = example_fronts([c.scores for c in state.pool])
        return {
            "dev_score": max(c.score for c in state.pool),
            "pool_size": float(len(state.pool)),
            "pareto_front_size": float(len(set().union(*fronts))),
            "pareto_selectable": float(len(set().union(*undominated(fronts, [c.score for c in state.pool])))),
            "proposed": float(state.proposed),
            "accepted": float(state.accepted),
            "rejected": float(state.rejected),
            "unusable": float(state.unusable),
            "skipped": float(state.skipped),
            "merges_tried": float(state.merges_tried),
            "merges_accepted": float(state.merges_accepted),
            "rollouts": float(state.rollouts),
            # this step's mutation: the parent's index and both minibatch sums (nan: not this step)
            "parent": math.nan, "minibatch_parent": math.nan, "minibatch_child": math.nan,
            **(extra or {}),
        }

    def best(self, state: GEPAState) -> TextPrompt:
        if not state.pool:
            raise ValueError("GEPA has scored nothing yet; run at least one step")
        return TextPrompt(state.pool[best_index(state.pool)].text)

    def snapshot(self, state: GEPAState) -> Snapshot:
        return Snapshot(population=ranked((c.text, c.score) for c in state.pool))

    def done(self, state: GEPAState) -> bool:
        # GEPA runs until its budget is spent: the pipeline's example budget or step cap ends it.
        return False


# ---------------------------------------------------------------------------- running and traces


def record(cand: Candidate, val: Sequence, kind: str, parent: str) -> Evaluated:
    """The log row of a candidate admitted to the pool, with its per-example scores on the validation
    examples (already kept for Pareto selection: no new call)."""
    keys = tuple(example_key(ex) for ex in val)
    return Evaluated(cand.text, cand.score, len(val), kind, parent, keys, cand.scores)


def run_many(task, texts: Sequence[str], examples: Sequence, scorer: LM) -> list[Run]:
    """Each instruction run on ``examples``, all in one scorer call, with per-example scores and traces."""
    if not examples:
        return [Run([], [], []) for _ in texts]
    if is_generative(task):
        rows = evaluate.predict_many(task, [TextPrompt(t) for t in texts], examples, scorer)
        return [_gen_run(task, row, examples) for row in rows]
    return _label_runs(task, texts, examples, scorer)


def _gen_run(task, outputs: Sequence[str], examples: Sequence) -> Run:
    scores = [float(task.example_score(o, ex)) for o, ex in zip(outputs, examples)]
    traces = [trace(ex, task.shown(o, ex), gen_feedback(task, ex, s)) for o, ex, s in zip(outputs, examples, scores)]
    return Run(list(outputs), scores, traces)


def _label_runs(task: Task, texts: Sequence[str], examples: Sequence, scorer: LM) -> list[Run]:
    """Label predictions as :mod:`methods.evaluate` makes them (content-free inputs in the same call
    when the task is calibrated), plus each example's label probabilities for the traces."""
    free = task.content_free_examples() if evaluate.calibrated(task) else ()
    requests = [r for t in texts for r in evaluate.requests_for(task, TextPrompt(t), tuple(examples) + free)]
    loglik = scorer.loglikelihood(requests)
    per, n_ex = len(requests) // len(texts), sum(len(task.choices(ex)) for ex in examples)
    runs = []
    for j in range(len(texts)):
        block = loglik[j * per : (j + 1) * per]
        prior = evaluate.content_free_log_prior(task, block[n_ex:]) if free else None
        preds = evaluate.predictions(task, examples, block[:n_ex], prior)
        probs = evaluate.label_probabilities(task, examples, block[:n_ex], prior)
        scores = [float(task.is_correct(p, ex)) for p, ex in zip(preds, examples)]
        traces = [trace(ex, task.shown(p, ex), label_feedback(task, ex, s, pr))
                  for p, ex, s, pr in zip(preds, examples, scores, probs)]
        runs.append(Run([int(p) for p in preds], scores, traces))
    return runs


def trace(example, shown: str, feedback: str) -> dict[str, str]:
    """One reflective-dataset record, with the keys of the reference's default adapter."""
    return {"Inputs": "\n".join(input_texts([example])), "Generated Outputs": shown, "Feedback": feedback}


def label_feedback(task: Task, example, score: float, probs: np.ndarray) -> str:
    words = ", ".join(f"{c.strip()} {p:.2f}" for c, p in zip(task.choices(example), probs))
    verdict = "correct" if score >= PERFECT else "incorrect"
    return (f"The generated response is {verdict}. The correct answer is '{task.answer_text(example)}'. "
            f"Probabilities the model gave the answers: {words}.")


def gen_feedback(task, example, score: float) -> str:
    verdict = "correct" if score >= PERFECT else "incorrect"
    text = f"The generated response is {verdict}. The correct answer is '{task.answer_text(example)}'."
    if 0 < score < PERFECT:  # partial credit (token F1): say how much
        text += f" It scored {score:.2f} of 1."
    others = example.answers[1:]
    if others:
        text += " Also accepted: " + ", ".join(f"'{a}'" for a in others) + "."
    return text


def reflection_prompt(template: str, instruction: str, traces: Sequence[dict[str, str]]) -> str:
    """The meta-prompt: the instruction and the examples as markdown, as the reference renders them."""
    side = "\n\n".join(
        (f"# Example {k}\n" + "".join(f"## {key}\n{value.strip()}\n\n" for key, value in t.items())).rstrip()
        for k, t in enumerate(traces, 1)
    )
    return template.replace("<curr_param>", instruction).replace("<side_info>", side)


def extract_instruction(output: str) -> str:
    """The new instruction in a proposer's output: inside its outermost ``` block (a language tag
    after the fence dropped); an unclosed or missing block gives the text without its fence."""
    start, end = output.find("```") + 3, output.rfind("```")
    if start - 3 < 0 or start >= end:
        stripped = output.strip()
        if stripped.startswith("```"):
            return re.sub(r"^```\S*\n?", "", stripped).strip()
        return stripped.removesuffix("```").strip()
    inner = output[start:end]
    return re.sub(r"^\S*\n", "", inner, count=1).strip()


# ---------------------------------------------------------------------------- Pareto selection


def example_fronts(scores: Sequence[Sequence[float]]) -> list[frozenset[int]]:
    """Per validation example, the candidates with the best score on it (ties included)."""
    if not scores:
        return []
    matrix = np.asarray(scores, dtype=np.float64)
    return [frozenset(np.flatnonzero(col == col.max()).tolist()) for col in matrix.T]


def undominated(fronts: Sequence[frozenset[int]], aggregate: Sequence[float]) -> list[frozenset[int]]:
    """The fronts without dominated candidates (the reference's ``remove_dominated_programs``).

    Candidates are visited lowest aggregate first (lower index first on a tie); the first one whose
    every front also holds another candidate not yet removed is removed, and the scan restarts,
    until none is. Every front keeps at least one candidate.
    """
    members = sorted(set().union(*fronts), key=lambda i: (aggregate[i], i)) if fronts else []
    removed: set[int] = set()
    changed = True
    while changed:
        changed = False
        for y in members:
            if y in removed:
                continue
            others = set(members) - removed - {y}
            if all(f & others for f in fronts if y in f):
                removed.add(y)
                changed = True
                break
    return [f - removed for f in fronts]


def select_parent(pool: Sequence[Candidate], rng: np.random.Generator) -> int:
    """A pool index drawn with probability proportional to how many undominated fronts it is on."""
    fronts = undominated(example_fronts([c.scores for c in pool]), [c.score for c in pool])
    counts: dict[int, int] = {}
    for front in fronts:
        for i in front:
            counts[i] = counts.get(i, 0) + 1
    if not counts:  # no validation examples: nothing to be best on; evolve the best aggregate
        return best_index(pool)
    idx = sorted(counts)
    weights = np.array([counts[i] for i in idx], dtype=np.float64)
    return idx[int(rng.choice(len(idx), p=weights / weights.sum()))]


def best_index(pool: Sequence[Candidate]) -> int:
    """The candidate with the best aggregate (the earliest on a tie, as the reference's ``idxmax``)."""
    return max(range(len(pool)), key=lambda i: (pool[i].score, -i))


# ---------------------------------------------------------------------------- minibatches


def next_minibatch(order: tuple[int, ...], epoch: int, iteration: int, size: int, n: int,
                   rng: np.random.Generator) -> tuple[list[int], tuple[int, ...], int]:
    """Iteration ``iteration``'s training minibatch, as the reference's ``EpochShuffledBatchSampler``.

    Chunk ``iteration`` of an epoch's order; a new epoch reshuffles. Returns the indices and the
    (possibly new) order and epoch to keep.
    """
    base = iteration * size
    current = base // len(order) if order else 0
    if not order or current > epoch:
        order, epoch = epoch_order(n, size, rng), current
    start = base % len(order)
    return list(order[start : start + size]), order, epoch


def epoch_order(n: int, size: int, rng: np.random.Generator) -> tuple[int, ...]:
    """``range(n)`` shuffled, padded to a multiple of ``size`` with its least used indices (the
    latest-shuffled first on a tie), so every chunk is a full minibatch."""
    order = [int(i) for i in rng.permutation(n)]
    counts = dict.fromkeys(order, 1)
    for _ in range(-n % size):
        low = min(counts.values())
        pick = [i for i in order if counts[i] == low][-1]
        order.append(pick)
        counts[pick] += 1
    return tuple(order)


# ---------------------------------------------------------------------------- merge


def ancestors(pool: Sequence[Candidate], i: int) -> set[int]:
    """Every pool index ``i`` descends from."""
    found: set[int] = set()
    todo = list(pool[i].parents)
    while todo:
        p = todo.pop()
        if p not in found:
            found.add(p)
            todo.extend(pool[p].parents)
    return found


def find_merge(pool: Sequence[Candidate], tried: Sequence[tuple[int, int, int]],
               built: Sequence[tuple[int, int, tuple[int, ...]]], rng: np.random.Generator, attempts: int = 10):
    """A merge to try, as the reference's ``sample_and_attempt_merge_programs_by_common_predictors``:
    ``(text, i, j, ancestor, sources)``, or ``None`` when its attempts find none.

    Two undominated candidates ``i < j`` are drawn, neither an ancestor of the other; their common
    ancestors not tried with them before, no better than either, and with a component one of them
    kept as the ancestor had it while the two differ there, are candidates; one is drawn in
    proportion to its aggregate. With one instruction that component is the instruction, and the
    merge is the other candidate's text (see the module docstring).
    """
    agg = [c.score for c in pool]
    fronts = undominated(example_fronts([c.scores for c in pool]), agg)
    choices = sorted(set().union(*fronts)) if fronts else []
    if len(choices) < 2 or len(pool) < 3:
        return None
    for _ in range(attempts):
        triplet = _common_ancestor_pair(pool, choices, tried, agg, rng, attempts)
        if triplet is None:
            continue
        i, j, a = triplet
        # the reference's first case: the ancestor's text survives in one of them, take the other's
        source = j if pool[a].text == pool[i].text else i
        desc = (source,)
        if (i, j, desc) in built:
            continue
        return pool[source].text, i, j, a, desc
    return None


def _common_ancestor_pair(pool, choices, tried, agg, rng, attempts):
    for _ in range(attempts):
        i, j = sorted(int(choices[k]) for k in rng.choice(len(choices), size=2, replace=False))
        up_i, up_j = ancestors(pool, i), ancestors(pool, j)
        if j in up_i or i in up_j:
            continue
        common = [
            a for a in sorted(up_i & up_j)
            if (i, j, a) not in tried and agg[a] <= agg[i] and agg[a] <= agg[j]
            and pool[a].text in (pool[i].text, pool[j].text) and pool[i].text != pool[j].text
        ]
        if common:
            weights = np.array([max(agg[a], 0.0) for a in common], dtype=np.float64)
            p = weights / weights.sum() if weights.sum() > 0 else None
            return i, j, common[int(rng.choice(len(common), p=p))]
    return None


def merge_subsample(scores_i: Sequence[float], scores_j: Sequence[float], k: int,
                    rng: np.random.Generator) -> list[int]:
    """``k`` validation indices to judge a merge on: up to ``ceil(k / 3)`` where the first parent is
    better, as many where the second is, as many ties, then any others, each group drawn at random."""
    ids = range(len(scores_i))
    groups = ([x for x in ids if scores_i[x] > scores_j[x]], [x for x in ids if scores_j[x] > scores_i[x]],
              [x for x in ids if scores_i[x] == scores_j[x]])
    each, picked = max(1, math.ceil(k / 3)), []
    for group in groups:
        take = min(len(group), each, k - len(picked))
        if take > 0:
            picked += [group[x] for x in rng.choice(len(group), size=take, replace=False)]
    unused = [x for x in ids if x not in picked]
    rest = min(k - len(picked), len(unused))
    if rest > 0:
        picked += [unused[x] for x in rng.choice(len(unused), size=rest, replace=False)]
    return [int(x) for x in picked]
