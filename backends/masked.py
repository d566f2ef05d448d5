"""A frozen masked LM (BERT, RoBERTa) behind :class:`methods.lm.LM`, with prompt gradients and embeddings.

AutoPrompt's original setting: the continuation is predicted at ``[MASK]`` positions
appended to the context, ``[CLS] context [MASK]...[MASK] [SEP]``, one mask per
continuation token, and its log-likelihood is the sum of each token's log-probability at
its mask (the masks are predicted jointly in one pass, not left to right: exact for the
usual single-token labels, an independence approximation for longer ones).

Token or soft prompts are spliced at :data:`methods.lm.PROMPT_SLOT` as input embeddings, so
``prompt_grad`` gives the gradient with respect to the trigger or soft vectors. There is no
sampling and no prefix path: it declares neither capability, so a masked LM can be the
scorer of AutoPrompt (with its label search: ``answer_states`` reads the state at a mask),
prompt tuning and P-tuning but never a proposer or a prefix-tuning scorer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from methods.lm import (
    ANSWER_STATES, PROMPT_GRAD, PROMPT_SLOT, TOKEN_EMBEDDINGS, PrefixPrompt, Request, SoftPrompt, SplicedPrompt, TokenPrompt,
)

# Prefix states are spliced into a causal model's key/value cache; this backend has no such path.
PREFIX_NEEDS_CAUSAL = "prefix prompts need a causal LM (capability prefix_states); with a masked LM use soft_prompt"

# A request's input: (keys, number of masks). Keys >= 0 are vocabulary ids; key -j-1 is
# row j of the call's soft table (soft prompt vectors or trigger embeddings).
Encoded = tuple[tuple[int, ...], int]


class MaskedLMBackend:
    """Scores continuations at mask positions of a frozen masked LM.

    Args:
        model: a local model directory (or a model id already in the local Hugging Face cache).
        dtype: parameter dtype name, e.g. ``"float32"``.
        device: ``"cpu"``, ``"cuda:0"``, ...
        max_batch: sequences per forward pass.
    """

    capabilities = frozenset({PROMPT_GRAD, TOKEN_EMBEDDINGS, ANSWER_STATES})

    def __init__(self, model: str, dtype: str = "float32", device: str = "cpu", max_batch: int = 32) -> None:
        from transformers import AutoModelForMaskedLM, AutoTokenizer

        lm = AutoModelForMaskedLM.from_pretrained(model, dtype=getattr(torch, dtype), local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        self._setup(lm, tokenizer, device, max_batch)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, tokenizer, device: str = "cpu", max_batch: int = 32
    ) -> MaskedLMBackend:
        """Wrap an already-built masked LM and its tokenizer (tests; models built in-process)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, device, max_batch)
        return self

    def _setup(self, model, tokenizer, device: str, max_batch: int) -> None:
        for name in ("cls_token_id", "sep_token_id", "mask_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"a masked-LM tokenizer needs {name.removesuffix('_id')}; this one has none")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.embed = model.get_input_embeddings()
        self.max_batch = max(1, max_batch)
        self.max_len = int(getattr(model.config, "max_position_embeddings", 512))

    # ------------------------------------------------------------------ protocol

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        """Sum of the continuation tokens' log-probabilities at their masks: float64 ``[n]``."""
        requests = list(requests)
        if any(isinstance(r.prompt, PrefixPrompt) for r in requests):
            raise TypeError(PREFIX_NEEDS_CAUSAL)
        rows, table = self._encode(requests)
        targets = [tuple(self.tokenize(r.continuation)) for r in requests]
        out = np.zeros(len(requests), dtype=np.float64)
        with torch.inference_mode():
            soft = self._table(table)
            for s in range(0, len(rows), self.max_batch):
                logp = self._mask_logprobs(rows[s : s + self.max_batch], targets[s : s + self.max_batch], soft)
                out[s : s + len(logp)] = [float(x) for x in logp]
        return out

    def prompt_grad(self, requests: Sequence[tuple[str, str]], prompt: SplicedPrompt) -> tuple[float, np.ndarray]:
        """Mean NLL of the continuations and its gradient wrt the prompt's vectors ``[n_prompt, d]``."""
        if not isinstance(prompt, (TokenPrompt, SoftPrompt)):
            raise TypeError(f"prompt_grad needs a TokenPrompt or SoftPrompt, got {type(prompt).__name__}")
        if isinstance(prompt, TokenPrompt):  # triggers become soft vectors equal to their embeddings
            prompt = SoftPrompt(self.token_embeddings()[list(prompt.ids)])
        requests = Request.batch(requests, prompt)
        rows, table = self._encode(requests)
        targets = [tuple(self.tokenize(r.continuation)) for r in requests]
        leaf = self._table(table).requires_grad_(True)
        total = 0.0
        with torch.enable_grad():
            for s in range(0, len(rows), self.max_batch):
                logp = self._mask_logprobs(rows[s : s + self.max_batch], targets[s : s + self.max_batch], leaf)
                loss = -logp.sum() / max(len(requests), 1)
                loss.backward()  # per batch: activations of one batch at a time
                total += float(loss.detach())
        return total, leaf.grad.float().cpu().numpy()

    def token_embeddings(self) -> np.ndarray:
        """Input embedding matrix ``[vocab, d_model]``, float32."""
        return self.embed.weight.detach().float().cpu().numpy()

    def answer_states(self, contexts: Sequence[str], prompt: SplicedPrompt | None = None) -> np.ndarray:
        """Float32 ``[n, d]``: the state the MLM head's decoder reads at a ``[MASK]`` after each context
        (after the head's transform, where the reference's label search reads it)."""
        if isinstance(prompt, PrefixPrompt):
            raise TypeError(PREFIX_NEEDS_CAUSAL)
        rows, table = self._encode([Request(c, "", prompt) for c in contexts])
        rows = [(keys, 1) for keys, _ in rows]  # one mask: where the answer's first token is predicted
        seen: list[torch.Tensor] = []
        # The head's decoder is a Linear over the transformed state: its input is what we want.
        hook = self.model.get_output_embeddings().register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
        out = []
        try:
            with torch.inference_mode():
                soft = self._table(table)
                for s in range(0, len(rows), self.max_batch):
                    inputs, masks_at = self._masked_inputs(rows[s : s + self.max_batch], soft)
                    seen.clear()
                    self.model(**inputs)
                    at = torch.tensor([m[0] for m in masks_at], device=self.device)
                    out.append(seen[-1][torch.arange(len(at), device=self.device), at].float().cpu().numpy())
        finally:
            hook.remove()
        return np.concatenate(out) if out else np.zeros((0, self.embed.weight.shape[1]), dtype=np.float32)

    def output_embeddings(self) -> np.ndarray:
        """The MLM head decoder's weight ``[vocab, d]``, float32."""
        return self.model.get_output_embeddings().weight.detach().float().cpu().numpy()

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # ------------------------------------------------------------------ internals

    def _encode(self, requests: Sequence[Request]) -> tuple[list[Encoded], list[np.ndarray]]:
        """Keys and mask count per request, and the soft table the negative keys index."""
        table: list[np.ndarray] = []
        offsets: dict[int, tuple[int, ...]] = {}
        rows = []
        for context, continuation, p in requests:
            spliced = None
            if isinstance(p, TokenPrompt):
                spliced = tuple(int(i) for i in p.ids)
            elif isinstance(p, SoftPrompt):
                if id(p) not in offsets:
                    start = sum(len(t) for t in table)
                    table.append(np.asarray(p.embeddings, dtype=np.float64))
                    offsets[id(p)] = tuple(-(start + j) - 1 for j in range(len(table[-1])))
                spliced = offsets[id(p)]
            rows.append((self._context_keys(context, spliced), len(self.tokenize(continuation))))
        return rows, table

    def _context_keys(self, text: str, spliced: tuple[int, ...] | None) -> tuple[int, ...]:
        parts = text.split(PROMPT_SLOT)
        if spliced is None and len(parts) > 1:
            raise ValueError("context contains PROMPT_SLOT but no token or soft prompt was given")
        if spliced is not None and len(parts) == 1:
            parts = ["", text]  # no slot: the prompt goes first
        keys: tuple[int, ...] = tuple(self.tokenize(parts[0]))
        for part in parts[1:]:
            keys += spliced + tuple(self.tokenize(part))
        return keys

    def _table(self, table: list[np.ndarray]) -> torch.Tensor | None:
        if not table:
            return None
        return torch.from_numpy(np.concatenate(table)).to(self.device, self.embed.weight.dtype)

    def _masked_inputs(self, rows: Sequence[Encoded], soft: torch.Tensor | None) -> tuple[dict, list[range]]:
        """Model inputs ``[CLS] context [MASK]*m [SEP]`` (padded) for the rows, and each row's mask positions."""
        tok = self.tokenizer
        seqs, masks_at = [], []
        for keys, m in rows:
            keys = keys[max(0, len(keys) + m + 2 - self.max_len) :]  # keep the end of a long context
            seqs.append((tok.cls_token_id, *keys, *[tok.mask_token_id] * m, tok.sep_token_id))
            masks_at.append(range(1 + len(keys), 1 + len(keys) + m))
        width = max(len(s) for s in seqs)
        keys = torch.full((len(seqs), width), tok.pad_token_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            keys[i, : len(s)] = torch.tensor(s)
        attention = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
        inputs = {"inputs_embeds": self._embed(keys.to(self.device), soft), "attention_mask": attention.to(self.device)}
        return inputs, masks_at

    def _mask_logprobs(self, rows: Sequence[Encoded], targets, soft: torch.Tensor | None) -> torch.Tensor:
        """Summed log-probability of each row's target tokens at its masks: ``[len(rows)]``."""
        inputs, masks_at = self._masked_inputs(rows, soft)
        logits = self.model(**inputs).logits
        # Half-precision logits are upcast; float64 models stay float64 (finite-difference tests).
        logp = torch.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
        return torch.stack([
            sum((logp[i, pos, t] for pos, t in zip(masks_at[i], targets[i])), logp.new_zeros(()))
            for i in range(len(rows))
        ])

    def _embed(self, keys: torch.Tensor, soft: torch.Tensor | None) -> torch.Tensor:
        """Input embeddings ``[batch, width, d]``: vocabulary rows, soft rows at negative keys."""
        embeds = self.embed(keys.clamp(min=0))
        if soft is None or not bool((keys < 0).any()):
            return embeds
        where = keys < 0
        return embeds.masked_scatter(where[..., None], soft[(-keys[where] - 1)].to(embeds.dtype))

