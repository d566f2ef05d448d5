"""RLPrompt: an MLP policy on the frozen proposer writes prompts token by token; soft Q-learning on
the scorer's gap reward.

``PolicyLM`` is both roles. As a proposer its answer state is a fixed pseudo-random vector per
context string, read against random output embeddings over a ten-word vocabulary. As a scorer it
reads the instruction out of the planted task's context: every occurrence of a rewarded word
("great", "label") widens the gold label's margin, so a prompt's reward grows with how many it
holds, and only a policy that learns from the reward puts more mass on them.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import replace

import numpy as np
import pytest
import torch

from methods.evaluate import label_probabilities as label_probs, score_prompts
from methods.lm import ANSWER_STATES, Needs, TextPrompt, TokenPrompt
from methods.racing import fixed_dev
from methods import rlprompt
from methods.rlprompt import RLPrompt, gap_rewards, normalize, sample_top_k, sql_loss
from tests.fakes import planted_gen_task, planted_task, resumed_and_uninterrupted, run_steps

WORDS = ("<s>", "great", "label", "the", "banana", "seven", "maybe", "purple", "quickly", "random")
REWARDED = ("great", "label")
CONTEXT = "Write a prompt:"


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


class PolicyLM:
    """Answer states per context string; label scores that reward the planted words in the instruction."""

    capabilities = frozenset({ANSWER_STATES})

    def __init__(self, d: int = 8, seed: int = 0) -> None:
        self.out = np.random.default_rng(seed).standard_normal((len(WORDS), d)).astype(np.float32)
        self.d = d
        self.state_calls: list[list[str]] = []
        self.ll_calls: list[list] = []

    def answer_states(self, contexts, prompt=None) -> np.ndarray:
        self.state_calls.append(list(contexts))
        return np.stack([self._state(c) for c in contexts])

    def _state(self, context: str) -> np.ndarray:
        return np.array([2 * _unit(f"{context}|{i}") - 1 for i in range(self.d)], dtype=np.float32)

    def output_embeddings(self) -> np.ndarray:
        return self.out

    def loglikelihood(self, requests) -> np.ndarray:
        requests = list(requests)
        self.ll_calls.append(requests)
        return np.array([self._ll(r.context, r.continuation) for r in requests])

    def _ll(self, context: str, continuation: str) -> float:
        instruction, _, rest = context.partition("\nInput: ")
        gold = " yes" if rest.split("\n")[0].endswith("yes") else " no"
        margin = sum(w in REWARDED for w in instruction.split()) - 0.5 + 0.2 * (_unit(rest) - 0.5)
        log_z = np.logaddexp(margin, 0.0)
        return float(margin - log_z) if continuation == gold else float(-log_z)

    def tokenize(self, text: str) -> list[int]:
        return [WORDS.index(w) if w in WORDS else 0 for w in text.split()]

    def decode(self, ids) -> str:
        return "".join(" " + WORDS[i] for i in ids)


def small(**kw) -> RLPrompt:
    base = dict(prompt_length=3, n_prompts=8, batch_size=8, policy_context=CONTEXT, mlp_hidden=16, top_k=0,
                lr=0.01, eval_every=5, n_eval=16)
    return RLPrompt(**{**base, **kw})


def rewarded_mass(method, state, lm) -> float:
    """The policy's probability of a rewarded word as its first token."""
    logits = method.next_token_logits(state, lm, [()])[0]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return float(sum(p[WORDS.index(w)] for w in REWARDED))


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "reference_head"])
def test_training_moves_the_policy_toward_the_rewarded_tokens(residual):
    task, lm = planted_task(n_train=40, n_dev=16), PolicyLM()
    method = small(residual=residual)
    start = method.init(task, lm, lm, np.random.default_rng(0))
    state, reports = run_steps(method, task, lm, steps=30)
    before, after = rewarded_mass(method, start, lm), rewarded_mass(method, state, lm)
    assert after > before + 0.3, (before, after)
    assert reports[-1].metrics["reward"] > reports[0].metrics["reward"]
    assert state.t == 30 and all(np.isfinite(r.metrics["loss"]) for r in reports)


def test_the_gap_reward_and_its_z_scores_match_hand_computed_values():
    probs = [np.array([0.7, 0.3]), np.array([0.7, 0.3]), np.array([0.2, 0.5, 0.3]), np.array([0.5, 0.5])]
    rewards = gap_rewards(probs, [0, 1, 2, 0], correct_coeff=200.0, incorrect_coeff=180.0)
    # 0.4 won (x200); 0.4 lost (x180); gold 0.3 vs best wrong 0.5 lost; a tie is no win
    np.testing.assert_allclose(rewards, [80.0, -72.0, -36.0, 0.0])

    raw = np.array([[80.0, -72.0], [20.0, 40.0], [0.0, 0.0]])  # 3 prompts x 2 examples
    # batch: means 4, 30, 0; their mean 34/3, population std sqrt(530.67 / 3) = 13.300 (+1e-4)
    means = np.array([4.0, 30.0, 0.0])
    np.testing.assert_allclose(normalize(raw, "batch"), [-0.5514, 1.4035, -0.8521], atol=1e-4)
    # example: column 0 (80, 20, 0) and column 1 (-72, 40, 0) each z-scored, then averaged per prompt
    col0 = (np.array([80.0, 20.0, 0.0]) - 100 / 3) / (np.std([80.0, 20.0, 0.0]) + 1e-4)
    col1 = (np.array([-72.0, 40.0, 0.0]) + 32 / 3) / (np.std([-72.0, 40.0, 0.0]) + 1e-4)
    np.testing.assert_allclose(normalize(raw, "example"), (col0 + col1) / 2)
    np.testing.assert_allclose(normalize(raw, "none"), means)


