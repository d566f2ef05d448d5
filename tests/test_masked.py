"""The masked-LM backend on a tiny random BERT built in-process, and AutoPrompt on top of it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast

from methods.autoprompt import AutoPrompt, objective_table
from methods.lm import ANSWER_STATES, PROMPT_GRAD, PROMPT_SLOT, TOKEN_EMBEDDINGS, PrefixPrompt, Request, SoftPrompt, TokenPrompt
from backends.masked import MaskedLMBackend
from tests.fakes import planted_task

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = "the a is case input label yes no good bad film very not fine dull fun we it so odd new old".split()


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32, max_batch: int = 64) -> MaskedLMBackend:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=64, initializer_range=0.3,
    )
    return MaskedLMBackend.from_model(BertForMaskedLM(config).to(dtype), tokenizer, max_batch=max_batch)


def manual_logprob(lm: MaskedLMBackend, text: str, continuation: str) -> float:
    ids = lm.tokenize(text)
    cont = lm.tokenize(continuation)
    tok = lm.tokenizer
    seq = torch.tensor([[tok.cls_token_id, *ids, *[tok.mask_token_id] * len(cont), tok.sep_token_id]])
    with torch.no_grad():
        logp = torch.log_softmax(lm.model(input_ids=seq).logits[0], -1)
    return float(sum(logp[1 + len(ids) + k, t] for k, t in enumerate(cont)))


def test_loglikelihood_reads_the_continuation_at_masks_and_batches_consistently():
    lm = tiny_bert(max_batch=4)
    reqs = [("the film is good", " yes"), ("input odd", " no fine"), ("a", " dull"), ("we so", " yes")] * 2
    reqs += [("it is not very fine at all", " yes")]
    out = lm.loglikelihood(Request.batch(reqs))
    expected = [manual_logprob(lm, c, k) for c, k in reqs]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert len(set(np.round(out, 4))) > 3


def test_token_and_soft_prompts_splice_at_the_slot():
    lm = tiny_bert()
    ids = tuple(lm.tokenize("very good"))
    reqs = [(f"{PROMPT_SLOT} case is", " yes"), (f"input {PROMPT_SLOT} case", " no")]
    by_text = lm.loglikelihood(Request.batch([(c.replace(PROMPT_SLOT, "very good"), k) for c, k in reqs]))
    np.testing.assert_allclose(lm.loglikelihood(Request.batch(reqs, TokenPrompt(ids))), by_text, rtol=1e-5)
    soft = SoftPrompt(lm.token_embeddings()[list(ids)])
    np.testing.assert_allclose(lm.loglikelihood(Request.batch(reqs, [soft, TokenPrompt(ids)])), by_text, rtol=1e-5)
    with pytest.raises(ValueError, match="PROMPT_SLOT"):
        lm.loglikelihood(Request.batch(reqs))


def test_prompt_grad_matches_finite_differences():
    lm = tiny_bert(dtype=torch.float64)
    reqs = [(f"{PROMPT_SLOT} case is yes", " yes"), (f"input {PROMPT_SLOT}", " no fine")] * 3
    emb = np.random.default_rng(0).standard_normal((2, 16)) * 0.5
    loss, grad = lm.prompt_grad(reqs, SoftPrompt(emb))
    assert loss == pytest.approx(-lm.loglikelihood(Request.batch(reqs, SoftPrompt(emb))).mean(), rel=1e-6)
    h = 1e-5
    for i, j in [(0, 0), (1, 5), (0, 11)]:
        up, down = emb.copy(), emb.copy()
        up[i, j] += h
        down[i, j] -= h
        lo, hi = (lm.loglikelihood(Request.batch(reqs, SoftPrompt(e))).mean() for e in (down, up))
        fd = (lo - hi) / (2 * h)
        assert grad[i, j] == pytest.approx(fd, rel=1e-4, abs=1e-7)


def test_token_prompt_grad_is_the_grad_at_the_trigger_embeddings():
    lm = tiny_bert()
    reqs = [(f"{PROMPT_SLOT} case is yes", " yes")]
    ids = tuple(lm.tokenize("the odd"))
    loss_t, grad_t = lm.prompt_grad(reqs, TokenPrompt(ids))
    loss_s, grad_s = lm.prompt_grad(reqs, SoftPrompt(lm.token_embeddings()[list(ids)]))
    assert loss_t == pytest.approx(loss_s) and grad_t.shape == (2, 16)
    np.testing.assert_allclose(grad_t, grad_s, rtol=1e-5)


def test_autoprompt_lowers_the_label_loss_on_a_masked_lm():
    task, lm = planted_task(n_train=24, n_dev=16), tiny_bert(seed=1)
    method = AutoPrompt(n_triggers=3, n_candidates=6, batch_size=8, eval_every=100, n_eval=16)
    rng = np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    start = state.ids
    for _ in range(6):
        state, _ = method.step(state, task, lm, lm, rng)
    pair = [TokenPrompt(start), TokenPrompt(state.ids)]
    before, after = objective_table(task, pair, task.train, lm, "nll")[:, 0]
    assert state.accepted > 0 and after < before
    assert not {lm.tokenize(" yes")[0], lm.tokenize(" no")[0]} & set(state.ids)


def test_declares_no_generation_or_prefixes_and_tokenizer_must_have_a_mask():
    lm = tiny_bert()
    assert lm.capabilities == {PROMPT_GRAD, TOKEN_EMBEDDINGS, ANSWER_STATES}
    with pytest.raises(TypeError, match="causal LM"):
        lm.loglikelihood([Request("the", " film", PrefixPrompt(np.zeros((1, 4), np.float32)))])
    tok = PreTrainedTokenizerFast(tokenizer_object=lm.tokenizer.backend_tokenizer, pad_token="[PAD]")
    with pytest.raises(ValueError, match="cls"):
        MaskedLMBackend.from_model(lm.model, tok)


def test_answer_states_times_the_decoder_weight_give_the_mask_logprobs():
    # The state read at the mask, through the head's decoder (weight and bias), is the label's
    # log-probability that scoring reads: the probe and the scorer look at the same position.
    lm = tiny_bert()
    contexts = ["the film is good", "it is not fine", f"{PROMPT_SLOT} we it so odd"]
    prompt = TokenPrompt((7, 8))
    for ctx, p in ((contexts[:2], None), (contexts[2:], prompt)):
        states = lm.answer_states(ctx, p)
        logits = states.astype(np.float64) @ lm.output_embeddings().astype(np.float64).T
        logits += lm.model.get_output_embeddings().bias.detach().double().numpy()
        logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
        ll = lm.loglikelihood([Request(c, w, p) for c in ctx for w in (" yes", " no")]).reshape(len(ctx), 2)
        yes, no = lm.tokenize(" yes")[0], lm.tokenize(" no")[0]
        np.testing.assert_allclose(logp[:, [yes, no]], ll, atol=1e-4)
