"""APE (Zhou et al. 2022): the proposer induces instructions from demos; the scorer picks.

Step 0 proposes ``n_prompts`` candidates with APE's forward-generation template, a
completion-style meta-prompt that even small base or instruct models can continue, and
scores them all on one fixed dev subset in one batched call. Each later step is a round of
iterative APE: paraphrase the current top ``k`` and keep whatever scores best.

With ``halving_min > 0`` candidates race by successive halving instead: all are scored on
the first ``halving_min`` dev examples, the better half goes on to twice as many, and so on;
only the finalists, scored on the whole subset, can be returned or paraphrased.

``score="likelihood"`` ranks candidates as the reference's default evaluator does
(keirp/automatic_prompt_engineer ``evaluation/likelihood.py``, ``configs/default.yaml``): by
the log-probability of each dev example's gold output under the instruction, averaged over
the output's tokens and then over the examples; no generation is needed. The task metric of
every candidate is measured all the same, so the reported ``dev_score`` (the metric of the
candidate APE would return) stays comparable with the other methods. ``score="metric"``
(the default here, and the reference's ``exec_accuracy`` of its instruction-induction runs)
ranks by the metric.

With ``ucb_pulls > 0`` candidates race as in the reference's bandit evaluation
(``configs/bandits.yaml``, ``evaluation/bandits.py``): UCB1 over random dev minibatches of
``ucb_pull_size`` examples, ``ucb_per_round`` candidates per round (one scorer call each),
until ``ucb_pulls`` pulls are spent; the ``ucb_finalists`` best are then scored on the fixed
dev subset, the rest are kept with their race means as stopped early.

Departures: one proposal per demo draw where the reference samples many per draw
(``num_prompts_per_subsample``); the UCB race's finalists are re-scored on the fixed dev
subset (the reference returns the race's own estimates), so every reported score is
comparable.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report, Snapshot, ranked
from methods.evaluate import scored_prompts, subsample
from methods.lm import LM, PROPOSER_WRITES, Needs, Request, TextPrompt
from methods.racing import minibatch_pull, successive_halving, ucb_race
from methods.text import clean_with_parents, demo_block, input_texts
from tasks.core import example_key
from tasks.core import Task

FORWARD_TEMPLATE = (
    "I gave a friend an instruction and five inputs. The friend read the instruction and "
    "wrote an output for every one of the inputs. Here are the input-output pairs:\n\n"
    "{demos}\n\nThe instruction was to"
)
RESAMPLE_TEMPLATE = (
    "Generate a variation of the following instruction while keeping the semantic meaning.\n\n"
    "Input: {instruction}\n\nOutput:"
)


@dataclass(frozen=True)
class APEState:
    """Every scored candidate so far (text, dev score), the round, and proposal counts.

    ``dropped`` holds candidates a race stopped early (text, score, examples seen): never
    proposed again, never returned, since their scores come from fewer examples.
    """

    scored: tuple[tuple[str, float], ...] = ()
    dropped: tuple[tuple[str, float, int], ...] = ()
    likelihood: tuple[tuple[str, float], ...] = ()  # (text, mean gold log-prob per token), score=likelihood
    round: int = 0
    proposed: int = 0
    usable: int = 0


@dataclass(frozen=True)
class APE:
    """Automatic Prompt Engineer.

    Args:
        n_prompts: candidates asked of the proposer in the first round.
        n_demos: train demos shown per meta-prompt (each candidate sees its own draw).
        n_eval: dev examples every candidate is scored on (0 = whole dev split).
        rounds: resampling rounds after the first (0 = plain APE).
        top_k: candidates paraphrased per resampling round.
        per_top: paraphrases asked per top candidate.
        temperature: proposer sampling temperature.
        max_new_tokens: proposal length cap.
        include_manual: also score the task's baseline instruction, so APE never returns worse.
        halving_min: race candidates by successive halving from this many dev examples
            (0 = score every candidate on the whole dev subset).
        halving_eta: keep the best ``1/eta`` at each rung of the race.
        score: rank candidates by the task ``metric`` or by the gold output's ``likelihood``.
        ucb_pulls: race candidates by UCB with this many pulls (0: no race).
        ucb_pull_size: dev examples per pull.
        ucb_per_round: candidates pulled per UCB round (one scorer call each round).
        ucb_c: UCB exploration weight.
        ucb_finalists: the race's best, scored on the fixed dev subset afterwards.
    """

    n_prompts: int = 8
    n_demos: int = 5
    n_eval: int = 64
    rounds: int = 0
    top_k: int = 2
    per_top: int = 2
    temperature: float = 0.9
    max_new_tokens: int = 32
    include_manual: bool = False
    halving_min: int = 0
    halving_eta: int = 2
    score: str = "metric"
    ucb_pulls: int = 0
    ucb_pull_size: int = 8
    ucb_per_round: int = 8
    ucb_c: float = 1.0
    ucb_finalists: int = 4

    def __post_init__(self) -> None:
        if self.score not in ("metric", "likelihood"):
            raise ValueError(f"APE score must be 'metric' or 'likelihood', got {self.score!r}")
        if self.score == "likelihood" and (self.halving_min > 0 or self.ucb_pulls > 0):
            raise ValueError("APE score=likelihood ranks every candidate on all its examples; "
                             "set halving_min=0 and ucb_pulls=0")
        if self.halving_min > 0 and self.ucb_pulls > 0:
            raise ValueError("APE races by successive halving (halving_min) or by UCB (ucb_pulls), not both")
        if self.ucb_pulls > 0 and min(self.ucb_pull_size, self.ucb_per_round, self.ucb_finalists) < 1:
            raise ValueError("APE's UCB race needs ucb_pull_size, ucb_per_round and ucb_finalists >= 1")

    def needs(self) -> Needs:
        return PROPOSER_WRITES

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> APEState:
        return APEState()

    def step(self, state: APEState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if state.round == 0:
            raw, banned = self._propose(task, proposer, rng)
            raw = [(r, "") for r in raw]  # written from demos alone: no parent
            extra = [task.instruction] if self.include_manual else []
        else:
            raw, banned, extra = self._resample(state, proposer, rng), [], []
        seen = [t for t, _ in state.scored] + [t for t, _, _ in state.dropped]
        kept = clean_with_parents(raw, banned, seen) + [(e, "") for e in extra if e not in seen]
        candidates, parents = [c for c, _ in kept], dict(kept)
        scored, dropped, n_eval, outcomes = self._score(task, candidates, scorer, rng)
        if self.score == "likelihood":
            dev = subsample(task.dev, self.n_eval, np.random.default_rng(0))
            state = replace(state, likelihood=state.likelihood + tuple(
                zip(candidates, gold_likelihood(task, candidates, dev, scorer))))
        new = replace(
            state, scored=state.scored + scored, dropped=state.dropped + dropped, round=state.round + 1,
            proposed=state.proposed + len(raw), usable=state.usable + len(candidates) - len(extra),
        )
        return new, self._report(new, scored, dropped, n_eval, parents, outcomes)

    def _propose(self, task: Task, proposer: LM, rng: np.random.Generator):
        return forward_proposals(task, proposer, rng, self.n_prompts, self.n_demos, self.max_new_tokens, self.temperature)

    def _ranking(self, state: APEState) -> tuple[tuple[str, float], ...]:
        """What candidates are ranked by: their metric, or their likelihood."""
        return state.likelihood if self.score == "likelihood" else state.scored

    def _resample(self, state: APEState, proposer: LM, rng: np.random.Generator) -> list[tuple[str, str]]:
        """Paraphrases of the current top ``k``, each as ``(raw, the candidate it varies)``."""
        top = [t for t, _ in sorted(self._ranking(state), key=lambda s: -s[1])[: self.top_k]]
        contexts = [RESAMPLE_TEMPLATE.format(instruction=t) for t in top]
        outs = proposer.generate(
            contexts, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
            n=self.per_top, seed=int(rng.integers(2**31)), stop=("\n\n",),
        )
        return [(s, t) for t, row in zip(top, outs) for s in row]

    def _score(self, task: Task, candidates: list[str], scorer: LM, rng: np.random.Generator):
        """``((text, score) on the whole dev subset, (text, score, n) stopped early, its size,
        {text: its examples and per-example outcomes} for those whose outcomes are known)``."""
        # A fixed dev subset (not redrawn per round) keeps scores comparable across rounds.
        dev = subsample(task.dev, self.n_eval, np.random.default_rng(0))
        if self.ucb_pulls > 0 and len(candidates) > self.ucb_finalists:
            return self._ucb(task, candidates, dev, scorer, rng)
        if self.halving_min <= 0 or not candidates:
            results = scored_prompts(task, [TextPrompt(c) for c in candidates], dev, scorer)
            scored = tuple((c, s) for c, (s, _) in zip(candidates, results))
            return scored, (), len(dev), {c: seen for c, (_, seen) in zip(candidates, results)}
        race = successive_halving(task, candidates, dev, scorer, self.halving_min, self.halving_eta)
        full = set(race.finalists())
        scored = tuple((c, race.scores[i]) for i, c in enumerate(candidates) if i in full)
        dropped = tuple((c, race.scores[i], race.seen[i]) for i, c in enumerate(candidates) if i not in full)
        # every arm ran on a prefix of the subset, so even a dropped one has its outcomes there
        keys = tuple(example_key(ex) for ex in dev)
        outcomes = {c: {"examples": keys[: race.seen[i]], "outcomes": race.outcomes[i]}
                    for i, c in enumerate(candidates)}
        return scored, dropped, len(dev), outcomes

    def _ucb(self, task: Task, candidates: list[str], dev, scorer: LM, rng: np.random.Generator):
        """The UCB race on random dev minibatches, then its finalists on the fixed dev subset."""
        pull = minibatch_pull(task, candidates, self.ucb_pull_size, rng, scorer)
        race = ucb_race(len(candidates), pull, self.ucb_pulls, self.ucb_per_round, rng, self.ucb_c)
        top = race.top(self.ucb_finalists)
        results = scored_prompts(task, [TextPrompt(candidates[i]) for i in top], dev, scorer)
        scored = tuple((candidates[i], s) for i, (s, _) in zip(top, results))
        dropped = tuple((c, race.means[i], race.counts[i] * self.ucb_pull_size)
                        for i, c in enumerate(candidates) if i not in set(top))
        # the race's minibatches are not kept: only the finalists' outcomes are known
        return scored, dropped, len(dev), {candidates[i]: seen for i, (_, seen) in zip(top, results)}

    def _report(self, state: APEState, scored, dropped, n: int, parents, outcomes) -> Report:
        chosen = self.best(state).text if state.scored else None
        metrics = {
            # the metric of the candidate APE would return (the best one, when ranked by metric)
            "dev_score": dict(state.scored).get(chosen, 0.0),
            "proposed": float(state.proposed),
            "usable": float(state.usable),
            "round": float(state.round),
        }
        records = [Evaluated(t, s, n, "candidate", parents.get(t, ""), **outcomes.get(t, {})) for t, s in scored]
        records += [Evaluated(t, s, n, "dropped", parents.get(t, ""), **outcomes.get(t, {})) for t, s, n in dropped]
        return Report(metrics, tuple(records))

    def best(self, state: APEState) -> TextPrompt:
        if not state.scored:
            raise ValueError("APE has scored no candidate yet; run at least one step")
        return TextPrompt(max(self._ranking(state), key=lambda s: s[1])[0])

    def snapshot(self, state: APEState) -> Snapshot:
        return Snapshot(population=ranked(self._ranking(state)))

    def planned_steps(self) -> int:
        return self.rounds + 1

    def done(self, state: APEState) -> bool:
        return state.round > self.rounds


def forward_proposals(task: Task, proposer: LM, rng: np.random.Generator, n: int, n_demos: int,
                      max_new_tokens: int, temperature: float) -> tuple[list[str], list[str]]:
    """``n`` instructions induced with APE's forward template, each from its own draw of
    ``n_demos`` train demos, in one generate call; and the demos' inputs (proposals must not copy them)."""
    demo_sets = [subsample(task.train, n_demos, rng) for _ in range(n)]
    if not demo_sets:
        return [], []
    contexts = [FORWARD_TEMPLATE.format(demos=demo_block(task, d)) for d in demo_sets]
    outs = proposer.generate(
        contexts, max_new_tokens=max_new_tokens, temperature=temperature,
        seed=int(rng.integers(2**31)), stop=("\n\n", "Input:"),
    )
    return [o[0] for o in outs], input_texts([ex for d in demo_sets for ex in d])


def gold_likelihood(task: Task, instructions: list[str], examples, scorer: LM) -> list[float]:
    """Each instruction's mean over ``examples`` of the gold output's log-probability per token
    (APE's likelihood evaluator), every request in one ``loglikelihood`` call."""
    if not instructions:
        return []
    golds = [task.target_text(ex) for ex in examples]
    lengths = {g: max(1, len(scorer.tokenize(g))) for g in set(golds)}
    requests = [Request(task.render(i, ex), g) for i in instructions for ex, g in zip(examples, golds)]
    ll = np.asarray(scorer.loglikelihood(requests), dtype=np.float64).reshape(len(instructions), len(examples))
    per_token = ll / np.asarray([lengths[g] for g in golds], dtype=np.float64)
    return [float(v) for v in per_token.mean(axis=1)]
