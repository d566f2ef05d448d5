"""AutoPrompt against a small differentiable fake LM with true gradients.

``GradLM`` implements the ``LM`` protocol exactly (spliced token or soft prompts, per-request
prompt lists, ``prompt_grad`` by autograd), so the tests check that the method consumes
gradients and scores correctly; backend gradients are tested with the backend.
"""

from __future__ import annotations

import pickle
import re

import numpy as np
import pytest
import torch

from methods.autoprompt import AutoPrompt, hotflip_scores, objective_table, swap, top_allowed
from methods.evaluate import score_prompts
from methods.lm import PROMPT_SLOT, Request, SoftPrompt, TokenPrompt
from tests.fakes import planted_task, run_steps

WORDS = (
    "the", "yes", "no", "a", "an", "one", "film", "movie", "great", "bad", "good", "plot",
    "story", "very", "not", "really", "fine", "dull", "fun", "sad", "happy", "dark", "<s>",
    "##ing", "!!", "Paris", "we", "it", "so", "too", "odd", "new", "old", "big", "red", "cat",
)


class GradLM:
    """A bilinear "LM": the prompt gates the context features that predict the next word.

    ``h = c * (1 + sum_i A_i p_i)`` where ``c`` is the mean embedding of the context words and
    ``p_i`` the spliced prompt vectors; next-word log-probs are ``log_softmax(W h)``. The
    prompt can therefore raise or lower accuracy, and a good one exists to be found.
    """

    def __init__(self, d: int = 8, seed: int = 0, max_prompt: int = 24) -> None:
        g = torch.Generator().manual_seed(seed)
        v = len(WORDS)
        self.E = torch.randn(v, d, generator=g, dtype=torch.float64)
        self.A = torch.randn(max_prompt, d, d, generator=g, dtype=torch.float64) / d**0.5
        self.W = torch.randn(v, d, generator=g, dtype=torch.float64) * 2
        self.ll_calls, self.grad_calls, self.emb_calls = 0, 0, 0
        self.last_prompts: list = []
        self.last_requests: list = []
        self.last_grad: np.ndarray | None = None

    def _vectors(self, prompt) -> torch.Tensor:
        if isinstance(prompt, TokenPrompt):
            return self.E[list(prompt.ids)]
        return torch.as_tensor(np.asarray(prompt.embeddings), dtype=torch.float64)

    def _logp(self, context: str, continuation: str, p: torch.Tensor | None) -> torch.Tensor:
        assert (p is not None) == (PROMPT_SLOT in context), "prompt given iff the context has the slot"
        c = self.E[self.tokenize(context.replace(PROMPT_SLOT, " "))].mean(0)
        gate = 1 + (torch.einsum("nij,nj->i", self.A[: len(p)], p) if p is not None else 0)
        logp = torch.log_softmax(self.W @ (c * gate), dim=0)
        return logp[self.tokenize(continuation)].sum()

    def loglikelihood(self, requests) -> np.ndarray:
        self.ll_calls += 1
        self.last_prompts, self.last_requests = [r.prompt for r in requests], list(requests)
        with torch.no_grad():
            out = [float(self._logp(c, k, None if p is None else self._vectors(p))) for c, k, p in requests]
        return np.array(out, dtype=np.float64)

    def prompt_grad(self, requests, prompt):
        self.grad_calls += 1
        p = self._vectors(prompt).clone().requires_grad_(True)
        loss = -torch.stack([self._logp(c, k, p) for c, k in requests]).mean()
        loss.backward()
        self.last_grad = p.grad.numpy().astype(np.float32)
        return float(loss.detach()), self.last_grad

    def token_embeddings(self) -> np.ndarray:
        self.emb_calls += 1
        return self.E.numpy().astype(np.float32)

    def tokenize(self, text: str) -> list[int]:
        return [WORDS.index(w) for w in re.findall(r"\S+", text) if w in WORDS]

    def decode(self, ids) -> str:
        return "".join(" " + WORDS[i] for i in ids)

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        raise NotImplementedError("gradient methods never generate")


run = run_steps


def train_nll(task, lm, ids) -> float:
    return float(objective_table(task, [TokenPrompt(ids)], task.train, lm, "nll")[0, 0])


