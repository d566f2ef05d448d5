"""Property-based tests (Hypothesis) of three places where one wrong character or key goes unnoticed.

- the user-table reader (``tasks.sources.read_table``) and the ``custom`` task built on it
  (``tasks.loaders.table``): cells, row counts, label ids and encodings survive the file;
- prompt splicing and forward-pass planning (``backends.splice``): spliced keys land at each
  slot, soft keys index their own rows, every target is read exactly once, batches stay in budget;
- the evaluation cache key (``pipelines.lm.cache``): distinct requests never share a score,
  identical ones always hit, and a prompt's key follows its array content and nothing else.

Examples are few and small so the file runs in seconds; the splice tests pay ~7 s once to import
``backends.tiny`` (torch). No example database is kept (``database=None``): a failure prints the
example to reproduce it. Hypothesis still writes its self-gitignored ``.hypothesis/`` cache.
"""

from __future__ import annotations

import codecs
import csv
import functools
import hashlib
import itertools
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from backends.splice import Encoder, batches, build_rows, encode_requests, plan_groups
from methods.lm import PROMPT_SLOT, PrefixPrompt, Request, SoftPrompt, TokenPrompt
from pipelines.lm.cache import CachedLM, EvalStore, prompt_id
from pipelines.lm.client import Meter
from tasks import loaders
from tasks.sources import read_table


def fast(n: int):
    """Few examples, no deadline (the machine may be busy), no example database in the checkout."""
    return settings(max_examples=n, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ user tables

# Characters worth hitting often: CSV's delimiter and quote, TSV's delimiter, every line break
# csv or str.splitlines knows (\x85 and \u2028 are not line breaks for a text file), a byte-order
# mark, spaces (the reader must not strip cells), a backslash, non-ASCII and an emoji.
SPECIAL = ',"\'\t\n\r \\\ufeff\x85\u2028\x0b\x1céß中😀'
# Lone surrogates (category Cs) cannot be written to a file in any encoding. NUL: the csv module
# refuses it before Python 3.11 ("line contains NUL"); from 3.11 it reads it like any character.
UNWRITABLE = "" if sys.version_info >= (3, 11) else "\x00"
# The reader parses TSV with quoting off (GLUE-style text holds bare quotes), so a TSV cell has
# no way to hold the delimiter or a line break: csv's writer refuses them under QUOTE_NONE.
TSV_UNQUOTABLE = "\t\r\n"
SINGLE_BYTE = ("latin-1", "cp1252", "koi8-r")


@functools.cache
def _decodable(encoding: str) -> tuple[str, ...]:
    """Every character a single-byte encoding can hold."""
    out = []
    for b in range(256):
        try:
            out.append(bytes([b]).decode(encoding))
        except UnicodeDecodeError:  # cp1252 leaves five bytes undefined
            pass
    return tuple(out)


def chars(fmt: str = "csv", encoding: str = "utf-8") -> st.SearchStrategy[str]:
    """One character a cell of this format can hold in this encoding."""
    banned = set(UNWRITABLE) | (set(TSV_UNQUOTABLE) if fmt == "tsv" else set())
    if encoding in SINGLE_BYTE:
        return st.sampled_from([c for c in _decodable(encoding) if c not in banned])
    special = st.sampled_from([c for c in SPECIAL if c not in banned])
    return st.one_of(special, st.characters(exclude_categories=("Cs",), exclude_characters=banned))


def cells(fmt: str = "csv", encoding: str = "utf-8", **kw) -> st.SearchStrategy[str]:
    return st.text(chars(fmt, encoding), max_size=kw.pop("max_size", 12), **kw)


@st.composite
def tables(draw, fmt: str, encoding: str = "utf-8") -> tuple[list[str], list[list[str]]]:
    """A header (distinct column names) and rows of cells, at least two columns.

    Two columns or more, because a one-column row holding an empty cell is a blank line in TSV.
    The first column name never starts with U+FEFF: read as utf-8 the file's first character
    would be a byte-order mark, which the reader drops on purpose (spreadsheet exports add one).
    """
    width = draw(st.integers(2, 3))
    header = draw(st.lists(cells(fmt, encoding, max_size=6), min_size=width, max_size=width, unique=True))
    assume(not header[0].startswith("\ufeff"))
    rows = draw(st.lists(st.lists(cells(fmt, encoding), min_size=width, max_size=width), min_size=1, max_size=6))
    return header, rows


def write_table(path: Path, fmt: str, header: list[str], rows: list[list], encoding: str = "utf-8",
                ensure_ascii: bool = False) -> Path:
    """The file a user's script would write: csv.writer for CSV and TSV, one json.dumps per line for JSONL."""
    with path.open("w", encoding=encoding, newline="") as f:
        if fmt == "jsonl":
            f.writelines(json.dumps(dict(zip(header, row)), ensure_ascii=ensure_ascii) + "\n" for row in rows)
        else:
            dialect = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None} if fmt == "tsv" else {}
            writer = csv.writer(f, **dialect)
            writer.writerow(header)
            writer.writerows(rows)
    return path


