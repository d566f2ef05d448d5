"""A scripted fake LM with a planted objective, so method tests check the algorithm, not a model.

The planted objective: an instruction's accuracy grows with how many of ``GOOD_WORDS`` it
contains. The fake scorer reads the instruction out of the context and answers an example
correctly iff a stable per-example hash falls under that accuracy. The fake proposer writes
instructions by recombining words it sees in its context with words from ``VOCAB``, so a
method that selects well climbs and a method that ignores scores does not.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from collections.abc import Sequence

import numpy as np

from methods.lm import GENERATE, PROMPT_SLOT, TOKEN_EMBEDDINGS, Request, SoftPrompt, TokenPrompt
from tasks.core import Example, Task

GOOD_WORDS = ("carefully", "sentiment", "label", "decide", "review")
BAD_WORDS = ("banana", "purple", "seven", "maybe", "the", "quickly", "random", "ignore")
VOCAB = GOOD_WORDS + BAD_WORDS
TEMPLATE = "{instruction}\nInput: {sentence}\nLabel:"
VERBALIZER = (" no", " yes")


def planted_task(n_train: int = 40, n_dev: int = 40, n_test: int = 40, seed: int = 0) -> Task:
    """A binary task whose examples state their own label, for the fake scorer to read."""
    rng = np.random.default_rng(seed)

    def split(offset: int, n: int) -> tuple[Example, ...]:
        labels = rng.integers(0, 2, size=n)
        return tuple(
            Example({"sentence": f"case {offset + i} is {VERBALIZER[y].strip()}"}, int(y))
            for i, y in enumerate(labels)
        )

    return Task(
        name="planted", template=TEMPLATE, verbalizer=VERBALIZER, instruction="the banana",
        train=split(0, n_train), dev=split(10_000, n_dev), test=split(20_000, n_test),
    )


def quality(instruction: str) -> float:
    """Planted accuracy of an instruction: 0.5 plus 0.1 per distinct good word present."""
    words = set(re.findall(r"[a-z]+", instruction.lower()))
    return 0.5 + 0.1 * sum(w in words for w in GOOD_WORDS)


def _unit(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for ``text``."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32


class PlantedLM:
    """Satisfies ``methods.lm.LM`` with a planted objective; counts the requests it served."""

    def __init__(self, dim: int = 8, vocab: int = 32) -> None:
        self.calls = 0
        self.requests = 0
        self.generated: list[str] = []
        self._emb = np.random.default_rng(0).standard_normal((vocab, dim)).astype(np.float32)

    capabilities = frozenset({GENERATE, TOKEN_EMBEDDINGS})

    def loglikelihood(self, requests: Sequence[Request]) -> np.ndarray:
        self.calls += 1
        self.requests += len(requests)
        return np.array([self._ll(c, k, p) for c, k, p in requests], dtype=np.float64)

    def _ll(self, context: str, continuation: str, prompt) -> float:
        instruction, _, rest = context.partition("\nInput: ")
        if PROMPT_SLOT in instruction:
            instruction = instruction.replace(PROMPT_SLOT, self._prompt_words(prompt))
        truth = " yes" if rest.split("\n")[0].endswith("yes") else " no"
        correct = _unit(rest) < quality(instruction)
        return 0.0 if (continuation == truth) == correct else -1.0

    def _prompt_words(self, prompt) -> str:
        if isinstance(prompt, TokenPrompt):
            return " ".join(VOCAB[i % len(VOCAB)] for i in prompt.ids)
        if isinstance(prompt, SoftPrompt):
            return " ".join(VOCAB[i % len(VOCAB)] for i in self.nearest_ids(prompt.embeddings))
        return ""

    def nearest_ids(self, embeddings: np.ndarray) -> list[int]:
        return [int(np.argmax(self._emb @ e)) for e in embeddings]

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        self.calls += 1
        rng = np.random.default_rng(seed)
        out = [[self._propose(c, rng) for _ in range(n)] for c in contexts]
        self.generated += [s for row in out for s in row]
        return out

    def _propose(self, context: str, rng: np.random.Generator) -> str:
        seen = [w for w in re.findall(r"[a-z]+", context.lower()) if w in VOCAB]
        pool = seen + list(VOCAB) if seen else list(VOCAB)
        k = int(rng.integers(2, 6))
        return " ".join(rng.choice(pool, size=k)).capitalize() + "."

    def token_embeddings(self) -> np.ndarray:
        return self._emb

    def tokenize(self, text: str) -> list[int]:
        return [VOCAB.index(w) for w in re.findall(r"[a-z]+", text.lower()) if w in VOCAB]

    def decode(self, ids) -> str:
        return " ".join(VOCAB[i % len(VOCAB)] for i in ids)


class WritingLog(PlantedLM):
    """:class:`PlantedLM` that keeps every generate context with each output it wrote for it, so a
    test can tell which meta-prompt (and so which parent prompt) a candidate was written from."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[tuple[str, str]] = []

    def generate(self, contexts, **kw):
        out = super().generate(contexts, **kw)
        self.written += [(c, s) for c, row in zip(contexts, out) for s in row]
        return out

    def contexts_for(self, text: str, read=None) -> list[str]:
        """Every context one of whose outputs, read as the method reads it (default: ``clean_one``), is ``text``."""
        from methods.text import clean_one

        read = read or clean_one
        return [c for c, s in self.written if read(s) == text]


