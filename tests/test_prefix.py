"""Prefix tuning: the backend's prefix states against PEFT, real-word states and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from methods.autoprompt import label_requests
from methods.evaluate import score_prompts, slot_text
from methods.lm import PROMPT_SLOT, PrefixPrompt, Request, SoftPrompt
from methods.soft_prompt import SoftPromptTuning
from backends.prefix import KVShape, from_layers, split_by_prefix, to_layers
from backends.peft_export import load_prefix, save_prefix
from tests.fakes import planted_task
from tests.test_backend import SENTENCES, fd_check, naive
from tests.tiny import tiny_backend, tiny_model


@pytest.fixture(scope="module")
def lm():
    return tiny_backend(max_batch_tokens=64, min_prefix=4)


def random_prefix(lm, n: int = 3, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, lm.kv_shape.width)) * scale).astype(np.float32)


def test_layout_round_trips_and_reads_grouped_query_heads(lm):
    shape = lm.kv_shape
    assert (shape.n_layers, shape.kv_heads, shape.head_dim) == (2, 2, 8)  # 4 query heads share 2 KV heads
    flat = torch.arange(3 * shape.width, dtype=torch.float32).view(3, -1)
    layers = to_layers(flat, shape)
    assert len(layers) == 2 and layers[0][0].shape == (1, 2, 3, 8)
    # virtual token 1, layer 1's value, KV head 0, dim 0 sits at column (2*1 + 1) * kv_dim
    assert layers[1][1][0, 0, 1, 0] == flat[1, 3 * 16]
    torch.testing.assert_close(from_layers(layers), flat)
    with pytest.raises(ValueError, match="prefix must be"):
        to_layers(flat[:, :-1], shape)


def test_backend_scores_equal_peft_prefix_tuning_forward(lm, tmp_path):
    """The exported adapter, run by PEFT itself, gives the backend's log-likelihoods."""
    from peft import PeftModel

    prefix = random_prefix(lm)
    save_prefix(lm.model, prefix, tmp_path)
    np.testing.assert_array_equal(load_prefix(tmp_path, tiny_model(len(lm.tokenizer))), prefix)
    peft_model = PeftModel.from_pretrained(tiny_model(len(lm.tokenizer)), str(tmp_path)).eval()
    requests = [(f"Review: {s}\nSentiment:", c) for s in SENTENCES[:3] for c in (" positive", " the worst")]
    got = lm.loglikelihood(Request.batch(requests, PrefixPrompt(prefix)))
    for (context, cont), want in zip(requests, got):
        ctx, ids = lm.tokenize(context), lm.tokenize(cont)
        x = torch.tensor([ctx + ids])
        with torch.no_grad():
            logp = torch.log_softmax(peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].double(), -1)
        ref = sum(float(logp[len(ctx) - 1 + k, t]) for k, t in enumerate(ids))
        assert want == pytest.approx(ref, rel=1e-4, abs=1e-4)
    plain = lm.loglikelihood(Request.batch(requests))
    assert np.abs(plain - got).max() > 1e-2  # the prefix changes the scores


def test_states_of_real_words_as_a_prefix_equal_the_words_in_the_context(lm):
    words = "Note: a film review."
    states = lm.prefix_states(words)
    assert states.shape == (len(lm.tokenize(words)), lm.kv_shape.width) and states.dtype == np.float32
    requests = [(f" Review: {s}\nSentiment:", " positive") for s in SENTENCES]
    got = lm.loglikelihood(Request.batch(requests, PrefixPrompt(states)))
    for (context, cont), value in zip(requests, got):
        ref = naive(lm, lm.tokenize(words) + lm.tokenize(context), lm.tokenize(cont))
        assert value == pytest.approx(ref, rel=1e-5, abs=1e-5)


def test_mixed_prompts_in_one_call_equal_separate_calls(lm):
    """Requests under two prefixes, a soft prompt and none, in any order, in one call."""
    a, b = PrefixPrompt(random_prefix(lm, seed=1)), PrefixPrompt(random_prefix(lm, n=2, seed=2))
    soft = SoftPrompt(np.random.default_rng(3).normal(0, 0.3, size=(2, 32)).astype(np.float32))
    reqs = [(f"Review: {s}\nSentiment:", " positive") for s in SENTENCES]
    slotted = [(f"{PROMPT_SLOT}{c}", k) for c, k in reqs]
    mixed = [(reqs[0], a), (slotted[1], soft), (reqs[2], b), (reqs[3], None), (reqs[4], a), (reqs[1], b)]
    got = lm.loglikelihood(Request.batch([r for r, _ in mixed], [p for _, p in mixed]))
    want = [lm.loglikelihood(Request.batch([r], p))[0] for r, p in mixed]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert [g[1] for g in split_by_prefix([p for _, p in mixed])] == [[1, 3], [0, 4], [2, 5]]


