"""The local HF backend against naive references on tiny random Llamas built in-process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from methods.lm import LM, PROMPT_SLOT, Request, SoftPrompt, TokenPrompt
from backends.hf import HFBackend
from backends.loading import ModelLoadError
from backends.splice import Row, batches, build_rows, plan_groups, suffix_length
from tests.tiny import tiny_backend

ROOT = Path(__file__).resolve().parents[1]
INSTRUCTION = "Classify the sentiment of the movie review as positive or negative."
SENTENCES = ["a wonderful, moving film", "a dull and lifeless story", "the best of times", "badly written", "great acting"]
LABELS = (" positive", " negative", " the worst of times")  # the last is a multi-token continuation


def naive(lm: HFBackend, context_ids: list[int], cont_ids: list[int], embeds: torch.Tensor | None = None) -> float:
    """One full forward of context + continuation with full logits: the reference score."""
    ids = torch.tensor([context_ids + cont_ids])
    with torch.no_grad():
        if embeds is None:
            logits = lm.model(input_ids=ids).logits[0]
        else:
            full = torch.cat([embeds, lm.embed(torch.tensor(cont_ids))], dim=0)
            logits = lm.model(inputs_embeds=full[None]).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    start = len(context_ids) if embeds is None else embeds.shape[0]
    return float(sum(logp[start - 1 + k, t] for k, t in enumerate(cont_ids)))


def sst_requests(instruction: str = INSTRUCTION) -> list[tuple[str, str]]:
    return [(f"{instruction}\n\nReview: {s}\nSentiment:", c) for s in SENTENCES for c in LABELS]


@pytest.fixture(scope="module")
def lm() -> HFBackend:
    return tiny_backend(max_batch_tokens=64, min_prefix=4)


def test_backend_satisfies_the_protocol(lm):
    assert isinstance(lm, LM)
    assert lm.token_embeddings().shape == (len(lm.tokenizer), 32)
    assert lm.token_embeddings().dtype == np.float32
    ids = lm.tokenize(" positive review")
    assert lm.decode(ids) == " positive review"


def test_loglikelihood_matches_naive_reference(lm):
    requests = sst_requests() + sst_requests("Say if the review is good.") + [
        ("The quick brown fox", " jumps over the lazy dog."),  # unshared, multi-token
        ("The quick brown fox", " jumps"),  # a continuation that is a prefix of another row
        ("x", "y"),
        ("", " hello"),  # empty context: scored after the start token
        ("Review: a wonderful, moving film\nSentiment:", ""),  # empty continuation scores 0
    ]
    got = lm.loglikelihood(Request.batch(requests))
    start = [lm.tokenizer.bos_token_id]  # BOS is not added by default, but starts an empty context
    want = [naive(lm, lm.tokenize(c) or start, lm.tokenize(x)) if x else 0.0 for c, x in requests]
    assert got.dtype == np.float64 and got.shape == (len(requests),)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    assert len({round(v, 3) for v in got}) > len(requests) // 2  # the numbers really differ


def test_prefix_reuse_saves_tokens_and_changes_nothing(lm):
    requests = sst_requests()
    before = lm.usage()["forward_tokens"]
    with_reuse = lm.loglikelihood(Request.batch(requests))
    reused = lm.usage()["forward_tokens"] - before
    plain = tiny_backend(min_prefix=0)
    plain.model.load_state_dict(lm.model.state_dict())
    without = plain.loglikelihood(Request.batch(requests))
    np.testing.assert_allclose(with_reuse, without, atol=1e-5)
    assert reused < 0.6 * plain.usage()["forward_tokens"]


def test_results_follow_request_order(lm):
    requests = sst_requests()
    perm = np.random.default_rng(0).permutation(len(requests))
    np.testing.assert_allclose(lm.loglikelihood(Request.batch([requests[i] for i in perm])), lm.loglikelihood(Request.batch(requests))[perm], atol=1e-5)


def test_requests_past_the_context_window_are_refused(lm):
    too_long = " ".join(["word"] * 600)  # the tiny model has 512 positions
    with pytest.raises(ValueError, match="exceeds the model's context"):
        lm.loglikelihood(Request.batch([(too_long, " positive")]))


def test_bos_is_prepended_when_the_tokenizer_adds_one():
    lm = tiny_backend(add_bos=True)
    bos = lm.tokenizer.bos_token_id
    requests = [("Review: great acting\nSentiment:", " positive"), ("", " hello")]
    want = [naive(lm, [bos] + lm.tokenize(c), lm.tokenize(x)) for c, x in requests]
    np.testing.assert_allclose(lm.loglikelihood(Request.batch(requests)), want, atol=1e-4)


def test_token_prompt_is_spliced_at_the_slot_or_prepended(lm):
    trigger = TokenPrompt(ids=(40, 41, 42))
    left, right = "Task: ", "\n\nReview: great acting\nSentiment:"
    requests = [(left + PROMPT_SLOT + right, " positive"), (right, " negative")]
    got = lm.loglikelihood(Request.batch(requests, trigger))
    want = [
        naive(lm, lm.tokenize(left) + [40, 41, 42] + lm.tokenize(right), lm.tokenize(" positive")),
        naive(lm, [40, 41, 42] + lm.tokenize(right), lm.tokenize(" negative")),
    ]
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_per_request_prompts_and_missing_prompt(lm):
    a, b = TokenPrompt(ids=(50,)), TokenPrompt(ids=(60, 61))
    ctx = PROMPT_SLOT + " Review: fine\nSentiment:"
    got = lm.loglikelihood(Request.batch([(ctx, " positive"), (ctx, " positive"), ("Review: fine", " ok")], [a, b, None]))
    single = [lm.loglikelihood(Request.batch([(ctx, " positive")], p))[0] for p in (a, b)]
    np.testing.assert_allclose(got[:2], single, atol=1e-5)
    assert abs(got[0] - got[1]) > 1e-3
    with pytest.raises(ValueError, match="PROMPT_SLOT"):
        lm.loglikelihood(Request.batch([(ctx, " positive")]))
    with pytest.raises(ValueError, match="one per request"):
        lm.loglikelihood(Request.batch([(ctx, " positive")], [a, b]))


def test_soft_prompt_splice_equals_feeding_embeddings(lm):
    rng = np.random.default_rng(1)
    soft = [SoftPrompt(rng.normal(0, 0.2, size=(3, 32)).astype(np.float32)) for _ in range(2)]
    left, right = "Instruction: ", " Review: a dull story\nSentiment:"
    requests = [(left + PROMPT_SLOT + right, c) for c in LABELS] * 2
    got = lm.loglikelihood(Request.batch(requests, [soft[0]] * 3 + [soft[1]] * 3))
    want = []
    for i, (_, cont) in enumerate(requests):
        with torch.no_grad():
            parts = [lm.embed(torch.tensor(lm.tokenize(left))), torch.tensor(soft[i // 3].embeddings)]
            embeds = torch.cat(parts + [lm.embed(torch.tensor(lm.tokenize(right)))], dim=0)
        want.append(naive(lm, [], lm.tokenize(cont), embeds))
    np.testing.assert_allclose(got, want, atol=1e-4)


def fd_check(lm: HFBackend, requests, make_prompt, base: np.ndarray, coords) -> None:
    """Central finite differences of the loss against the analytic gradient at ``coords``."""
    loss, grad = lm.prompt_grad(requests, make_prompt(base))
    np.testing.assert_allclose(loss, -lm.loglikelihood(Request.batch(requests, make_prompt(base))).mean(), rtol=1e-6)
    eps = 1e-5
    for i, j in coords:
        up, down = base.copy(), base.copy()
        up[i, j] += eps
        down[i, j] -= eps
        numeric = (lm.prompt_grad(requests, make_prompt(up))[0] - lm.prompt_grad(requests, make_prompt(down))[0]) / (2 * eps)
        assert grad[i, j] == pytest.approx(numeric, rel=1e-3, abs=1e-6)
    assert grad.shape == base.shape and grad.dtype == np.float32 and np.abs(grad).max() > 1e-4


def test_soft_prompt_grad_matches_finite_differences():
    lm = tiny_backend(dtype=torch.float64, max_batch_tokens=48)
    requests = [(f"Note: {PROMPT_SLOT} Review: {s}\nSentiment:", c) for s in SENTENCES[:2] for c in LABELS]
    base = np.random.default_rng(2).normal(0, 0.3, size=(2, 32))
    fd_check(lm, requests, lambda e: SoftPrompt(e), base, [(0, 0), (1, 31)])


def test_token_prompt_grad_is_the_embedding_grad():
    lm = tiny_backend(dtype=torch.float64)
    ids = (70, 71, 70)  # a repeated trigger: each position gets its own row of the gradient
    requests = [(f"{PROMPT_SLOT} Review: {s}\nSentiment:", " positive") for s in SENTENCES[:2]]
    loss, grad = lm.prompt_grad(requests, TokenPrompt(ids))
    emb = lm.embed.weight[list(ids)].detach().numpy()
    soft_loss, soft_grad = lm.prompt_grad(requests, SoftPrompt(emb))
    assert loss == pytest.approx(soft_loss, rel=1e-9)
    np.testing.assert_allclose(grad, soft_grad, rtol=1e-5, atol=1e-7)
    fd_check(lm, requests, lambda e: SoftPrompt(e), emb.copy(), [(0, 1), (2, 7)])


def naive_greedy(lm: HFBackend, context: str, max_new: int) -> str:
    ids = lm.tokenize(context)
    new = []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(lm.model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if tok == lm.tokenizer.eos_token_id:
                break
            new.append(tok)
    return lm.tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generation_matches_unbatched_argmax(lm):
    contexts = ["Review: a", "The quick brown fox jumps over", "Question: what"]
    got = lm.generate(contexts, max_new_tokens=8, temperature=0, n=2)
    for ctx, outs in zip(contexts, got):
        assert outs == [naive_greedy(lm, ctx, 8)] * 2


def test_sampling_is_seeded_per_context_and_cut_at_stop(lm):
    one = lm.generate(["Review: a"], max_new_tokens=12, temperature=1.0, n=3, seed=7)
    many = lm.generate(["Review: a", "It was the best", "x"], max_new_tokens=12, temperature=1.0, n=3, seed=7)
    assert many[0] == one[0]
    assert len(set(one[0])) > 1  # the three samples differ
    assert lm.generate(["Review: a"], max_new_tokens=12, temperature=1.0, n=3, seed=8) != one
    text = next(t for t in one[0] if len(t) > 4)
    stop = text[2:4]
    cut = lm.generate(["Review: a"], max_new_tokens=12, temperature=1.0, n=3, seed=7, stop=[stop, "\x00never"])
    assert cut[0] == [t[: t.find(stop)] if stop in t else t for t in one[0]]


def test_apply_chat_template_renders_messages():
    lm = tiny_backend()
    lm.tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert lm.apply_chat_template([{"role": "user", "content": "hi"}]) == "<user>hi<assistant>"


def test_missing_model_path_is_a_one_line_error(tmp_path):
    with pytest.raises(ModelLoadError) as err:
        HFBackend(str(tmp_path / "no-such-model"), cache_dir=str(tmp_path))
    assert "does not exist" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="cannot load model") as err:
        HFBackend(str(tmp_path), cache_dir=str(tmp_path))  # a directory, but no model in it
    assert "\n" not in str(err.value)


def test_deepspeed_cpu_engine_matches_torch_engine_in_scores_and_gradients():
    """In a fresh process: DeepSpeed sets up a process group that should not leak into other tests."""
    script = textwrap.dedent(
        """
        import numpy as np
        from backends.hf import HFBackend
        from methods.lm import Request
        from tests.tiny import tiny_model, tiny_tokenizer
        tok = tiny_tokenizer()
        requests = [("Review: great acting\\nSentiment:", c) for c in (" positive", " negative", " the end")]
        plain = HFBackend.from_model(tiny_model(len(tok)), tok).loglikelihood(Request.batch(requests))
        ds = HFBackend.from_model(tiny_model(len(tok)), tok, engine="deepspeed")
        assert type(ds.model).__name__ == "LlamaForCausalLM"
        np.testing.assert_allclose(ds.loglikelihood(Request.batch(requests)), plain, atol=1e-5)
        # gradients flow through the engine-wrapped model: soft prompts and prefixes train on it
        from methods.lm import PrefixPrompt, SoftPrompt
        rng = np.random.default_rng(0)
        torch_lm = HFBackend.from_model(tiny_model(len(tok)), tok)
        for prompt in (SoftPrompt(rng.normal(0, 0.3, (2, 32)).astype(np.float32)),
                       PrefixPrompt(rng.normal(0, 0.3, (2, torch_lm.kv_shape.width)).astype(np.float32))):
            (l1, g1), (l2, g2) = ds.prompt_grad(requests, prompt), torch_lm.prompt_grad(requests, prompt)
            assert abs(l1 - l2) < 1e-5 and np.abs(g1).max() > 0
            np.testing.assert_allclose(g1, g2, atol=1e-5)
        print("deepspeed ok", ds.engine)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deepspeed ok deepspeed" in done.stdout