def assert_outcomes(task: Task, record, examples: Sequence[Example]) -> None:
    """``record`` (an ``Evaluated``) names ``examples`` in order, with what a fresh planted scorer gets
    right on each under its prompt; on this accuracy task their mean is its score."""
    from methods.evaluate import predict
    from methods.lm import TextPrompt
    from tasks.core import example_key

    assert record.examples == tuple(example_key(ex) for ex in examples)
    preds = predict(task, TextPrompt(record.prompt), examples, PlantedLM())
    assert record.outcomes == tuple(float(task.is_correct(p, ex)) for p, ex in zip(preds, examples))
    assert abs(float(np.mean(record.outcomes)) - record.score) < 1e-9


def run_steps(method, task: Task, lm, steps: int, seed: int = 0):
    """Up to ``steps`` steps of ``method`` (fewer if it is done), ``lm`` as scorer and proposer.

    Returns:
        ``(state, reports)``.
    """
    rng = np.random.default_rng(seed)
    state = method.init(task, lm, lm, rng)
    reports = []
    for _ in range(steps):
        if method.done(state):
            break
        state, report = method.step(state, task, lm, lm, rng)
        reports.append(report)
    return state, reports


def resumed_and_uninterrupted(method, task: Task, make_lm, steps: int = 4, split: int = 2, seed: int = 0):
    """Final states of ``steps`` steps run straight through, and with a pickle round trip
    of (state, rng) after ``split`` steps, as a checkpoint and resume would do.

    Returns:
        ``(resumed_state, uninterrupted_state)``: equal when the state is a faithful checkpoint.
    """
    full, _ = run_steps(method, task, make_lm(), steps, seed)
    lm, rng = make_lm(), np.random.default_rng(seed)
    state = method.init(task, lm, lm, rng)
    for _ in range(split):
        state, _ = method.step(state, task, lm, lm, rng)
    state, rng = pickle.loads(pickle.dumps((state, rng)))
    for _ in range(steps - split):
        state, _ = method.step(state, task, lm, lm, rng)
    return state, full


class FewShotPlantedLM(PlantedLM):
    """:class:`PlantedLM` for instructions that carry few-shot workings out ("Input: ...\\nOutput: ...")
    before them: the scored input is the *last* "Input: " of a context, and everything before it
    counts as the instruction (so demonstrations are read as instruction words, never as the input)."""

    def _ll(self, context: str, continuation: str, prompt) -> float:
        instruction, sep, rest = context.rpartition("\nInput: ")
        shielded = instruction.replace("\nInput: ", "\nInput- ")  # the demos' inputs are not the input
        return super()._ll(f"{shielded}{sep}{rest}", continuation, prompt)


# ---------------------------------------------------------------------- a generative twin

GEN_TEMPLATE = "{instruction}\nInput: {sentence}\nOutput:"


def label_word(sentence: str) -> str:
    """The answer a planted sentence states about itself ("case 3 is yes" -> "yes")."""
    return "yes" if sentence.strip().endswith("yes") else "no"


def planted_gen_task(n_train: int = 20, n_dev: int = 20, n_test: int = 20, seed: int = 0):
    """The planted task as a generative one: the model writes the label word, exact match judges it."""
    from tasks.generative import GenExample, GenTask

    base = planted_task(n_train, n_dev, n_test, seed)

    def gen(split):
        return tuple(GenExample(dict(ex.inputs), (label_word(ex.inputs["sentence"]),)) for ex in split)

    return GenTask(
        name="planted_gen", template=GEN_TEMPLATE, instruction=base.instruction, train=gen(base.train),
        dev=gen(base.dev), test=gen(base.test), metric="exact_match", max_new_tokens=4, stop=("\n",),
    )


class PlantedGenLM(PlantedLM):
    """:class:`PlantedLM` that also answers the planted generative task and rates its outputs.

    An answer context (``GEN_TEMPLATE``, a one-line instruction) gets the sentence's label word iff
    the stable hash falls under the instruction's quality, else the other word. A rating context
    (ending in ``"\\nRating:"``, lines ``Input:`` and ``Output:``) has the top rating ``scale`` as its
    truth when the output is the input's label word, else 1; the scorer gives the truth iff the hash
    falls under the rating instruction's quality, else the other end of the scale. Every other
    context is a meta-prompt, answered as :class:`PlantedLM` does.
    """

    def __init__(self, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale

    def _ll(self, context: str, continuation: str, prompt) -> float:
        if not context.endswith("\nRating:"):
            return super()._ll(context, continuation, prompt)
        instruction, _, rest = context.partition("\nInput: ")
        lines = rest.split("\n")
        good = lines[1].removeprefix("Output:").strip() == label_word(lines[0])
        truth, other = (f" {self.scale}", " 1") if good else (" 1", f" {self.scale}")
        said = truth if _unit(rest) < quality(instruction) else other
        return 0.0 if continuation == said else -1.0

    def _propose(self, context: str, rng: np.random.Generator) -> str:
        instruction, sep, rest = context.rpartition("\nInput: ")
        if not sep or "\n" in instruction or not context.endswith("\nOutput:"):
            return super()._propose(context, rng)
        right = label_word(rest.split("\n")[0])
        wrong = "no" if right == "yes" else "yes"
        return " " + (right if _unit(rest) < quality(instruction) else wrong)
