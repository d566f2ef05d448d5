"""Generative tasks: loaders read the benchmarks as their papers do, generation is exact and batched,
and methods score candidates by the task metric on what the model wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from backends.sampling import cut
from backends.tiny import tiny_backend
from methods.evaluate import outputs, predict_many, score_prompts
from methods.lm import PROMPT_SLOT, PrefixPrompt, SoftPrompt, TokenPrompt, TextPrompt
from methods.protegi import error_block, sample_errors
from pipelines.lm.cache import CachedLM, EvalStore
from pipelines.lm.client import Meter
from tasks.core import TaskError
from tasks.gen_loaders import bbh_final, bbh_gen, gen_table, gsm8k, ii, read_bbh_shots
from tasks.generative import GenExample, GenTask, qa_template
from tests.conftest import DATA


def _task(examples, metric="exact_match", template="{instruction}\n\nQ: {q}\nA:", **kw) -> GenTask:
    exs = tuple(GenExample({"q": q}, tuple(a)) for q, a in examples)
    return GenTask("toy", template, "Answer.", exs, exs, exs, metric=metric, **kw)


# ------------------------------------------------------------------------------ the task kind

@pytest.mark.parametrize("position, expected", [
    ("before", "Be brief.\n\nQ: two?\nA:"),
    ("after", "Q: two?\nBe brief.\nA:"),
    ("answer", "Q: two?\nA: Be brief."),
])
def test_the_instruction_sits_where_the_template_puts_it_and_leaves_no_trace_when_empty(position, expected):
    task = _task([("two?", ["2"])], template=qa_template(position, "q"))
    assert task.render("Be brief.", task.test[0]) == expected
    empty = task.render("", task.test[0])
    assert empty == "Q: two?\nA:" or empty == "Q: two?\n\nA:"
    assert not empty.endswith(" ") and not empty.startswith("\n")


def test_an_example_scores_its_best_gold_and_a_malformed_output_is_wrong_not_a_crash():
    task = _task([("en: place", ["place", "endroit"])], metric="ii_em")
    assert task.example_score(" endroit", task.test[0]) == 1.0
    assert task.example_score(" lieu", task.test[0]) == 0.0
    num = _task([("2+2?", ["4"])], metric="gsm8k")
    assert num.is_correct("2 + 2 = 4. The answer is 4.", num.test[0])
    assert not num.is_correct("I cannot say.", num.test[0]) and num.extract("I cannot say.") is None
    assert num.score(["The answer is 4", "no"], num.test * 2) == 0.5


def test_a_bad_task_is_refused_in_one_line():
    with pytest.raises(TaskError, match="no non-empty gold"):
        _task([("q", [""])])
    with pytest.raises(TaskError, match="unknown metric"):
        _task([("q", ["a"])], metric="bleu")
    with pytest.raises(TaskError, match="instruction"):
        _task([("q", ["a"])], template="Q: {q}\nA:")


# ------------------------------------------------------------------------------ loaders

needs_data = pytest.mark.skipif(not (DATA / "gsm8k").is_dir(), reason="benchmark data not found")


@needs_data
def test_gsm8k_reads_the_final_number_and_keeps_shots_out_of_the_splits():
    task = gsm8k(str(DATA), n_train=30, n_dev=20, k_shot=4, n_test=0)
    assert len(task.test) == 1319 and len(task.train) == 30 and len(task.dev) == 20
    ex = task.test[0]
    assert ex.answers == ("18",) and ex.target.endswith("The answer is 18.") and "<<" not in ex.target
    shots = ex.inputs["shots"]
    assert shots.count("Q: ") == 4 and shots.count("The answer is") == 4
    questions = {e.inputs["question"] for e in task.train + task.dev}
    assert not any(f"Q: {q}\n" in shots for q in questions)  # the shots are train problems of their own
    # Every gold worked solution, read as a model output, scores full marks.
    assert task.score([e.target for e in task.train], task.train) == 1.0


@needs_data
def test_every_bbh_task_loads_both_ways_and_its_own_exemplars_score_full_marks():
    names = sorted(p.stem for p in (DATA / "bbh" / "bbh").glob("*.json"))
    assert len(names) == 27
    for name in names:
        for cot in (True, False):
            task = bbh_gen(str(DATA), name, cot=cot)
            assert task.instruction and len(task.test) > 0
            prompt = task.render(task.instruction, task.test[0])
            assert prompt.count("Q: ") == 4 and prompt.endswith("Let's think step by step." if cot else "A:")
        for question, worked in read_bbh_shots(DATA / "bbh" / "cot-prompts" / f"{name}.txt"):
            gold = GenExample({"input": question}, (bbh_final(worked),))
            assert task.example_score(worked, gold) == 1.0, (name, worked[-60:])
            assert task.example_score(bbh_final(worked), gold) == 1.0  # answer-only output


@needs_data
def test_instruction_induction_follows_apes_protocol_and_metrics():
    names = sorted(p.stem for p in (DATA / "instruction_induction" / "raw" / "induce").glob("*.json"))
    assert len(names) == 24
    metrics = {}
    for name in names:
        task = ii(str(DATA), name)
        metrics[name] = task.metric
        assert len(task.train) <= 100 and len(task.dev) <= 20 and task.stop == ("\n",)
        tests = {tuple(sorted(e.inputs.items())) for e in task.test}
        assert not any(tuple(sorted(e.inputs.items())) in tests for e in task.dev) or name in ("cause_and_effect",)
    assert metrics["synonyms"] == "ii_contains" and metrics["taxonomy_animal"] == "ii_set"
    assert metrics["common_concept"] == "ii_f1" and metrics["antonyms"] == "ii_em"
    de = ii(str(DATA), "translation_en-de")
    assert all(len(e.answers) >= 1 and all(a.strip() for a in e.answers) for e in de.test)
    assert de.example_score("Zeit", GenExample({"input": "time"}, ("Zeiten", "Zeit"))) == 1.0
    with pytest.raises(TaskError, match="known instruction-induction tasks"):
        ii(str(DATA), "antonym")


def test_a_users_generative_table_reads_split_files_and_lists_of_answers(tmp_path):
    rows = [{"q": f"{i}+1", "a": [str(i + 1), f"{i + 1}.0"]} for i in range(12)]
    for name, part in (("train", rows[:6]), ("dev", rows[6:9]), ("test", rows[9:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    task = gen_table(str(tmp_path / "train.jsonl"), ["q"], "a", metric="numeric", dev_path=str(tmp_path / "dev.jsonl"),
                     test_path=str(tmp_path / "test.jsonl"), n_train=0, n_dev=0)
    assert (len(task.train), len(task.dev), len(task.test)) == (6, 3, 3)
    assert task.test[0].answers == ("10", "10.0") and task.render("Add.", task.test[0]) == "Add.\n\nQ: 9+1\nOutput:"
    with pytest.raises(TaskError, match="both dev_path and test_path"):
        gen_table(str(tmp_path / "train.jsonl"), ["q"], "a", dev_path=str(tmp_path / "dev.jsonl"))
    with pytest.raises(TaskError, match="unknown metric"):
        gen_table(str(tmp_path / "train.jsonl"), ["q"], "a", metric="rouge")


# ------------------------------------------------------------------------------ generation

@pytest.fixture(scope="module")
def tiny():
    return tiny_backend()


def _reference(backend, keys: list[int], max_new_tokens: int, stop=()) -> str:
    """Greedy text from transformers' own ``generate`` on the same ids (one example at a time)."""
    ids = torch.tensor([keys])
    out = backend.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=0)
    return cut(backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), stop)