def test_prefix_grad_matches_finite_differences():
    lm = tiny_backend(dtype=torch.float64, max_batch_tokens=48)
    requests = [(f"Review: {s}\nSentiment:", c) for s in SENTENCES[:2] for c in (" positive", " the worst")]
    base = np.random.default_rng(4).normal(0, 0.3, size=(2, lm.kv_shape.width))
    # layer 0 key, layer 1 value, last column
    fd_check(lm, requests, PrefixPrompt, base, [(0, 0), (1, 3 * 16 + 5), (1, base.shape[1] - 1)])


def test_a_wrong_width_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="prefix must be"):
        lm.loglikelihood(Request.batch([("a", " b")], PrefixPrompt(np.zeros((2, 10), np.float32))))


def _trained(lm, method, task, steps: int = 10):
    """``(first prompt, state after steps and a pickle round trip, last report, label loss of a prefix)``;
    the first prompt is checked to be the states of the init text."""
    import pickle

    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    first = method.best(state)
    np.testing.assert_allclose(first.key_values, lm.prefix_states("the the the the")[:4], rtol=1e-6)
    reqs = label_requests(task, task.train, "")

    def loss(p):
        return float(-lm.loglikelihood(Request.batch(reqs, PrefixPrompt(p))).mean())

    for _ in range(steps):
        state, report = method.step(state, task, lm, lm, rng)
    return first, pickle.loads(pickle.dumps(state)), report, loss


def test_prefix_tuning_lowers_the_loss_and_keeps_its_state_picklable(lm):
    task = planted_task(n_train=32, n_dev=16)
    method = SoftPromptTuning(space="prefix", n_virtual=4, init_text="the the", lr=0.2, batch_size=32,
                              eval_every=10, n_eval=0)
    first, state, report, loss = _trained(lm, method, task)
    assert isinstance(first, PrefixPrompt) and first.key_values.shape == (4, lm.kv_shape.width)
    assert slot_text(first) == "" and "{instruction}" in task.template
    assert loss(method._forward(state.params)[0]) < 0.8 * loss(first.key_values)
    best = method.best(state)
    assert isinstance(best, PrefixPrompt) and best.origin == "the the"
    assert report.evaluated and report.evaluated[0].prompt.startswith("<prefix 4x")
    (score,) = score_prompts(task, [best], task.dev, lm)
    assert score == state.best_dev


def test_prefix_space_is_validated():
    with pytest.raises(ValueError, match="space"):
        SoftPromptTuning(space="kv")
    assert KVShape(2, 2, 8).width == 64


def test_text_init_without_any_text_says_what_to_set(lm):
    import dataclasses

    task = dataclasses.replace(planted_task(), instruction="")
    for space in ("input", "prefix"):
        with pytest.raises(ValueError, match="set init_text"):
            SoftPromptTuning(space=space).init(task, lm, lm, np.random.default_rng(0))
    state = SoftPromptTuning(space="prefix", n_virtual=2, init_from="sample_vocab").init(task, lm, lm, np.random.default_rng(0))
    assert state.params[0].shape == (2, lm.kv_shape.width)


def test_prefix_projection_is_pefts_prefix_encoder_and_starts_at_the_instructions_states(lm):
    """Fails on the old behaviour (prefix states trained directly, no reparameterization): Li &
    Liang's MLP over smaller embeddings, PEFT's PrefixEncoder(prefix_projection=True)."""
    import torch
    from peft import PrefixTuningConfig
    from peft.tuners.prefix_tuning.model import PrefixEncoder

    from methods.peft_encoders import init_projection, projection_backward, projection_forward

    task = planted_task(n_train=32, n_dev=16)
    method = SoftPromptTuning(space="prefix", encoder="projection", encoder_hidden=8, n_virtual=4,
                              init_text="the the", lr=0.05, batch_size=32, eval_every=10, n_eval=0)
    first, state, _, loss = _trained(lm, method, task)  # residual: it starts at the baseline
    start = first.key_values
    np.testing.assert_array_equal(state.params[0], start)  # the offset never moves; the encoder does
    assert loss(method._forward(state.params)[0]) < 0.8 * loss(start)
    # without the residual offset it is PEFT's encoder, output for output
    params = init_projection(start, hidden=8, residual=False, rng=np.random.default_rng(1))
    width = start.shape[1]
    reference = PrefixEncoder(PrefixTuningConfig(num_virtual_tokens=4, token_dim=width // 2, num_layers=1,
                                                 encoder_hidden_size=8, prefix_projection=True,
                                                 num_transformer_submodules=1)).double()
    reference.load_state_dict({k: torch.from_numpy(p.astype(np.float64)) for k, p in zip(reference.state_dict(), params[1:])})
    out, cache = projection_forward(params, hidden=8)
    np.testing.assert_allclose(out, reference(torch.arange(4)).detach().numpy(), rtol=1e-5, atol=1e-5)
    grads = projection_backward(cache, np.ones_like(out))
    assert not grads[0].any() and all(g.shape == p.shape for g, p in zip(grads, params))
    with pytest.raises(ValueError, match="space='prefix'"):
        SoftPromptTuning(encoder="projection")
