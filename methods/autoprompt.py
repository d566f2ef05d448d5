"""AutoPrompt (Shin et al. 2020): gradient-guided search over discrete trigger tokens.

The task's ``{instruction}`` slot holds ``n_triggers`` vocabulary tokens. Each step
accumulates the gradient of the correct label's negative log-likelihood with respect to
the trigger embeddings, picks one trigger position, and ranks every vocabulary token ``v``
by the first-order (HotFlip) estimate of the loss change, ``-grad[slot] . E[v]``. The top
``k`` candidates (each the current triggers with that one position replaced) and the
current triggers are then scored in one batched ``loglikelihood`` call on a fresh draw of
train examples, as the reference does (ucinlp/autoprompt ``create_trigger.py`` re-iterates
its shuffled train loader for the candidates); ``fresh_eval_batch=False`` scores them on the
gradient's own examples. The best candidate is kept only if it beats the current triggers.

Only ``prompt_grad``, ``loglikelihood``, ``token_embeddings``, ``tokenize`` and ``decode``
are used, so any backend of the ``LM`` protocol (causal, or masked when the backend
predicts the continuation at mask positions) can run it.

With ``search_labels=true`` the first steps are the paper's label-token search
(:mod:`methods.label_search`) under the initial triggers, as the reference runs
``label_search.py`` before ``create_trigger.py``: a linear probe on the answer state picks one
label word per class, and the trigger search and the test score use them. The backend then
needs ``answer_states`` as well.

Departures from the paper and its code, stated: the default objective is the
label NLL, where the reference ranks candidates by accuracy whenever a label map is given
(``objective=accuracy``, as in ``autoprompt_paper.yaml``; it breaks ties by the label
log-likelihood, because on a small batch many candidates tie on accuracy); dev is scored
every ``eval_every`` steps, where the reference scores it after every accepted flip; the
default sizes are CPU-sized (8 examples per gradient, one minibatch; the reference's SST-2
run accumulates 30 batches of 24).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from methods.base import Evaluated, Report, Snapshot
from methods.evaluate import predictions, requests_for, score_prompts, subsample
from methods.label_search import LabelSearch, LabelSearchState
from methods.lm import ANSWER_STATES, LM, Needs, PROMPT_GRAD, PROMPT_SLOT, Request, TOKEN_EMBEDDINGS, TokenPrompt
from tasks.core import Example, Task
from tasks.generative import is_generative

# Control tokens decode to bracketed names ("<|endoftext|>", "<s>", "[MASK]") or to nothing.
_SPECIAL = re.compile(r"^(<\|?[^<>\s]*\|?>|\[[A-Z_]+\])$")


@dataclass(frozen=True)
class AutoPromptState:
    """Current and best triggers: the whole checkpoint.

    Attributes:
        ids, text: the current trigger ids and their decoded text.
        loss: the current triggers' objective on the last step's batch (lower is better).
        best_ids, best_text, best_dev: the triggers with the highest dev score so far.
        step: steps taken.
        slot: the next trigger position to flip when cycling through positions.
        accepted: how many steps replaced a token.
        labels: the label search's state (``search_labels``), ``None`` before it starts or without it.
    """

    ids: tuple[int, ...]
    text: str
    loss: float = float("nan")
    best_ids: tuple[int, ...] = ()
    best_text: str = ""
    best_dev: float = float("-inf")
    step: int = 0
    slot: int = 0
    accepted: int = 0
    labels: LabelSearchState | None = None


@dataclass(frozen=True)
class AutoPrompt:
    """Gradient-guided discrete trigger search.

    Args:
        n_triggers: trigger tokens in the slot.
        init_token: text whose first token fills every trigger at the start (e.g. " the");
            empty means random vocabulary tokens that pass the filters.
        n_candidates: top-``k`` tokens by the HotFlip score that are scored each step.
        batch_size: train examples per gradient minibatch.
        n_grad_batches: minibatches whose gradients are averaged (and on whose union the
            candidates are scored), as the paper's ``accumulation_steps``.
        objective: "nll" (mean negative log-likelihood of the correct label) or "accuracy".
        random_slot: pick the position to flip at random (the paper's choice) instead of
            cycling through positions.
        filter_special: drop tokens that decode to control tokens or to nothing.
        filter_words: keep only lowercase alphabetic tokens that start a word (drops sub-word
            pieces, punctuation and, like the paper's filter, capitalized words).
        filter_labels: drop the tokens of the label words, so triggers cannot spell the answer.
        max_checks: ranked tokens inspected per step to find ``n_candidates`` that pass.
        eval_every: steps between dev evaluations of the current triggers.
        n_eval: dev examples (a fixed subset) per evaluation; 0 means the whole dev split.
        fresh_eval_batch: score the candidates on a fresh draw of train examples, not on the
            examples that gave the gradient (whose loss the first-order estimate already favours).
        search_labels: first choose the label words (:class:`methods.label_search.LabelSearch`).
        label_pool, label_epochs, label_lr, label_keep_original: the label search's ``n_train``,
            ``epochs``, ``lr`` and ``keep_original`` (its other settings are the reference's:
            batches of 32; and whole words only).
    """

    n_triggers: int = 4
    init_token: str = " the"
    n_candidates: int = 16
    batch_size: int = 8
    n_grad_batches: int = 1
    objective: str = "nll"
    random_slot: bool = True
    filter_special: bool = True
    filter_words: bool = False
    filter_labels: bool = True
    max_checks: int = 400
    eval_every: int = 5
    n_eval: int = 64
    fresh_eval_batch: bool = True
    search_labels: bool = False
    label_pool: int = 256
    label_epochs: int = 10
    label_lr: float = 3e-4
    label_keep_original: bool = True

    def __post_init__(self) -> None:
        if self.objective not in ("nll", "accuracy"):
            raise ValueError(f"objective must be 'nll' or 'accuracy', got {self.objective!r}")
        if min(self.n_triggers, self.n_candidates, self.batch_size, self.n_grad_batches) < 1:
            raise ValueError("n_triggers, n_candidates, batch_size and n_grad_batches must be >= 1")

    def needs(self) -> Needs:
        extra = {ANSWER_STATES} if self.search_labels else set()
        return Needs(scorer=frozenset({PROMPT_GRAD, TOKEN_EMBEDDINGS, *extra}))

    def check_task(self, task) -> None:
        """On a generative task candidates are ranked by the gold answer's NLL: accuracy would
        mean generating for every candidate of every step."""
        if is_generative(task) and self.objective == "accuracy":
            raise ValueError("objective=accuracy needs label scoring; use objective=nll on a generative task")
        if self.search_labels:
            self._label_search().check_task(task)

    def _label_search(self) -> LabelSearch:
        # All epochs in one step, then one dev score: the reference picks its words once, at the end.
        return LabelSearch(n_train=self.label_pool, epochs=self.label_epochs, epochs_per_step=self.label_epochs,
                           lr=self.label_lr, n_eval=self.n_eval, keep_original=self.label_keep_original)

    def _searching_labels(self, state: AutoPromptState) -> bool:
        return self.search_labels and (state.labels is None or not self._label_search().done(state.labels))

    def task_for(self, state: AutoPromptState, task: Task) -> Task:
        """``task`` with the label words the label search chose (``task`` itself without one)."""
        return self._label_search().task_for(state.labels, task) if state.labels is not None else task

    def _label_step(self, state: AutoPromptState, task: Task, scorer: LM, rng: np.random.Generator):
        """One step of the label search under the current (initial) triggers."""
        search = self._label_search()
        sub = state.labels or search.start(TokenPrompt(state.ids, state.text))
        sub, report = search.step(sub, task, scorer, scorer, rng)
        new = replace(state, labels=sub)
        if search.done(sub):  # the triggers' dev score with the chosen words is where the search starts
            new = replace(new, best_ids=state.ids, best_text=state.text, best_dev=sub.best_dev)
        return new, Report({**report.metrics, "label_search": 1.0}, report.evaluated)

    def init(self, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator) -> AutoPromptState:
        if self.init_token:
            ids = tuple(scorer.tokenize(self.init_token)[:1] * self.n_triggers)
            if not ids:
                raise ValueError(f"init_token {self.init_token!r} tokenizes to nothing")
        else:
            ranked = rng.permutation(scorer.token_embeddings().shape[0])
            ids = tuple(top_allowed(ranked, self.n_triggers, self._allowed(task, scorer, ()), self.max_checks))
            if len(ids) < self.n_triggers:
                raise ValueError("too few vocabulary tokens pass the filters for a random init")
        return AutoPromptState(ids=ids, text=scorer.decode(ids))

    def step(self, state: AutoPromptState, task: Task, scorer: LM, proposer: LM, rng: np.random.Generator):
        if self._searching_labels(state):
            return self._label_step(state, task, scorer, rng)
        task = self.task_for(state, task)
        batches = self._batches(task, rng)
        grad, grad_loss = self._grad(task, state.ids, batches, scorer)
        slot = int(rng.integers(self.n_triggers)) if self.random_slot else state.slot
        ranked = np.argsort(-hotflip_scores(grad[slot], scorer.token_embeddings()), kind="stable")
        allowed = self._allowed(task, scorer, (state.ids[slot],))
        cands = top_allowed(ranked, self.n_candidates, allowed, self.max_checks)
        trials = [state.ids] + [swap(state.ids, slot, c) for c in cands]
        scored_on = self._batches(task, rng) if self.fresh_eval_batch else batches
        examples = [ex for b in scored_on for ex in b]
        table = objective_table(task, [TokenPrompt(t) for t in trials], examples, scorer, self.objective)
        j = int(np.lexsort((table[:, 1], table[:, 0]))[0])
        j = j if tuple(table[j]) < tuple(table[0]) else 0
        new = replace(
            state, ids=trials[j], text=scorer.decode(trials[j]) if j else state.text,
            loss=float(table[j, 0]), step=state.step + 1, slot=(slot + 1) % self.n_triggers,
            accepted=state.accepted + (j > 0),
        )
        new, evaluated = self._maybe_eval(new, task, scorer)
        metrics = {
            "dev_score": new.best_dev, "loss": new.loss, "grad_loss": grad_loss,
            "accepted": float(j > 0), "slot": float(slot), "n_candidates": float(len(cands)),
        }
        return new, Report(metrics, evaluated)

    def _batches(self, task: Task, rng: np.random.Generator) -> list[tuple[Example, ...]]:
        """``n_grad_batches`` disjoint minibatches of train examples (fewer if train is small)."""
        drawn = subsample(task.train, self.batch_size * self.n_grad_batches, rng)
        order = rng.permutation(len(drawn))
        per = -(-len(drawn) // self.n_grad_batches)
        return [tuple(drawn[i] for i in order[s : s + per]) for s in range(0, len(drawn), per)]

    def _grad(self, task: Task, ids: tuple[int, ...], batches, scorer: LM) -> tuple[np.ndarray, float]:
        """Mean over minibatches of the label NLL's gradient wrt the trigger embeddings ``[n, d]``."""
        grads, losses = [], []
        for batch in batches:
            loss, grad = scorer.prompt_grad(label_requests(task, batch), TokenPrompt(ids))
            grads.append(np.asarray(grad, dtype=np.float64))
            losses.append(loss)
        return np.mean(grads, axis=0), float(np.mean(losses))

    def _allowed(self, task: Task, scorer: LM, extra_banned: Sequence[int]) -> Callable[[int], bool]:
        banned = set(extra_banned)
        if self.filter_labels:
            banned |= label_token_ids(task, scorer)

        def allowed(v: int) -> bool:
            if v in banned:
                return False
            text = scorer.decode([v]) if (self.filter_special or self.filter_words) else ""
            if self.filter_special and is_special(text):
                return False
            return not self.filter_words or is_word_start(v, text, scorer)

        return allowed

    def _maybe_eval(self, state: AutoPromptState, task: Task, scorer: LM):
        if state.step != 1 and state.step % max(1, self.eval_every):
            return state, ()
        # A fixed dev subset keeps scores comparable across steps.
        dev = subsample(task.dev, self.n_eval, np.random.default_rng(0))
        (score,) = score_prompts(task, [TokenPrompt(state.ids, state.text)], dev, scorer)
        record = Evaluated(f"{state.text} {list(state.ids)}", score, len(dev), "trigger")
        if score > state.best_dev:
            state = replace(state, best_ids=state.ids, best_text=state.text, best_dev=score)
        return state, (record,)

    def best(self, state: AutoPromptState) -> TokenPrompt:
        if state.best_ids:
            return TokenPrompt(state.best_ids, state.best_text)
        return TokenPrompt(state.ids, state.text)

    def snapshot(self, state: AutoPromptState) -> Snapshot:
        return Snapshot(current=TokenPrompt(state.ids, state.text))

    def done(self, state: AutoPromptState) -> bool:
        return False


def hotflip_scores(grad_row: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
    """First-order estimate of the loss *decrease* from putting each token in one position.

    Replacing the embedding ``e`` at a position by ``E[v]`` changes the loss by about
    ``(E[v] - e) . grad``; ``e . grad`` is the same for every ``v``, so ranking by
    ``-E[v] . grad`` ranks by estimated decrease.

    Args:
        grad_row: ``[d]`` gradient of the loss wrt the position's embedding.
        embeddings: ``[vocab, d]`` input embedding matrix.

    Returns:
        ``[vocab]`` scores, higher is better.
    """
    return -(np.asarray(embeddings, dtype=np.float32) @ np.asarray(grad_row, dtype=np.float32))


def top_allowed(ranked: np.ndarray, k: int, allowed: Callable[[int], bool], max_checks: int) -> list[int]:
    """The first ``k`` ids of ``ranked`` that pass ``allowed``, inspecting at most ``max_checks``.

    Filters are checked lazily on the best-ranked tokens only: decoding a whole vocabulary
    per step would cost tens of thousands of tokenizer calls (remote ones behind Ray).
    """
    out: list[int] = []
    for v in ranked[: max(max_checks, k)]:
        if allowed(int(v)):
            out.append(int(v))
            if len(out) == k:
                break
    return out


def swap(ids: tuple[int, ...], slot: int, token: int) -> tuple[int, ...]:
    """``ids`` with position ``slot`` replaced by ``token``."""
    return ids[:slot] + (token,) + ids[slot + 1 :]


def label_requests(task: Task, examples: Sequence[Example], slot: str = PROMPT_SLOT) -> list[tuple[str, str]]:
    """(context with ``slot`` as its instruction, correct continuation) per example: the label word,
    or on a generative task the gold answer (or worked solution) the data gives."""
    return [(task.render(slot, ex), task.target_text(ex)) for ex in examples]


def objective_table(
    task: Task, prompts: Sequence[TokenPrompt], examples: Sequence[Example], scorer: LM, objective: str
) -> np.ndarray:
    """Each prompt's loss on ``examples``, every prompt in one batched ``loglikelihood`` call.

    Returns:
        ``[n_prompts, 2]``: column 0 the objective to minimize (NLL, or minus accuracy),
        column 1 the mean NLL of the correct label (the tie-break).
    """
    if objective == "nll":
        reqs = label_requests(task, examples)
        ll = scorer.loglikelihood([Request(c, k, p) for p in prompts for c, k in reqs])
        nll = -np.asarray(ll, dtype=np.float64).reshape(len(prompts), len(reqs)).mean(axis=1)
        return np.stack([nll, nll], axis=1)
    ll = np.asarray(scorer.loglikelihood([r for p in prompts for r in requests_for(task, p, examples)]))
    ll = ll.reshape(len(prompts), -1)
    correct = _correct_positions(task, examples)
    rows = [(-task.score(predictions(task, examples, row), examples), -row[correct].mean()) for row in ll]
    return np.array(rows, dtype=np.float64)


def _correct_positions(task: Task, examples: Sequence[Example]) -> np.ndarray:
    """Index of each example's correct continuation in the flat order of ``requests_for``."""
    pos, i = [], 0
    for ex in examples:
        pos.append(i + ex.label)
        i += len(task.choices(ex))
    return np.array(pos, dtype=np.int64)


def label_token_ids(task: Task, scorer: LM) -> set[int]:
    """Token ids of the verbalizer's label words, with and without their leading space."""
    ids: set[int] = set()
    for word in getattr(task, "verbalizer", ()):  # a generative task has no label words to ban
        for form in {word, word.strip(), " " + word.strip()}:
            ids.update(scorer.tokenize(form) if form.strip() else [])
    return ids


def is_special(text: str) -> bool:
    """Whether a decoded token looks like a control token (or decodes to nothing)."""
    return not text.strip() or bool(_SPECIAL.match(text.strip()))


def is_word_start(token: int, text: str, scorer: LM) -> bool:
    """Lowercase alphabetic token that is how its word is spelled after a space."""
    word = text.strip()
    return word.isalpha() and word.islower() and scorer.tokenize(" " + word) == [token]