def assert_rows_read_back(read: list[tuple[int, dict]], header: list[str], rows: list[list[str]], fmt: str) -> None:
    assert len(read) == len(rows)
    for (_, got), row in zip(read, rows):
        assert list(got) == header  # same columns, in file order
        assert got == dict(zip(header, row))  # every cell exactly as written: no stripping, no unquoting
    line_numbers = [n for n, _ in read]
    assert line_numbers == sorted(set(line_numbers))  # error messages can point at one line per row
    if fmt != "csv":  # only quoted CSV cells can span lines
        assert line_numbers == [i + (1 if fmt == "jsonl" else 2) for i in range(len(rows))]


@fast(60)
@given(data=st.data(), fmt=st.sampled_from(["csv", "tsv", "jsonl"]), ensure_ascii=st.booleans())
def test_table_cells_and_row_count_round_trip(data, fmt, ensure_ascii):
    header, rows = data.draw(tables(fmt))
    with tempfile.TemporaryDirectory() as d:
        path = write_table(Path(d, f"t.{fmt}"), fmt, header, rows, ensure_ascii=ensure_ascii)
        assert_rows_read_back(read_table(str(path)), header, rows, fmt)


@fast(40)
@given(data=st.data(), fmt=st.sampled_from(["csv", "tsv", "jsonl"]),
       encoding=st.sampled_from([*SINGLE_BYTE, "utf-16", "gb18030"]))
def test_table_in_another_encoding_round_trips(data, fmt, encoding):
    """Single-byte code pages (cells drawn from what they can hold), UTF-16 (with its BOM) and GB18030."""
    header, rows = data.draw(tables(fmt, encoding))
    with tempfile.TemporaryDirectory() as d:
        # any other suffix: format= must then name the format, which this also checks
        path = write_table(Path(d, "t.txt"), fmt, header, rows, encoding=encoding)
        assert_rows_read_back(read_table(str(path), format=fmt, encoding=encoding), header, rows, fmt)


@fast(30)
@given(data=st.data(), fmt=st.sampled_from(["csv", "tsv", "jsonl"]),
       spelling=st.sampled_from(["utf-8", "UTF-8", "utf_8", "utf8", "UTF8"]))
def test_a_byte_order_mark_never_reaches_the_first_column(data, fmt, spelling):
    """Spreadsheet exports start UTF-8 files with a BOM; however utf-8 is spelled, it is not data."""
    header, rows = data.draw(tables(fmt))
    with tempfile.TemporaryDirectory() as d:
        path = write_table(Path(d, f"t.{fmt}"), fmt, header, rows, encoding="utf-8-sig")
        assert_rows_read_back(read_table(str(path), encoding=spelling), header, rows, fmt)