def test_label_probabilities_are_normalised_over_the_label_words_from_the_scorers_log_likelihoods():
    task = planted_task(n_train=4)
    loglik = np.log([0.2, 0.6, 0.05, 0.05])  # two examples, two labels each, unnormalised
    probs = label_probs(task, task.train[:2], loglik)
    np.testing.assert_allclose(probs[0], [0.25, 0.75])
    np.testing.assert_allclose(probs[1], [0.5, 0.5])


def test_the_method_rewards_with_the_gap_shaped_from_the_z_scores(monkeypatch):
    # On the fake: each sampled prompt's reward is its mean gap reward over the step's batch; the
    # loss gets their z-scores times 5 (the shaping 0..1 -> 0..5), and the metrics say so.
    task, lm = planted_task(n_train=40, n_dev=8), PolicyLM()
    method = small(eval_every=100)
    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    seen = {}

    def spy(logits, target_logits, actions, rewards):
        seen["rewards"] = rewards.numpy().astype(np.float64)
        return sql_loss(logits, target_logits, actions, rewards)

    monkeypatch.setattr(rlprompt, "sql_loss", spy)
    _, report = method.step(state, task, lm, lm, rng)
    requests = lm.ll_calls[0]  # per prompt, per example: " no" then " yes"
    gaps = []
    for no, yes in zip(requests[::2], requests[1::2]):
        p_yes = 1 / (1 + np.exp(lm._ll(no.context, no.continuation) - lm._ll(yes.context, yes.continuation)))
        gap = (p_yes - (1 - p_yes)) * (1 if no.context.split("\n")[1].endswith("yes") else -1)
        gaps.append(gap * (200 if gap > 0 else 180))
    raw = np.array(gaps).reshape(method.n_prompts, method.batch_size)
    means = raw.mean(axis=1)
    np.testing.assert_allclose(seen["rewards"], 5 * (means - means.mean()) / (means.std() + 1e-4), rtol=1e-5)
    assert report.metrics["reward"] == pytest.approx(raw.mean())
    assert report.metrics["train_acc"] == pytest.approx((raw > 0).mean())


def test_a_step_samples_prompts_of_the_configured_length_with_one_state_call_per_position():
    task, lm = planted_task(n_train=40, n_dev=8), PolicyLM()
    method = small(prompt_length=4, n_prompts=16, batch_size=5, eval_every=100, top_k=2)
    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    state, _ = method.step(state, task, lm, lm, rng)
    after_first = state
    assert len(lm.state_calls) == 2 * 4  # the samples, then the greedy prompt for dev (first step)
    lm.state_calls.clear()
    lm.ll_calls.clear()
    state, report = method.step(state, task, lm, lm, rng)
    assert len(lm.state_calls) == 4 and report.evaluated == ()  # one call per position, no dev this step
    assert lm.state_calls[0] == [CONTEXT]  # every prompt starts from the same context: read once
    for t, contexts in enumerate(lm.state_calls):
        assert all(c.startswith(CONTEXT) and len(c[len(CONTEXT):].split()) == t for c in contexts)
    (requests,) = lm.ll_calls  # every prompt rewarded in one call
    assert len(requests) == 16 * 5 * 2
    prompts = [r.context.partition("\nInput: ")[0] for r in requests[::10]]
    assert len(prompts) == 16 and len(set(prompts)) > 1 and all(len(p.split()) == 4 for p in prompts)
    # top_k=2: every first token is one of the policy's two most likely at the shared context
    # (it was read with the weights before this step's update)
    before = method.next_token_logits(after_first, lm, [()])[0]
    allowed = {WORDS[i] for i in np.argsort(-before)[:2]}
    assert {p.split()[0] for p in prompts} <= allowed


def test_sampling_draws_among_the_top_k_tokens_in_proportion_to_their_probabilities():
    logits = np.array([[0.0, 1.0, 3.0, 2.0]] * 4000)
    drawn = sample_top_k(logits, 2, np.random.default_rng(0))
    assert set(drawn) == {2, 3}
    assert np.mean(drawn == 2) == pytest.approx(np.e / (1 + np.e), abs=0.03)
    everything = sample_top_k(logits, 0, np.random.default_rng(0))
    assert set(everything) == {0, 1, 2, 3}
    assert np.mean(everything == 0) == pytest.approx(1 / np.exp([0.0, 1.0, 3.0, 2.0]).sum(), abs=0.02)