def test_autoprompt_lowers_the_loss_and_keeps_its_best_dev_triggers():
    task, lm = planted_task(n_train=40, n_dev=40), GradLM()
    method = AutoPrompt(n_triggers=3, n_candidates=8, batch_size=16, eval_every=2, n_eval=0)
    state, reports = run(method, task, lm, steps=12)
    start = (WORDS.index("the"),) * 3
    assert state.accepted > 0
    assert train_nll(task, lm, state.ids) < 0.5 * train_nll(task, lm, start)
    assert state.best_dev > score_prompts(task, [TokenPrompt(start)], task.dev, lm)[0]
    assert reports[-1].metrics["dev_score"] == max(r.score for rep in reports for r in rep.evaluated)
    best = method.best(state)
    assert best.ids == state.best_ids and best.text == lm.decode(best.ids)
    (score,) = score_prompts(task, [best], task.dev, lm)
    assert score == pytest.approx(state.best_dev)


def test_hotflip_ranks_by_minus_grad_dot_embedding():
    emb = np.array([[1, 0], [0, 1], [-1, 0], [0, -1], [2, 2]], dtype=np.float32)
    grad = np.array([1.0, 0.5])
    scores = hotflip_scores(grad, emb)
    np.testing.assert_allclose(scores, [-1, -0.5, 1, 0.5, -3])
    ranked = np.argsort(-scores, kind="stable")
    assert top_allowed(ranked, 2, lambda v: True, 10) == [2, 3]
    assert top_allowed(ranked, 2, lambda v: v != 3, 10) == [2, 1]
    assert top_allowed(ranked, 2, lambda v: v != 3, 0) == [2]  # inspects max(max_checks, k)


def test_step_scores_the_top_k_candidates_in_one_call():
    task, lm = planted_task(), GradLM()
    method = AutoPrompt(n_triggers=3, n_candidates=5, batch_size=8, random_slot=False, eval_every=100)
    rng = np.random.default_rng(1)
    state = method.init(task, lm, lm, rng)
    state, _ = method.step(state, task, lm, lm, rng)  # step 1 also evaluates on dev
    lm.ll_calls = lm.grad_calls = 0
    before = state
    state, report = method.step(state, task, lm, lm, rng)
    assert lm.ll_calls == 1 and lm.grad_calls == 1 and report.evaluated == ()
    slot = before.slot
    scores = hotflip_scores(lm.last_grad[slot], lm.token_embeddings())
    allowed = method._allowed(task, lm, (before.ids[slot],))
    expected = top_allowed(np.argsort(-scores, kind="stable"), 5, allowed, 400)
    sent = list(dict.fromkeys(p.ids for p in lm.last_prompts))
    assert sent == [before.ids] + [swap(before.ids, slot, c) for c in expected]
    assert len(lm.last_prompts) == 6 * 8


