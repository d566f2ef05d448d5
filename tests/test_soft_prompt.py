"""Soft prompt tuning and P-tuning against the differentiable fake LM of test_autoprompt."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from methods.autoprompt import label_requests
from methods.evaluate import score_prompts
from methods.lm import Request, SoftPrompt
from methods.soft_prompt import (
    SoftPromptTuning, adam, clip, init_mlp, mlp_backward, mlp_forward, nearest_tokens, text_init,
)
from tests.fakes import planted_task
from tests.test_autoprompt import GradLM


def run(method, task, lm, steps, seed=0, state=None, rng=None):
    rng = rng or np.random.default_rng(seed)
    state = state or method.init(task, lm, lm, rng)
    reports = []
    for _ in range(steps):
        state, report = method.step(state, task, lm, lm, rng)
        reports.append(report)
    return state, reports, rng


def nll(task, lm, prompt: np.ndarray) -> float:
    reqs = label_requests(task, task.train)
    return float(-lm.loglikelihood(Request.batch(reqs, SoftPrompt(prompt))).mean())


@pytest.mark.parametrize("encoder", ["none", "mlp", "lstm"])
def test_training_lowers_the_loss_and_raises_the_dev_score(encoder):
    task, lm = planted_task(n_train=40, n_dev=40), GradLM()
    method = SoftPromptTuning(
        n_virtual=4, init_text="the the", encoder=encoder, encoder_hidden=16,
        lr=0.05, batch_size=16, eval_every=5, n_eval=0,
    )
    start = method.init(task, lm, lm, np.random.default_rng(0))
    init_prompt = method.best(start).embeddings
    state, reports, _ = run(method, task, lm, steps=30)
    final = method._forward(state.params)[0]  # the best-dev prompt may be an early one that ties on accuracy
    assert nll(task, lm, final) < 0.5 * nll(task, lm, init_prompt)
    (before,) = score_prompts(task, [SoftPrompt(init_prompt)], task.dev, lm)
    assert state.best_dev > before
    assert reports[-1].metrics["dev_score"] == max(e.score for r in reports for e in r.evaluated)
    assert all(np.isfinite(r.metrics["loss"]) and r.metrics["prompt_norm"] > 0 for r in reports)


def test_one_gradient_call_per_step_and_one_call_per_evaluation():
    task, lm = planted_task(), GradLM()
    method = SoftPromptTuning(n_virtual=3, eval_every=3, n_eval=16)
    state, reports, _ = run(method, task, lm, steps=6)
    assert lm.grad_calls == 6
    assert lm.ll_calls == 3  # after steps 1, 3 and 6
    assert [len(r.evaluated) for r in reports] == [1, 0, 1, 0, 0, 1]
    assert all(e.n == 16 and e.prompt.startswith("<soft 3x8:") for r in reports for e in r.evaluated)


def test_numpy_adam_matches_torch_adam():
    rng = np.random.default_rng(0)
    params = (rng.standard_normal((4, 6)).astype(np.float32), rng.standard_normal(5).astype(np.float32))
    hp = SoftPromptTuning(lr=0.03, beta1=0.8, beta2=0.99, eps=1e-6)
    tparams = [torch.tensor(p, requires_grad=True) for p in params]
    opt = torch.optim.Adam(tparams, lr=0.03, betas=(0.8, 0.99), eps=1e-6)
    m = v = tuple(np.zeros_like(p) for p in params)
    for t in range(1, 6):
        grads = tuple(rng.standard_normal(p.shape).astype(np.float32) * t for p in params)
        params, m, v = adam(params, grads, m, v, t, hp)
        for tp, g in zip(tparams, grads):
            tp.grad = torch.tensor(g)
        opt.step()
        for p, tp in zip(params, tparams):
            np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert all(p.dtype == np.float32 for p in params + m + v)


def test_clip_scales_to_the_global_norm():
    grads = (np.full((2, 2), 3.0, np.float32), np.full(1, 4.0, np.float32))
    clipped, norm = clip(grads, 1.0)
    assert norm == pytest.approx(np.sqrt(4 * 9 + 16))
    assert np.sqrt(sum(np.sum(g**2) for g in clipped)) == pytest.approx(1.0, rel=1e-4)
    assert clip(grads, 0.0)[0] is grads


def test_text_init_repeats_and_cuts_token_embeddings_like_peft():
    lm = GradLM()
    vocab = lm.token_embeddings()
    ids = lm.tokenize("the great film")
    np.testing.assert_array_equal(text_init(ids, vocab, 7), vocab[ids * 3][:7])
    np.testing.assert_array_equal(text_init(ids, vocab, 2), vocab[ids[:2]])
    task = planted_task()
    state = SoftPromptTuning(n_virtual=5, init_text="the great film").init(task, lm, lm, np.random.default_rng(0))
    np.testing.assert_array_equal(state.params[0], vocab[(ids * 2)[:5]])
    default = SoftPromptTuning(n_virtual=2).init(task, lm, lm, np.random.default_rng(0))
    np.testing.assert_array_equal(default.params[0], vocab[lm.tokenize(task.instruction) * 2][:2])


def test_vocab_and_random_inits():
    task, lm = planted_task(), GradLM()
    vocab = lm.token_embeddings()
    sampled = SoftPromptTuning(n_virtual=6, init_from="sample_vocab").init(task, lm, lm, np.random.default_rng(1))
    assert all(any(np.array_equal(row, e) for e in vocab) for row in sampled.params[0])
    rand = SoftPromptTuning(n_virtual=400, init_from="random").init(task, lm, lm, np.random.default_rng(1))
    np.testing.assert_allclose(rand.params[0].std(axis=0), vocab.std(axis=0), rtol=0.2)


def test_nearest_tokens_and_best_prompt_carry_readable_words():
    lm = GradLM()
    vocab = lm.token_embeddings()
    ids = [4, 9, 0]
    assert nearest_tokens(vocab[ids] * 3.0, vocab) == ids
    task = planted_task()
    method = SoftPromptTuning(n_virtual=3, init_text="film great the", lr=1e-6, eval_every=1)
    state, _, _ = run(method, task, lm, steps=1)
    assert method.best(state).nearest == (" film", " great", " the")


def test_mlp_backward_matches_autograd():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((3, 5)).astype(np.float32)
    for residual in (True, False):
        params = init_mlp(emb, 7, residual, rng)
        params = params[:5] + (rng.standard_normal((7, 5)).astype(np.float32), params[6] + 0.1)
        upstream = rng.standard_normal((3, 5)).astype(np.float32)
        out, cache = mlp_forward(params, residual)
        grads = mlp_backward(params, cache, upstream, residual)
        tp = [torch.tensor(p, dtype=torch.float64, requires_grad=True) for p in params]
        e, w1, b1, w2, b2, w3, b3 = tp
        tout = torch.relu(torch.relu(e @ w1 + b1) @ w2 + b2) @ w3 + b3 + (e if residual else 0)
        (tout * torch.tensor(upstream, dtype=torch.float64)).sum().backward()
        np.testing.assert_allclose(out, tout.detach().numpy(), rtol=1e-4, atol=1e-5)
        for g, t in zip(grads, tp):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_residual_p_tuning_starts_at_the_init_prompt():
    task, lm = planted_task(), GradLM()
    method = SoftPromptTuning(n_virtual=4, encoder="mlp", init_text="the film")
    state = method.init(task, lm, lm, np.random.default_rng(0))
    assert len(state.params) == 7
    expected = text_init(lm.tokenize("the film"), lm.token_embeddings(), 4)
    np.testing.assert_array_equal(method.best(state).embeddings, expected)


@pytest.mark.parametrize("encoder", ["none", "mlp", "lstm"])
def test_state_pickles_and_resume_is_identical(encoder):
    task = planted_task()
    method = SoftPromptTuning(n_virtual=3, encoder=encoder, encoder_hidden=8, eval_every=2, n_eval=16)
    full, _, _ = run(method, task, GradLM(), steps=5, seed=4)
    lm, rng = GradLM(), np.random.default_rng(4)
    half, _, rng = run(method, task, lm, steps=2, rng=rng)
    half, rng = pickle.loads(pickle.dumps((half, rng)))
    resumed, _, _ = run(method, task, lm, steps=3, state=half, rng=rng)
    for name in ("params", "m", "v"):
        for a, b in zip(getattr(full, name), getattr(resumed, name)):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(full.best, resumed.best)
    assert (full.t, full.loss, full.best_dev, full.best_nearest) == (
        resumed.t, resumed.loss, resumed.best_dev, resumed.best_nearest,
    )


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="init_from"):
        SoftPromptTuning(init_from="zeros")
    with pytest.raises(ValueError, match="encoder"):
        SoftPromptTuning(encoder="gru")
    with pytest.raises(ValueError, match="input-space"):
        SoftPromptTuning(encoder="lstm", space="prefix")
    with pytest.raises(ValueError, match="space"):
        SoftPromptTuning(space="embedding")


@pytest.mark.parametrize("encoder", ["none", "mlp", "lstm"])
def test_training_lowers_the_label_loss_of_a_tiny_random_llama(encoder):
    from tests.tiny import tiny_backend

    task, lm = planted_task(n_train=32, n_dev=16), tiny_backend()
    method = SoftPromptTuning(
        n_virtual=4, encoder=encoder, encoder_hidden=16, lr=0.1, batch_size=16, eval_every=5, n_eval=16,
    )
    start = method.init(task, lm, lm, np.random.default_rng(0))
    state, reports, _ = run(method, task, lm, steps=15)
    final = method._forward(state.params)[0]
    assert nll(task, lm, final) < nll(task, lm, method.best(start).embeddings) - 1.0
    assert len(method.best(state).nearest) == 4 and all(isinstance(w, str) for w in method.best(state).nearest)


@pytest.mark.parametrize(("name", "encoder"), [("soft_prompt", "none"), ("p_tuning", "lstm")])
def test_yamls_instantiate_with_every_key_a_constructor_argument(name, encoder):
    from pathlib import Path

    import hydra.utils
    from omegaconf import OmegaConf

    path = Path(__file__).resolve().parents[1] / f"conf/method/{name}.yaml"
    assert path.read_text().startswith(f"# python -m pipelines.run method={name}")
    method = hydra.utils.instantiate(OmegaConf.load(path), _convert_="all")
    assert isinstance(method, SoftPromptTuning) and method.encoder == encoder and method.eps == 1e-8


def test_p_tuning_is_pefts_lstm_prompt_encoder_and_its_gradient_chains_through_it():
    """Fails on the old behaviour (P-tuning as a residual MLP): p_tuning.yaml's encoder is
    Liu et al.'s bidirectional LSTM with an MLP head, PEFT's PromptEncoder, output for output."""
    from peft import PromptEncoderConfig
    from peft.tuners.p_tuning.model import PromptEncoder

    from methods.peft_encoders import init_lstm, lstm_backward, lstm_forward

    rng = np.random.default_rng(0)
    init = rng.standard_normal((4, 6)).astype(np.float32)
    params = init_lstm(init, hidden=5, rng=rng)
    np.testing.assert_array_equal(params[0], init)  # the embeddings start at the init prompt
    config = PromptEncoderConfig(num_virtual_tokens=4, token_dim=6, encoder_hidden_size=5,
                                 encoder_reparameterization_type="LSTM", num_transformer_submodules=1)
    reference = PromptEncoder(config).double()
    reference.load_state_dict({k: torch.from_numpy(p.astype(np.float64)) for k, p in zip(reference.state_dict(), params)})
    out, cache = lstm_forward(params, hidden=5)
    np.testing.assert_allclose(out, reference(torch.arange(4)).detach().numpy(), rtol=1e-5, atol=1e-6)
    # d(sum(g * out)) / d(weight), checked by finite differences on a few entries of each tensor
    g = rng.standard_normal(out.shape)
    grads = lstm_backward(cache, g)
    for k in (0, 1, len(params) - 2):
        p = [q.astype(np.float64) for q in params]
        idx = tuple(int(rng.integers(n)) for n in p[k].shape)
        h = 1e-4
        p[k][idx] += h
        up = float((lstm_forward(p, hidden=5)[0].astype(np.float64) * g).sum())
        p[k][idx] -= 2 * h
        down = float((lstm_forward(p, hidden=5)[0].astype(np.float64) * g).sum())
        assert grads[k][idx] == pytest.approx((up - down) / (2 * h), rel=2e-2, abs=1e-3), k
    from omegaconf import OmegaConf
    from pathlib import Path

    yaml = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/method/p_tuning.yaml")
    assert yaml.encoder == "lstm"