@pytest.mark.parametrize("spelling", ["U8", "UTF", "cp65001"])
@settings(max_examples=5, deadline=None, database=None, phases=[Phase.generate])  # fails at once: no shrinking
@given(data=st.data(), fmt=st.sampled_from(["csv", "tsv", "jsonl"]))
def test_a_byte_order_mark_is_dropped_for_every_name_of_utf8(spelling, data, fmt):
    assert codecs.lookup(spelling).name == "utf-8"  # Python reads these as utf-8 ...
    header, rows = data.draw(tables(fmt))
    with tempfile.TemporaryDirectory() as d:
        path = write_table(Path(d, f"t.{fmt}"), fmt, header, rows, encoding="utf-8-sig")
        assert_rows_read_back(read_table(str(path), encoding=spelling), header, rows, fmt)  # ... and so does the reader


def _word_cores(fmt: str) -> st.SearchStrategy[str]:
    """Label text with nothing to strip; often a digit, which may collide with an id."""
    text = cells(fmt, min_size=1, max_size=5).filter(lambda s: s == s.strip() and s)
    return st.one_of(st.integers(0, 4).map(str), text)


def _padded(draw, value: str) -> str:
    """The value with surrounding spaces, which the label lookup strips on both sides."""
    return draw(st.sampled_from(["", " ", "  "])) + value + draw(st.sampled_from(["", " "]))


def _expected_id(value: str, words: list[str]) -> int:
    """labels=None: a value naming a word (stripped) is that word's id, else it is an id itself."""
    for i, w in enumerate(words):
        if w.strip() == value.strip():
            return i
    return int(value)


def _label_column(draw, fmt: str, words: list[str], ys: list[int], given_labels: bool):
    """The label cells of rows whose label ids are ``ys``, the ``labels`` argument, and the ids expected.

    With ``labels``: raw values are ints or strings, distinct once stripped (what label_ids requires),
    padded with spaces in the config and in the file alike. Without: each row names its label by
    word or by id (an int in JSONL, text in CSV/TSV), and a word that reads as a digit wins.
    """
    if given_labels:
        raw = draw(st.lists(st.one_of(st.integers(-99, 99), _word_cores(fmt)), min_size=len(words),
                            max_size=len(words), unique_by=lambda v: str(v).strip()))
        values = [raw[y] if fmt == "jsonl" and isinstance(raw[y], int) else _padded(draw, str(raw[y])) for y in ys]
        return values, [v if isinstance(v, int) else _padded(draw, v) for v in raw], ys
    values = []
    for y in ys:
        by_word = draw(st.booleans())
        values.append(_padded(draw, words[y]) if by_word else y if fmt == "jsonl" else _padded(draw, str(y)))
    return values, None, [_expected_id(str(v), words) for v in values]


@fast(60)
@given(data=st.data(), fmt=st.sampled_from(["csv", "tsv", "jsonl"]), given_labels=st.booleans())
def test_table_maps_every_label_value_to_its_id(data, fmt, given_labels):
    """Raw labels (strings, ints; padded with spaces) map to the id of their place in labels or label_words."""
    k = data.draw(st.integers(2, 4))
    cores = data.draw(st.lists(_word_cores(fmt), min_size=k, max_size=k, unique=True))
    words = [data.draw(st.sampled_from(["", " "])) + c for c in cores]  # distinct and non-empty once stripped
    n = data.draw(st.integers(3, 8))
    ys = data.draw(st.lists(st.integers(0, k - 1), min_size=n, max_size=n))
    texts = data.draw(st.lists(cells(fmt), min_size=n, max_size=n))
    values, labels, expected = _label_column(data.draw, fmt, words, ys, given_labels)
    assume(len(set(expected)) >= 2)  # a table whose rows all share one label is refused, rightly
    with tempfile.TemporaryDirectory() as d:
        path = write_table(Path(d, f"t.{fmt}"), fmt, ["text", "label"], [list(r) for r in zip(texts, values)])
        task = loaders.table(str(path), ["text"], "label", words, labels=labels, n_train=1, n_dev=1)
    got = Counter((ex.inputs["text"], ex.label) for ex in task.train + task.dev + task.test)
    assert got == Counter(zip(texts, expected))