def test_candidate_kept_only_if_it_beats_the_current_triggers():
    task, lm = planted_task(), GradLM()
    method = AutoPrompt(n_triggers=2, n_candidates=6, batch_size=8, eval_every=100)
    rng = np.random.default_rng(0)
    state, _ = method.step(method.init(task, lm, lm, rng), task, lm, lm, rng)
    kept = 0
    for _ in range(6):
        new, report = method.step(state, task, lm, lm, rng)
        reqs, prompts = lm.last_requests, lm.last_prompts
        nll = -lm.loglikelihood(reqs).reshape(7, -1).mean(axis=1)
        trials = [p.ids for p in prompts[:: len(reqs) // 7]]
        assert trials[0] == state.ids
        winner = trials[int(np.argmin(nll))] if nll.min() < nll[0] else state.ids
        assert new.ids == winner and new.loss == pytest.approx(nll.min())
        assert report.metrics["accepted"] == float(new.ids != state.ids)
        kept += new.ids == state.ids
        state = new
    assert 0 < kept < 6


def test_accuracy_objective_matches_the_task_metric():
    task, lm = planted_task(), GradLM()
    prompts = [TokenPrompt((0, 5)), TokenPrompt((7, 9))]
    table = objective_table(task, prompts, task.dev[:20], lm, "accuracy")
    expected = score_prompts(task, prompts, task.dev[:20], lm)
    np.testing.assert_allclose(-table[:, 0], expected)
    nll = objective_table(task, prompts, task.dev[:20], lm, "nll")
    np.testing.assert_allclose(table[:, 1], nll[:, 0])
    state, _ = run(AutoPrompt(n_triggers=2, objective="accuracy", eval_every=100), task, lm, 3)
    assert -1.0 <= state.loss <= 0.0


def test_filters_drop_special_subword_capitalized_and_label_tokens():
    task, lm = planted_task(), GradLM()
    ids = {w: WORDS.index(w) for w in WORDS}
    strict = AutoPrompt(filter_words=True)._allowed(task, lm, (ids["film"],))
    assert [w for w in WORDS if not strict(ids[w])] == ["yes", "no", "film", "<s>", "##ing", "!!", "Paris"]
    loose = AutoPrompt(filter_labels=False)._allowed(task, lm, ())
    assert [w for w in WORDS if not loose(ids[w])] == ["<s>"]
    none = AutoPrompt(filter_special=False, filter_labels=False)._allowed(task, lm, ())
    assert all(none(i) for i in ids.values())


def test_random_init_draws_allowed_tokens():
    task, lm = planted_task(), GradLM()
    method = AutoPrompt(n_triggers=5, init_token="", filter_words=True)
    state = method.init(task, lm, lm, np.random.default_rng(3))
    allowed = method._allowed(task, lm, ())
    assert len(set(state.ids)) == 5 and all(allowed(i) for i in state.ids)
    assert state.text == lm.decode(state.ids)


def test_state_pickles_and_resume_is_identical():
    task = planted_task()
    method = AutoPrompt(n_triggers=3, n_candidates=6, batch_size=8, eval_every=2)
    full, _ = run(method, task, GradLM(), steps=5, seed=7)
    lm, rng = GradLM(), np.random.default_rng(7)
    state = method.init(task, lm, lm, rng)
    for _ in range(2):
        state, _ = method.step(state, task, lm, lm, rng)
    state, rng = pickle.loads(pickle.dumps((state, rng)))
    for _ in range(3):
        state, _ = method.step(state, task, lm, lm, rng)
    assert state == full
    assert len(pickle.dumps(state)) < 2000


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="objective"):
        AutoPrompt(objective="f1")
    with pytest.raises(ValueError):
        AutoPrompt(n_triggers=0)


def test_soft_prompts_reach_the_fake_too():
    lm = GradLM()
    soft = SoftPrompt(lm.token_embeddings()[[0, 3]])
    tok = TokenPrompt((0, 3))
    reqs = [(f"{PROMPT_SLOT} case is yes", " yes")]
    assert lm.loglikelihood(Request.batch(reqs, soft))[0] == pytest.approx(lm.loglikelihood(Request.batch(reqs, tok))[0])


def test_autoprompt_lowers_the_label_loss_of_a_tiny_random_llama():
    from tests.tiny import tiny_backend

    task, lm = planted_task(n_train=32, n_dev=16), tiny_backend()
    method = AutoPrompt(n_triggers=3, n_candidates=8, batch_size=8, eval_every=4, n_eval=16)
    state, reports = run(method, task, lm, steps=8)
    start = (lm.tokenize(" the")[0],) * 3
    pair = [TokenPrompt(start), TokenPrompt(state.ids)]
    before, after = objective_table(task, pair, task.train, lm, "nll")[:, 0]
    assert state.accepted > 0 and after < before
    assert state.text == lm.decode(state.ids) and len(reports[-1].evaluated) == 1


def test_autoprompt_yaml_instantiates_with_every_key_a_constructor_argument():
    from pathlib import Path

    import hydra.utils
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / "conf/method/autoprompt.yaml"
    assert path.read_text().startswith("# python -m pipelines.run method=autoprompt")
    method = hydra.utils.instantiate(OmegaConf.load(path), _convert_="all")
    assert isinstance(method, AutoPrompt) and method.init_token == " the"


class GradRecorder(GradLM):
    def prompt_grad(self, requests, prompt):
        self.grad_contexts = {r[0] for r in requests}
        return super().prompt_grad(requests, prompt)


def test_candidates_are_scored_on_a_fresh_draw_not_on_the_gradients_examples():
    """Fails on the old behaviour (candidates re-scored on the very examples that gave the
    gradient, whose loss the first-order estimate already favours): the reference draws anew."""
    task, lm = planted_task(n_train=200), GradRecorder()
    rng = np.random.default_rng(0)
    method = AutoPrompt(n_triggers=2, n_candidates=3, batch_size=8, eval_every=100)
    state, _ = method.step(method.init(task, lm, lm, rng), task, lm, lm, rng)
    method.step(state, task, lm, lm, rng)
    scored = {r[0] for r in lm.last_requests}
    assert len(scored) == 8 and scored != lm.grad_contexts
    same = AutoPrompt(n_triggers=2, n_candidates=3, batch_size=8, eval_every=100, fresh_eval_batch=False)
    state, _ = same.step(same.init(task, lm, lm, rng), task, lm, lm, rng)
    same.step(state, task, lm, lm, rng)
    assert {r[0] for r in lm.last_requests} == lm.grad_contexts
