"""Frozen models behind the :mod:`methods.lm` contract.

Every backend scores continuations, tokenizes and decodes, and declares in its
``capabilities`` class attribute which optional calls it also serves (generation, prompt
gradients, prefix states, token embeddings, prompt export). The sweep compares what each
method needs with what the configured backends declare before anything starts.

- :mod:`backends.hf`: a local Hugging Face causal LM (plain PyTorch, or DeepSpeed inference
  on a GPU); every capability.
- :mod:`backends.masked`: a masked LM (BERT, RoBERTa), AutoPrompt's original setting; scores
  at mask positions, splices token and soft prompts, gives their gradients; no generation.
- :mod:`backends.openai_compat`: an OpenAI-compatible HTTP endpoint; scores first tokens and
  generates; text prompts only.
- :mod:`backends.tiny`: a random two-layer Llama built in-process, for tests and smoke runs.

Helpers: :mod:`backends.splice` (requests to token rows and a forward plan),
:mod:`backends.prefix` (PEFT's prefix layout), :mod:`backends.sampling`,
:mod:`backends.loading` (finding, converting and caching models), :mod:`backends.peft_export`.

Nothing here imports Ray, Hydra, OmegaConf or W&B (``tests/test_layering.py``): a backend is an
ordinary object built from flat arguments, usable in a notebook, and the pipeline serves it
from Ray actors.

Adding a backend is one ``.py`` here (a class with ``capabilities`` and the calls it
declares), one YAML in ``conf/model/`` whose ``_target_`` names the class, and one test.
"""