# ------------------------------------------------------------------ prompt splicing

@functools.cache
def tokenizer(add_bos: bool):
    from backends.tiny import tiny_tokenizer  # imports torch: only the splice tests pay for it

    return tiny_tokenizer(add_bos=add_bos)


def plain_ids(tok, text: str) -> tuple[int, ...]:
    return tuple(tok(text, add_special_tokens=False)["input_ids"])


def expected_context(tok, add_bos: bool, pieces: list[str], spliced: tuple[int, ...]) -> tuple[int, ...]:
    """What Encoder.context documents, spelled out: the pieces between slots tokenized on their own,
    ``spliced`` at each slot (before everything when there is none), BOS first when the tokenizer adds one,
    and a lone start token for a context that would otherwise be empty."""
    ids = [plain_ids(tok, p) for p in pieces]
    keys = list(spliced) + list(ids[0]) if len(pieces) == 1 else list(ids[0])
    for piece in ids[1:]:
        keys += [*spliced, *piece]
    keys = ([tok.bos_token_id] if add_bos else []) + keys
    return tuple(keys) if keys else (tok.bos_token_id,)


# Pieces of context text, with near-misses of the slot ("[[PROMPT]]" alone, a stray U+2063) among them.
PIECE = st.lists(st.one_of(chars(), st.sampled_from(["\u2063", "[[PROMPT]]", "Review: ", " the"])),
                 max_size=6).map("".join)


def split_pieces(pieces: list[str]) -> str:
    """The context holding a slot between consecutive pieces (checked not to form extra slots)."""
    text = PROMPT_SLOT.join(pieces)
    assume(text.split(PROMPT_SLOT) == pieces)
    return text


@fast(80)
@given(pieces=st.lists(PIECE, min_size=1, max_size=4), ids=st.lists(st.integers(0, 400), max_size=4).map(tuple),
       continuation=PIECE, add_bos=st.booleans())
def test_token_prompt_ids_sit_exactly_at_each_slot(pieces, ids, continuation, add_bos):
    """Compared with tokenizing the text between slots piece by piece (not the text without its slots:
    BPE would merge across the gap), as Encoder documents."""
    tok = tokenizer(add_bos)
    text = split_pieces(pieces)
    encoder = Encoder(tok)
    expected = expected_context(tok, add_bos, pieces, ids)
    assert encoder.context(text, ids) == expected
    contexts, conts, table = encode_requests(encoder, [Request(text, continuation, TokenPrompt(ids))])
    assert contexts == [expected]
    assert conts == [plain_ids(tok, continuation)]  # the continuation is tokenized on its own
    assert table.array() is None


@st.composite
def soft_requests(draw) -> list[Request]:
    """Requests sharing a few soft prompts (reused objects, and distinct objects with equal arrays)."""
    d = draw(st.integers(1, 3))
    prompts: list[SoftPrompt] = []
    for _ in range(draw(st.integers(1, 3))):
        if prompts and draw(st.booleans()):  # same numbers, another object: gets its own rows
            prompts.append(SoftPrompt(draw(st.sampled_from(prompts)).embeddings.copy()))
        else:
            n = draw(st.integers(1, 3))
            prompts.append(SoftPrompt(draw(arrays(np.float32, (n, d), elements=st.floats(-2, 2, width=32)))))
    out = []
    for _ in range(draw(st.integers(1, 6))):
        pieces = draw(st.lists(PIECE, min_size=1, max_size=3))
        out.append(Request(split_pieces(pieces), draw(PIECE), draw(st.sampled_from(prompts))))
    return out