SHARED = "Follow the pattern and answer with one word please.\n\n"
CONTEXTS = [SHARED + f"Q: {w}\nA:" for w in ("cat", "a much longer question here", "dog", "x")] + ["Q: alone\nA:"]


def test_batched_shared_prefix_generation_equals_one_at_a_time_generate(tiny):
    ref = [_reference(tiny, list(tiny.encoder.context(c, None)), 12, ("\n",)) for c in CONTEXTS]
    for min_prefix in (8, 0):  # with the shared prefix run once, and without
        tiny.min_prefix = min_prefix
        got = tiny.generate(CONTEXTS, max_new_tokens=12, temperature=0.0, stop=("\n",))
        assert [g[0] for g in got] == ref
    tiny.min_prefix = 8
    before = tiny.usage()["forward_tokens"]
    tiny.generate(CONTEXTS[:4], max_new_tokens=1, temperature=0.0)
    spent = tiny.usage()["forward_tokens"] - before
    assert spent < sum(len(tiny.encoder.context(c, None)) for c in CONTEXTS[:4])  # the prefix ran once


def test_spliced_prompts_generate_as_if_their_tokens_were_in_the_context(tiny):
    ids = tuple(tiny.tokenize(" be brief"))
    contexts = [f"{PROMPT_SLOT}\nQ: {w}\nA:" for w in ("cat", "dog")]
    ref = [_reference(tiny, list(tiny.encoder.context(c, ids)), 8) for c in contexts]
    assert [g[0] for g in tiny.generate(contexts, max_new_tokens=8, temperature=0.0, prompt=TokenPrompt(ids))] == ref
    soft = SoftPrompt(tiny.token_embeddings()[list(ids)])
    assert [g[0] for g in tiny.generate(contexts, max_new_tokens=8, temperature=0.0, prompt=soft)] == ref
    prefix = PrefixPrompt(tiny.prefix_states("Be brief."))
    plain = ["\nQ: cat\nA:", "\nQ: dog\nA:"]
    whole = [list(tiny.encoder.context("Be brief.", None)) + list(tiny.encoder.ids([c])[0]) for c in plain]
    expected = [_reference(tiny, k, 8) for k in whole]
    assert [g[0] for g in tiny.generate(plain, max_new_tokens=8, temperature=0.0, prompt=prefix)] == expected


