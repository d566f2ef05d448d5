"""Export a trained soft prompt (or prefix) as a PEFT adapter, and read one back.

A prefix is exported as a ``PrefixTuningConfig`` adapter in inference layout (the flat
``[n_virtual, n_layers * 2 * kv_dim]`` states, PEFT's layout exactly; see
:mod:`backends.prefix`); PEFT prepends it to every sequence, where it was trained.

The adapter is an ordinary ``PromptTuningConfig`` checkpoint, so anyone can use it with
``PeftModel.from_pretrained(base_model, out_dir)``; a P-tuning run exports the prompt its
encoder produced (PEFT also keeps only the encoder's output for inference).

Placement: PEFT prepends the virtual tokens to the whole sequence, before any BOS token.
Here the prompt sits at the template's ``{instruction}`` slot. The two agree when the slot
opens the template and the tokenizer adds no BOS (the default tasks); for a template with
text before the slot, or a BOS-adding tokenizer, a reloaded adapter sees the prompt in a
different position and its scores differ from those measured during the sweep.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, PromptTuningInit, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

ADAPTER = "default"


def _as_model(base: str | PreTrainedModel) -> PreTrainedModel:
    """The base model: ``base`` itself, or loaded from a local directory or hub-cache name."""
    if isinstance(base, (str, Path)):
        return AutoModelForCausalLM.from_pretrained(str(base))
    return base


def _with_weight(model: PreTrainedModel, config, array: np.ndarray) -> PeftModel:
    """``model`` wrapped by PEFT with ``config``, its prompt-encoder weight set to ``array``."""
    peft_model = get_peft_model(model, config)
    weight = peft_model.prompt_encoder[ADAPTER].embedding.weight
    if tuple(weight.shape) != array.shape:
        raise ValueError(f"prompt is {array.shape} but this model's {config.peft_type} weight is {tuple(weight.shape)}")
    with torch.no_grad():
        weight.copy_(torch.from_numpy(array).to(weight.dtype))
    return peft_model


def save_soft_prompt(
    base_model: str | PreTrainedModel,
    embeddings: np.ndarray,
    out_dir: str | Path,
    tokenizer_name_or_path: str | None = None,
    init_text: str | None = None,
) -> Path:
    """Write ``embeddings`` as a PEFT prompt-tuning adapter.

    Args:
        base_model: the frozen model the prompt was trained on, or its name/path. A model
            object is wrapped in place (PEFT freezes its parameters; ours are frozen anyway).
        embeddings: ``[n_virtual, d_model]`` soft prompt.
        out_dir: directory for ``adapter_config.json`` and ``adapter_model.safetensors``.
        tokenizer_name_or_path: recorded in the adapter config (needed to record ``init_text``).
        init_text: the text the prompt was initialized from, recorded as PEFT's TEXT init.

    Returns:
        ``out_dir`` as a Path.
    """
    emb = np.array(embeddings, dtype=np.float32)  # a copy: arrays from Ray are read-only
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [n_virtual, d_model], got shape {emb.shape}")
    model = _as_model(base_model)
    d_model = model.get_input_embeddings().weight.shape[1]
    if emb.shape[1] != d_model:
        raise ValueError(f"embeddings are {emb.shape[1]} wide but the model's are {d_model}")
    # Built with RANDOM init so PEFT does not load a tokenizer; the weights are replaced below.
    config = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=emb.shape[0], token_dim=d_model,
        prompt_tuning_init=PromptTuningInit.RANDOM, tokenizer_name_or_path=tokenizer_name_or_path,
        base_model_name_or_path=base_model if isinstance(base_model, (str, Path)) else None,
    )
    peft_model = _with_weight(model, config, emb)
    if init_text is not None and tokenizer_name_or_path:
        # Provenance only: a loaded adapter is in inference mode and never re-runs the init.
        config.prompt_tuning_init = PromptTuningInit.TEXT
        config.prompt_tuning_init_text = init_text
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def load_soft_prompt(out_dir: str | Path, base_model: str | PreTrainedModel) -> np.ndarray:
    """The ``[n_virtual, d_model]`` float32 soft prompt of a PEFT prompt-tuning adapter.

    Args:
        out_dir: an adapter directory written by :func:`save_soft_prompt` (or by PEFT).
        base_model: the model it belongs to (or its name/path); wrapped in place.
    """
    peft_model = PeftModel.from_pretrained(_as_model(base_model), str(out_dir))
    return peft_model.get_prompt_embedding_to_save(ADAPTER).float().numpy()


def save_prefix(base_model: str | PreTrainedModel, key_values: np.ndarray, out_dir: str | Path) -> Path:
    """Write prefix states ``[n_virtual, n_layers * 2 * kv_dim]`` as a PEFT prefix-tuning adapter.

    Saved without the reparameterization MLP (``prefix_projection=False``): the states
    themselves are the adapter, as PEFT keeps them for inference.
    """
    flat = np.array(key_values, dtype=np.float32)  # a copy: arrays from Ray are read-only
    if flat.ndim != 2:
        raise ValueError(f"prefix must be [n_virtual, n_layers * 2 * kv_dim], got shape {flat.shape}")
    model = _as_model(base_model)
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=flat.shape[0], prefix_projection=False,
        base_model_name_or_path=base_model if isinstance(base_model, (str, Path)) else None,
    )
    peft_model = _with_weight(model, config, flat)
    out = Path(out_dir)
    peft_model.save_pretrained(str(out))
    return out


def load_prefix(out_dir: str | Path, base_model: str | PreTrainedModel) -> np.ndarray:
    """The ``[n_virtual, n_layers * 2 * kv_dim]`` float32 states of a PEFT prefix-tuning adapter."""
    peft_model = PeftModel.from_pretrained(_as_model(base_model), str(out_dir))
    return peft_model.prompt_encoder[ADAPTER].embedding.weight.detach().float().numpy()