@fast(60)
@given(requests=soft_requests(), add_bos=st.booleans())
def test_soft_prompt_keys_index_their_own_rows(requests, add_bos):
    """Key -k-1 is row k of the call's soft table and holds the right embedding row; a prompt object's keys
    sit at each slot; distinct objects (even with equal arrays) get disjoint ranges."""
    tok = tokenizer(add_bos)
    contexts, _, table = encode_requests(Encoder(tok), requests)
    soft = table.array()
    keys_of: dict[int, tuple[int, ...]] = {}
    for req, ctx in zip(requests, contexts):
        emb = req.prompt.embeddings
        keys = keys_of.setdefault(id(req.prompt), tuple(k for k in ctx if k < 0)[: emb.shape[0]])
        # the same object always gets the same keys, spliced at each slot like token ids would be
        assert ctx == expected_context(tok, add_bos, req.context.split(PROMPT_SLOT), keys)
        assert all(k < 0 for k in keys) and len(keys) == emb.shape[0]
        np.testing.assert_array_equal(soft[[-k - 1 for k in keys]], emb.astype(np.float64))
    ranges = [set(keys) for keys in keys_of.values()]
    assert sum(map(len, ranges)) == len(set().union(*ranges))  # distinct objects: disjoint key ranges
    assert soft.shape[0] == table.size == sum(map(len, ranges))


# ------------------------------------------------------------------ forward-pass planning

KEY = st.integers(-2, 3)  # few distinct keys (soft ones too), so contexts share and extend each other
TOKEN = st.integers(0, 3)