def test_generation_past_the_context_window_is_refused(tiny):
    with pytest.raises(ValueError, match="plus max_new_tokens"):
        tiny.generate(["Q: hi\nA:"], max_new_tokens=10_000, temperature=0.0)


class CountingLM:
    """Greedy 'generation' that answers each context's last word and counts what reached it."""

    def __init__(self) -> None:
        self.usage, self.seen, self.calls = Meter(), [], 0

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=(), prompt=None):
        self.calls += 1
        self.seen += list(contexts)
        self.usage.tokens += sum(map(len, contexts))
        return [[" " + c.split()[-2].rstrip("?")] * n for c in contexts]


def test_greedy_outputs_are_cached_per_context_and_only_misses_are_generated(tmp_path):
    inner = CountingLM()
    lm = CachedLM(inner, EvalStore(tmp_path / "c.sqlite"), "m")
    a = lm.generate(["Q: one?\nA:", "Q: two?\nA:"], max_new_tokens=4, temperature=0.0)
    b = lm.generate(["Q: two?\nA:", "Q: three?\nA:", "Q: one?\nA:"], max_new_tokens=4, temperature=0.0)
    assert a == [[" one"], [" two"]] and b == [[" two"], [" three"], [" one"]]
    assert inner.seen == ["Q: one?\nA:", "Q: two?\nA:", "Q: three?\nA:"]
    lm.generate(["Q: one?\nA:"], max_new_tokens=5, temperature=0.0)  # other settings: a new entry
    assert inner.seen[-1] == "Q: one?\nA:" and inner.calls == 3
    assert inner.usage.cache_hits == 2


# ------------------------------------------------------------------------------ methods

def test_methods_score_a_generative_task_by_its_metric_on_greedy_outputs_in_one_call():
    task = _task([("cat?", ["cat"]), ("dog?", ["dog"]), ("fox?", ["hen"])], template="{instruction} Q: {q} A:")
    lm = CountingLM()
    scores = score_prompts(task, [TextPrompt("Say it."), TextPrompt("Repeat.")], task.dev, lm)
    assert scores == [pytest.approx(2 / 3)] * 2 and lm.calls == 1 and len(lm.seen) == 6
    (preds,) = predict_many(task, [TextPrompt("Say it.")], task.dev, lm)
    errors = sample_errors(task, task.dev, np.array(preds, dtype=object), 5, np.random.default_rng(0))
    assert [ex.answers for ex, _ in errors] == [("hen",)]
    block = error_block(task, errors)
    assert "Label: hen" in block and "Prediction: fox" in block  # the model's own output is shown
    assert outputs(task, TextPrompt("Say it."), [], lm) == []


class SpyLM:
    """Forwards to a backend and records, per ``generate`` call, the kind of prompt it carried."""

    def __init__(self, inner) -> None:
        self.inner, self.prompts = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, contexts, **kw):
        self.prompts.append(type(kw.get("prompt")).__name__)
        return self.inner.generate(contexts, **kw)


@pytest.mark.parametrize("method", ["soft_prompt", "prefix", "autoprompt"])
def test_gradient_methods_train_on_the_gold_answer_and_are_evaluated_by_generation(tiny, method):
    from methods.autoprompt import AutoPrompt, label_requests
    from methods.soft_prompt import SoftPromptTuning

    task = _task([(w, [w[::-1]]) for w in ("ab", "cd", "ef", "gh", "ij", "kl")], template="{instruction} Q: {q} A:",
                 max_new_tokens=3)
    assert label_requests(task, task.train[:1])[0] == (f"{PROMPT_SLOT} Q: ab A:", " ba")
    built = {"soft_prompt": SoftPromptTuning(n_virtual=2, eval_every=1, batch_size=4, init_text="Reverse."),
             "prefix": SoftPromptTuning(n_virtual=2, space="prefix", eval_every=1, batch_size=4, init_text="Reverse."),
             "autoprompt": AutoPrompt(n_triggers=2, n_candidates=4, batch_size=4, eval_every=1)}[method]
    lm, rng = SpyLM(tiny), np.random.default_rng(0)
    state = built.init(task, lm, lm, rng)
    state, report = built.step(state, task, lm, lm, rng)
    assert 0.0 <= report.metrics["dev_score"] <= 1.0 and report.evaluated
    expected = {"soft_prompt": "SoftPrompt", "prefix": "PrefixPrompt", "autoprompt": "TokenPrompt"}[method]
    assert lm.prompts == [expected]  # the dev evaluation generated, under the trained prompt


def test_jsonl_records_keep_non_ascii_text_readable_and_whole(tmp_path):
    from pipelines.results import read_jsonl, write_jsonl

    records = [{"output": "l'été dernier"}, {"output": "one\u2028line"}, {"output": "ok"}]
    write_jsonl(tmp_path / "o.jsonl", records)
    assert "l'été dernier" in (tmp_path / "o.jsonl").read_text(encoding="utf-8")  # not \u00e9-escaped
    assert read_jsonl(tmp_path / "o.jsonl") == records  # a line separator inside a record splits nothing
