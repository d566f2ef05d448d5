"""Tests build tiny models from the package module (Ray actors import it from there too)."""

from backends.tiny import BOS, EOS, tiny_backend, tiny_model, tiny_tokenizer  # noqa: F401