def test_the_greedy_prompt_is_scored_on_dev_and_best_returns_the_best_one():
    task, lm = planted_task(n_train=40, n_dev=24), PolicyLM()
    method = small(eval_every=2, n_eval=16)
    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    state, report = method.step(state, task, lm, lm, rng)
    (record,) = report.evaluated
    ids = []  # the policy's argmax, token by token, with the updated weights
    for _ in range(method.prompt_length):
        ids.append(int(np.argmax(method.next_token_logits(state, lm, [tuple(ids)])[0])))
    text = lm.decode(ids)
    dev = fixed_dev(task, 16)
    (expected,) = score_prompts(task, [TextPrompt(text)], dev, lm)
    assert (record.prompt, record.score, record.n, record.kind) == (text, expected, 16, "greedy")
    dev_call = lm.ll_calls[-2]  # the step's dev call (the last is the test's own scoring)
    assert [r.context for r in dev_call[::2]] == [task.render(text, ex) for ex in dev]  # the fixed subset
    assert state.greedy_ids == tuple(ids) and state.best_ids == tuple(ids) and state.best_dev == expected
    assert method.best(state) == TextPrompt(text)
    assert method.snapshot(state).current == TokenPrompt(tuple(ids), text)
    assert report.metrics["dev_score"] == expected == report.metrics["greedy_dev"]
    # a greedy prompt that scores below the best so far does not replace it
    held = replace(state, best_ids=(9,), best_text=" random", best_dev=2.0)
    held, report = method.step(held, task, lm, lm, rng)
    assert report.evaluated and method.best(held) == TextPrompt(" random") and held.best_dev == 2.0
    assert report.metrics["dev_score"] == 2.0 and held.greedy_text == report.evaluated[0].prompt


def test_the_sql_loss_is_zero_on_a_soft_bellman_consistent_policy_and_grows_with_the_reward_error():
    # Two positions, two tokens, actions (0, 0), target = policy. With Q1 = [q, 0] and r = q, the
    # last advantage is r - V1; with Q0 = [V1, x], A0 = V1 - V0. Both losses are then 0.
    q, x = 1.3, -0.4
    v1 = float(np.logaddexp(q, 0.0))
    logits = torch.tensor([[[v1, x], [q, 0.0]]], dtype=torch.float64)
    actions = torch.zeros((1, 2), dtype=torch.int64)
    assert float(sql_loss(logits, logits, actions, torch.tensor([q], dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    # A reward off by d: single-step d^2 at the last token; multi-step d^2 at both: (d^2 + 2 d^2) / 2
    d = 0.7
    loss = float(sql_loss(logits, logits, actions, torch.tensor([q + d], dtype=torch.float64)))
    assert loss == pytest.approx(1.5 * d**2)


def test_the_state_pickles_and_a_resumed_run_equals_an_uninterrupted_one():
    task = planted_task(n_train=40, n_dev=16)
    method = small(eval_every=2)
    resumed, full = resumed_and_uninterrupted(method, task, PolicyLM, steps=5, split=2)
    for a, b in zip(resumed.params + resumed.target + resumed.m + resumed.v,
                    full.params + full.target + full.m + full.v):
        np.testing.assert_array_equal(a, b)
    assert (resumed.t, resumed.best_ids, resumed.best_dev, resumed.greedy_ids) == (
        full.t, full.best_ids, full.best_dev, full.greedy_ids)
    # and every step after the checkpoint reports the same, dev evaluations included: nothing
    # that decides a step lives outside the state and the rng
    def after_checkpoint(resume: bool) -> list:
        lm, rng = PolicyLM(), np.random.default_rng(0)
        state = method.init(task, lm, lm, rng)
        for _ in range(2):
            state, _ = method.step(state, task, lm, lm, rng)
        if resume:
            state, rng = pickle.loads(pickle.dumps((state, rng)))
        reports = []
        for _ in range(3):
            state, report = method.step(state, task, lm, lm, rng)
            reports.append(report)
        return reports

    straight, resumed_reports = after_checkpoint(False), after_checkpoint(True)
    assert [r.evaluated for r in straight] == [r.evaluated for r in resumed_reports]
    assert [r.evaluated != () for r in straight] == [False, True, False]  # dev at step 4 of eval_every=2
    assert [r.metrics for r in straight] == [r.metrics for r in resumed_reports]


def test_needs_answer_states_of_the_proposer_only_and_refuses_a_generative_task():
    assert RLPrompt().needs() == Needs(proposer=frozenset({ANSWER_STATES}))
    with pytest.raises(ValueError, match="label-scored task"):
        RLPrompt().check_task(planted_gen_task())
    RLPrompt().check_task(planted_task())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="zscore"):
        RLPrompt(zscore="prompt")
    with pytest.raises(ValueError, match="n_prompts >= 2"):
        RLPrompt(n_prompts=1)
    with pytest.raises(ValueError, match=">= 1"):
        RLPrompt(prompt_length=0)
    task = replace(planted_task(), instruction="")
    with pytest.raises(ValueError, match="policy_context"):
        RLPrompt().init(task, PolicyLM(), PolicyLM(), np.random.default_rng(0))
