"""A soft prompt exported as a PEFT adapter reloads exactly and reproduces the model's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from backends.peft_export import load_soft_prompt, save_soft_prompt
from methods.lm import Request


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def soft(n: int = 5, d: int = 16) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, d)).astype(np.float32) * 0.3


def test_saved_prompt_reloads_equal(tmp_path):
    emb = soft()
    out = save_soft_prompt(tiny_llama(), emb, tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["num_virtual_tokens"] == 5
    np.testing.assert_array_equal(load_soft_prompt(out, tiny_llama()), emb)


def test_reloaded_adapter_forward_equals_prompt_spliced_before_the_ids(tmp_path):
    from peft import PeftModel

    emb = soft()
    save_soft_prompt(tiny_llama(), emb, tmp_path)
    ids = torch.tensor([[3, 17, 42, 8, 9]])
    base = tiny_llama()
    with torch.no_grad():
        manual = base(inputs_embeds=torch.cat([torch.from_numpy(emb)[None], base.get_input_embeddings()(ids)], 1))
    peft_model = PeftModel.from_pretrained(tiny_llama(), str(tmp_path)).eval()
    with torch.no_grad():
        out = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(out.logits, manual.logits, rtol=1e-5, atol=1e-5)
    # the prompt matters: without it the logits differ
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    assert not torch.allclose(out.logits[:, 5:], plain, atol=1e-3)


def test_init_text_is_recorded_when_a_tokenizer_is_named(tmp_path):
    save_soft_prompt(tiny_llama(), soft(), tmp_path, tokenizer_name_or_path="some/tokenizer", init_text="Classify")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["prompt_tuning_init"] == "TEXT" and config["prompt_tuning_init_text"] == "Classify"
    np.testing.assert_array_equal(load_soft_prompt(tmp_path, tiny_llama()), soft())


def test_shape_mismatch_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="wide"):
        save_soft_prompt(tiny_llama(), soft(d=8), tmp_path)
    with pytest.raises(ValueError, match="n_virtual"):
        save_soft_prompt(tiny_llama(), np.zeros(16, np.float32), tmp_path)


def test_a_trained_prompt_reloaded_by_peft_reproduces_the_backend_scores(tmp_path):
    """Slot at the template's start and no BOS: PEFT's prepending is our splice."""
    from peft import PeftModel

    from methods.autoprompt import label_requests
    from methods.lm import PROMPT_SLOT, SoftPrompt
    from methods.soft_prompt import SoftPromptTuning
    from tests.fakes import planted_task
    from tests.tiny import tiny_backend, tiny_model

    task, lm = planted_task(n_train=16, n_dev=8), tiny_backend()
    method, rng = SoftPromptTuning(n_virtual=3, lr=0.1, eval_every=100), np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    for _ in range(3):
        state, _ = method.step(state, task, lm, lm, rng)
    prompt = method.best(state).embeddings
    vocab = len(lm.tokenizer)
    save_soft_prompt(tiny_model(vocab), prompt, tmp_path)
    peft_model = PeftModel.from_pretrained(tiny_model(vocab), str(tmp_path)).eval()
    reqs = label_requests(task, task.dev)
    expected = lm.loglikelihood(Request.batch(reqs, SoftPrompt(prompt)))
    for (context, continuation), want in zip(reqs, expected):
        before, after = context.split(PROMPT_SLOT)
        assert before == ""  # the slot opens the template
        ctx, cont = lm.tokenize(after), lm.tokenize(continuation)
        ids = torch.tensor([ctx + cont])
        with torch.no_grad():
            logp = torch.log_softmax(peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0], -1)
        start = prompt.shape[0] + len(ctx) - 1
        got = sum(float(logp[start + k, t]) for k, t in enumerate(cont))
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