@st.composite
def keyed_requests(draw, max_base: int = 10) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Context keys and continuation ids: contexts cut from one base and extended, some repeated exactly."""
    base = tuple(draw(st.lists(KEY, max_size=max_base)))
    contexts, conts = [], []
    for _ in range(draw(st.integers(1, 8))):
        if contexts and draw(st.booleans()):
            ctx = draw(st.sampled_from(contexts))
        else:
            ctx = base[: draw(st.integers(0, len(base)))] + tuple(draw(st.lists(KEY, max_size=3)))
        contexts.append(ctx or (0,))  # the encoder never makes an empty context: it adds a start token
        conts.append(tuple(draw(st.lists(TOKEN, max_size=4))))
    return contexts, conts


@fast(150)
@given(keyed_requests())
def test_build_rows_reads_every_continuation_token_exactly_once(requests):
    contexts, conts = requests
    rows = build_rows(contexts, conts)
    read = Counter()
    for row in rows:
        assert row.targets  # a row with nothing to read is a wasted forward pass
        for pos, tok, i in row.targets:
            k = pos - (len(contexts[i]) - 1)  # which continuation token this logit predicts
            assert 0 <= k < len(conts[i]) and tok == conts[i][k]
            # the logit at pos sees exactly the context and the continuation tokens before k
            assert row.keys[: pos + 1] == (contexts[i] + conts[i])[: len(contexts[i]) + k]
            read[i, k] += 1
    assert read == Counter({(i, k): 1 for i, cont in enumerate(conts) for k in range(len(cont))})
    for a in rows:  # fewest rows: none is a prefix of (or equal to) another, it would have been folded in
        assert not any(b is not a and b.keys[: len(a.keys)] == a.keys for b in rows)


@fast(150)
@given(keyed_requests(max_base=16), st.integers(0, 8))
def test_plan_groups_keeps_every_row_once_and_targets_out_of_prefixes(requests, min_prefix):
    rows = build_rows(*requests)
    groups = plan_groups(rows, min_prefix=min_prefix)
    planned = [row for g in groups for row in g.rows]
    assert len(planned) == len(rows) and {id(r) for r in planned} == {id(r) for r in rows}
    for g in groups:
        assert g.prefix_len == 0 or g.prefix_len >= min_prefix
        for row in g.rows:
            assert row.keys[: g.prefix_len] == g.rows[0].keys[: g.prefix_len]  # the prefix really is shared
            # the cached prefix yields no logits: every target position must be in the suffix
            assert all(pos >= g.prefix_len for pos, _, _ in row.targets)


@fast(200)
@given(lengths=st.lists(st.integers(0, 64), max_size=40), max_tokens=st.integers(1, 512),
       min_tokens=st.integers(0, 512), waste=st.floats(0, 1))
def test_batches_keep_every_item_once_within_the_token_budget(lengths, max_tokens, min_tokens, waste):
    items = list(range(len(lengths)))  # indices: equal lengths stay distinguishable
    out = batches(items, lengths.__getitem__, max_tokens, min_tokens=min_tokens, waste=waste)
    assert all(out) and sorted(i for b in out for i in b) == items
    for b in out:
        if len(b) > 1:  # a single over-long item still gets a batch of its own
            assert len(b) * max(lengths[i] for i in b) <= max_tokens


# ------------------------------------------------------------------ evaluation cache key

def content(prompt) -> tuple:
    """What a prompt means, spelled out without prompt_id (a bug there must not hide in the fake LM)."""
    if prompt is None:
        return ("none",)
    if isinstance(prompt, TokenPrompt):
        return ("tokens", tuple(int(i) for i in prompt.ids))
    arr = prompt.embeddings if isinstance(prompt, SoftPrompt) else prompt.key_values
    return (type(prompt).__name__, arr.dtype.str, arr.shape, np.ascontiguousarray(arr).tobytes())


class FakeLM:
    """A deterministic LM: each request's score is a hash of its content and the model's salt."""

    def __init__(self, salt: str = "") -> None:
        self.salt, self.usage, self.calls = salt, Meter(), 0

    def score(self, r: Request) -> float:
        digest = hashlib.sha256(repr((self.salt, r.context, r.continuation, content(r.prompt))).encode()).digest()
        return -int.from_bytes(digest[:6], "big") / 2**40  # exact in float64 and through JSON

    def loglikelihood(self, requests):
        requests = list(requests)
        self.calls += 1
        self.usage.calls += 1
        self.usage.requests += len(requests)
        self.usage.tokens += sum(len(r.context) + len(r.continuation) for r in requests)
        return np.array([self.score(r) for r in requests], dtype=np.float64)

    def tokenize(self, text):
        return list(text.encode())

    def decode(self, ids):
        return bytes(ids).decode(errors="replace")


class FreshCache:
    """A CachedLM over a new SQLite file: Hypothesis examples must not see each other's results."""

    def __enter__(self) -> FreshCache:
        self._dir = tempfile.TemporaryDirectory()
        self.store = EvalStore(Path(self._dir.name, "evals.sqlite"))
        return self

    def lm(self, inner: FakeLM, key: str = "fake:0") -> CachedLM:
        return CachedLM(inner, self.store, key)

    def __exit__(self, *exc) -> None:
        self.store.close()
        self._dir.cleanup()


FLOAT_DTYPES = [np.float16, np.float32, np.float64]
ARRAY_CHANGES = ["element", "dtype", "byte order", "shape", "kind"]


def array_prompt(kind: str, arr: np.ndarray) -> SoftPrompt | PrefixPrompt:
    return SoftPrompt(arr) if kind == "soft" else PrefixPrompt(arr)