def test_rows_share_contexts_and_fold_prefixes():
    contexts = [(1, 2, 3), (1, 2, 3), (1, 2, 3), (4,)]
    conts = [(7,), (8,), (7, 9, 10), (5, 6)]
    rows = build_rows(contexts, conts)
    assert sorted(r.keys for r in rows) == [(1, 2, 3, 7, 9), (4, 5)]
    first = next(r for r in rows if r.keys[0] == 1)
    assert sorted(first.targets) == [(2, 7, 0), (2, 7, 2), (2, 8, 1), (3, 9, 2), (4, 10, 2)]


def test_groups_cover_every_row_once_and_targets_stay_in_suffixes():
    rng = np.random.default_rng(3)
    shared = tuple(range(100, 120))
    rows = [Row(shared + tuple(rng.integers(0, 50, size=rng.integers(1, 9))), []) for _ in range(30)]
    rows += [Row(tuple(rng.integers(0, 50, size=12)), []) for _ in range(5)]
    for r in rows:
        r.targets.append((len(r.keys) - 1, 0, 0))
    groups = plan_groups(rows, min_prefix=8)
    assert sorted(id(r) for g in groups for r in g.rows) == sorted(id(r) for r in rows)
    assert any(g.prefix_len >= 20 for g in groups)
    for g in groups:
        assert all(r.keys[: g.prefix_len] == g.rows[0].keys[: g.prefix_len] for r in g.rows)
        assert all(r.first_target() >= g.prefix_len for r in g.rows)
        for batch in batches(g.rows, suffix_length(g.prefix_len), 40):
            assert len(batch) == 1 or len(batch) * max(len(r.keys) - g.prefix_len for r in batch) <= 40


