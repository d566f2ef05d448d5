"""Tiny random causal LMs and tokenizers built in-process: fast tests and smoke runs.

``model@lm.scorer=tiny`` runs a whole sweep on one of these (seconds, no files), which is
how the pipeline tests exercise Ray, Tune and the actors without the real model.

Nothing here touches the network or the disk: a byte-level BPE tokenizer is trained on a
few sentences (milliseconds), and a 2-layer Llama with random weights sits on top of it.

Example:
    >>> from backends.tiny import tiny_backend
    >>> lm = tiny_backend()                      # an HFBackend around a random model
    >>> lm.loglikelihood([Request("Review: fine\\nSentiment:", " positive")])
"""

from __future__ import annotations

import functools
import types

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from backends.hf import HFBackend

BOS, EOS = "<s>", "</s>"

# Enough varied text that common words get merged into multi-character tokens, so that
# tests see multi-token continuations and contexts that share long token prefixes.
_CORPUS = [
    "Classify the sentiment of the movie review as positive or negative.",
    "Review: a wonderful, moving film with great acting.\nSentiment: positive",
    "Review: a dull and lifeless story, badly written.\nSentiment: negative",
    "Question: what is two plus three? Answer: five",
    "The quick brown fox jumps over the lazy dog. The end.",
    "Instruction: read the text and answer with one word only.",
    "It was the best of times, it was the worst of times.",
]


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, add_bos: bool) -> str:
    """A trained byte-level BPE tokenizer, serialized (cached: training is the slow part)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 320, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes; no unknown tokens).

    Args:
        vocab_size: target vocabulary size (>= 258: 256 bytes plus BOS and EOS).
        add_bos: whether encoding with special tokens prepends BOS, like Llama-2's tokenizer.
    """
    tok = Tokenizer.from_str(_tokenizer_json(vocab_size, add_bos))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS)


def tiny_model(
    vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.float32
) -> LlamaForCausalLM:
    """A random Llama: ``hidden`` wide, ``layers`` deep, 4 heads (2 KV heads: GQA like SmolLM2).

    The initializer range is widened so that the next-token distribution is far from
    uniform: tests comparing log-likelihoods then compare numbers that differ.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(dtype)
    if dtype == torch.float64:
        _exact_norms(model)
    return model.eval()


def _rms_norm_in_input_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


def _exact_norms(model: torch.nn.Module) -> None:
    """Make RMSNorm compute in the model's dtype.

    Llama's RMSNorm always computes in float32, which would put float32 rounding noise
    into a float64 model and swamp finite-difference gradient checks.
    """
    for module in model.modules():
        if type(module).__name__ == "LlamaRMSNorm":
            module.forward = types.MethodType(_rms_norm_in_input_dtype, module)


def tiny_backend(add_bos: bool = False, dtype: torch.dtype | str = torch.float32, **kwargs) -> HFBackend:
    """An :class:`backends.hf.HFBackend` around a fresh tiny model and tokenizer.

    Its capabilities are the return type's, which is how the sweep reads them from this factory.

    Args:
        add_bos: tokenizer prepends BOS (exercises the BOS path of the backend).
        dtype: model parameter dtype (``torch.float64`` for finite-difference tests).
        **kwargs: passed to ``HFBackend.from_model`` (e.g. ``max_batch_tokens``, ``min_prefix``).
    """
    if isinstance(dtype, str):  # from a YAML
        dtype = getattr(torch, dtype)
    tokenizer = tiny_tokenizer(add_bos=add_bos)
    model = tiny_model(len(tokenizer), dtype=dtype)
    return HFBackend.from_model(model, tokenizer, **kwargs)