def changed_array(draw, arr: np.ndarray, change: str) -> np.ndarray:
    """``arr`` changed in one way only (``"kind"``: unchanged, the caller swaps Soft and Prefix)."""
    if change == "element":  # flip some bits of one byte of one element
        raw = bytearray(arr.tobytes())
        raw[draw(st.integers(0, len(raw) - 1))] ^= draw(st.integers(1, 255))
        return np.frombuffer(bytes(raw), dtype=arr.dtype).reshape(arr.shape)
    if change == "dtype":
        with np.errstate(over="ignore"):  # float64 -> float16 may overflow to inf: still another key
            return arr.astype(draw(st.sampled_from([t for t in FLOAT_DTYPES if t != arr.dtype.type])))
    if change == "byte order":  # the very same bytes, read as other numbers
        return arr.view(arr.dtype.newbyteorder())
    if change == "shape":  # the very same bytes, read as another shape (2-D, or with an extra axis)
        shapes = [(a, arr.size // a) for a in range(1, arr.size + 1) if arr.size % a == 0]
        shapes += [(1, *arr.shape), (*arr.shape, 1)]
        return arr.reshape(draw(st.sampled_from([s for s in shapes if s != arr.shape])))
    return arr


def resplit(draw, ids: tuple[int, ...]) -> tuple[int, ...]:
    """Other ids with the same decimal digits, e.g. (1, 23) -> (12, 3): what a careless join would confuse."""
    digits = "".join(map(str, ids)) or "0"
    cuts = sorted(draw(st.sets(st.integers(1, len(digits) - 1), max_size=3))) if len(digits) > 1 else []
    return tuple(int(digits[a:b]) for a, b in zip([0, *cuts], [*cuts, len(digits)]))


# Few shapes and values, and a big-endian dtype: array prompts of one shape and dtype come up often,
# and so do arrays of equal bytes and shape but another dtype (zeros, in either byte order).
SMALL_ARRAY = arrays(st.sampled_from([*FLOAT_DTYPES, np.dtype(">f4")]),
                     st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 2)]), elements=st.sampled_from([0.0, 1.0, -0.5]))
ARRAY_PROMPT = st.builds(array_prompt, st.sampled_from(["soft", "prefix"]), SMALL_ARRAY)
TOKEN_PROMPT = st.lists(st.integers(0, 120), max_size=4).map(lambda ids: TokenPrompt(tuple(ids)))
# Lone surrogates excluded: no tokenizer can encode them, and the cache key is UTF-8 JSON.
SHORT_TEXT = st.one_of(st.sampled_from(["", "a", "ab", " yes", "a" + PROMPT_SLOT]),
                       st.text(st.characters(exclude_categories=("Cs",)), max_size=5))


def near_miss(draw, prompt):
    """A prompt that differs from ``prompt`` in the least way it can."""
    if prompt is None:
        return TokenPrompt(())
    if isinstance(prompt, TokenPrompt):
        return TokenPrompt(resplit(draw, prompt.ids))
    kind = "soft" if isinstance(prompt, SoftPrompt) else "prefix"
    arr = prompt.embeddings if kind == "soft" else prompt.key_values
    change = draw(st.sampled_from(ARRAY_CHANGES))
    if change == "kind":
        kind = "prefix" if kind == "soft" else "soft"
    return array_prompt(kind, changed_array(draw, arr, change))


@st.composite
def request_lists(draw) -> list[Request]:
    """Every combination of a few contexts, continuations and prompts (some repeated, in any order).

    The prompts: none, token and array prompts, and near misses of them: requests that differ in
    one small part, which a colliding key would confuse.
    """
    contexts = draw(st.lists(SHORT_TEXT, min_size=1, max_size=2))
    continuations = draw(st.lists(SHORT_TEXT, min_size=1, max_size=2))
    prompts = [None, *draw(st.lists(TOKEN_PROMPT, min_size=1, max_size=2)),
               *draw(st.lists(ARRAY_PROMPT, min_size=1, max_size=2))]
    for _ in range(draw(st.integers(1, 4))):
        prompts.append(near_miss(draw, draw(st.sampled_from(prompts))))
    every = [Request(*p) for p in itertools.product(contexts, continuations, prompts)]
    return draw(st.permutations(every + draw(st.lists(st.sampled_from(every), max_size=3))))


@fast(80)
@given(requests=request_lists(), data=st.data())
def test_cached_scores_are_each_requests_own(requests, data):
    """Cached or not, every request gets the model's score for it: no key is shared by different requests."""
    inner = FakeLM()
    expected = [inner.score(r) for r in requests]
    split = data.draw(st.integers(0, len(requests)))
    with FreshCache() as cache:
        lm = cache.lm(inner)
        assert lm.loglikelihood(requests[:split]).tolist() == expected[:split]
        assert lm.loglikelihood(requests).tolist() == expected  # the first part now from the store
        other = FakeLM(salt="another model")  # same requests, another model key: its own answers
        assert cache.lm(other, "fake:1").loglikelihood(requests).tolist() == [other.score(r) for r in requests]