@pytest.mark.slow
def test_default_model_prefers_positive_for_a_glowing_review():
    lm = HFBackend()
    ctx = "Review: a wonderful, moving film\nSentiment:"
    pos, neg = lm.loglikelihood(Request.batch([(ctx, " positive"), (ctx, " negative")]))
    assert pos > neg
    assert lm.generate(["The capital of France is"], max_new_tokens=4, temperature=0)[0][0].strip()


def _next_token_logprobs(states: np.ndarray, out_emb: np.ndarray, bias=None) -> np.ndarray:
    logits = states.astype(np.float64) @ out_emb.astype(np.float64).T
    logits = logits if bias is None else logits + bias
    return logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)


@pytest.mark.parametrize("prompt", [None, TokenPrompt((5, 9)), "soft"])
def test_answer_states_are_what_the_head_reads_at_the_answer(lm, prompt):
    # state @ output_embeddings().T must be the next-token logits that scoring reads, under any prompt:
    # the last position's state, in request order, whatever the batching.
    if prompt == "soft":
        prompt = SoftPrompt(np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32))
    slot = PROMPT_SLOT if prompt is not None else INSTRUCTION
    contexts = [f"{slot}\n\nReview: {s}\nSentiment:" for s in SENTENCES]
    states = lm.answer_states(contexts, prompt)
    assert states.shape == (len(SENTENCES), 32) and states.dtype == np.float32
    logp = _next_token_logprobs(states, lm.output_embeddings())
    words = [" the", " a"]  # single tokens of the tiny tokenizer: one next-token log-probability each
    ids = [lm.tokenize(w)[0] for w in words]
    assert all(len(lm.tokenize(w)) == 1 for w in words)
    ll = lm.loglikelihood([Request(c, w, prompt) for c in contexts for w in words]).reshape(len(contexts), 2)
    np.testing.assert_allclose(logp[:, ids], ll, atol=1e-4)