@fast(40)
@given(requests=request_lists())
def test_a_repeated_call_is_answered_entirely_from_the_cache(requests):
    """The same call again: no model call, one more whole-call cache hit, every request counted as a hit."""
    inner = FakeLM()
    with FreshCache() as cache:
        lm = cache.lm(inner)
        first = lm.loglikelihood(requests)
        calls, cache_calls, hits = inner.calls, inner.usage.cache_calls, inner.usage.cache_hits
        again = lm.loglikelihood(requests)
        assert inner.calls == calls  # nothing reached the model
        assert (inner.usage.cache_calls, inner.usage.cache_hits) == (cache_calls + 1, hits + len(requests))
        assert again.tolist() == first.tolist()


ANY_ARRAY = arrays(st.sampled_from(FLOAT_DTYPES), st.tuples(st.integers(1, 3), st.integers(1, 3)))  # NaN, inf, -0.0 too


@fast(60)
@given(arr=ANY_ARRAY, kind=st.sampled_from(["soft", "prefix"]), change=st.sampled_from(ARRAY_CHANGES), data=st.data())
def test_a_prompt_array_that_differs_anywhere_gets_another_key(arr, kind, change, data):
    """One element (any bit: -0.0 and NaN payloads count), the dtype or just its byte order, the shape, or
    Soft vs Prefix: each makes another key, and the cache then asks the model instead of reusing a score."""
    other_kind = ("prefix" if kind == "soft" else "soft") if change == "kind" else kind
    a, b = array_prompt(kind, arr), array_prompt(other_kind, changed_array(data.draw, arr, change))
    assert prompt_id(a) != prompt_id(b)
    inner = FakeLM()
    with FreshCache() as cache:
        lm = cache.lm(inner)
        lm.loglikelihood([Request("ctx", " yes", a)])
        assert lm.loglikelihood([Request("ctx", " yes", b)]).tolist() == [inner.score(Request("ctx", " yes", b))]
        assert inner.calls == 2  # the second prompt was not answered with the first's score


@fast(40)
@given(arr=ANY_ARRAY, kind=st.sampled_from(["soft", "prefix"]), ids=st.lists(st.integers(0, 10**6), max_size=5),
       how=st.sampled_from(["copy", "fortran", "strided view", "from bytes"]))
def test_the_same_prompt_content_in_another_object_gets_the_same_key(arr, kind, ids, how):
    """Keys follow content, not identity or memory layout; a token prompt's display text is not content."""
    same = {
        "copy": lambda: arr.copy(),
        "fortran": lambda: np.asfortranarray(arr),
        "strided view": lambda: np.stack([arr, np.zeros_like(arr)], axis=-1)[..., 0],  # non-contiguous
        "from bytes": lambda: np.frombuffer(arr.tobytes(), dtype=arr.dtype).reshape(arr.shape),
    }[how]()
    assert prompt_id(array_prompt(kind, same)) == prompt_id(array_prompt(kind, arr))
    tokens = TokenPrompt(tuple(ids))
    twin = TokenPrompt(tuple(np.array(ids, dtype=np.int64)), text="decoded text")  # numpy ints, a description
    assert prompt_id(twin) == prompt_id(tokens)
    inner = FakeLM()
    with FreshCache() as cache:
        lm = cache.lm(inner)
        first = lm.loglikelihood([Request("c", "k", array_prompt(kind, arr)), Request("c", "k", tokens)])
        again = lm.loglikelihood([Request("c", "k", array_prompt(kind, same)), Request("c", "k", twin)])
        assert inner.calls == 1 and again.tolist() == first.tolist()

