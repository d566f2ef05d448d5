"""Answer extractors and metrics for generative tasks, on hand-made outputs and the real GSM8K/BBH files."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.answers import (
    after_answer_is, contains, exact_match, gsm8k_gold, last_number, normalize_choice, number_value, numeric_match,
    token_f1,
)


def test_gsm8k_gold_is_the_number_after_the_marker():
    assert gsm8k_gold("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18") == "18"
    assert gsm8k_gold("... #### 1,234") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no final answer here")


@pytest.mark.parametrize(
    ("output", "answer"),
    [
        ("16 - 3 - 4 = 9 eggs, 9 * 2 = 18. The answer is 18.", "18"),
        ("The answer is $1,234.50 in total, after 3 days", "$1,234.50"),
        ("First 5, then 7, so 12", "12"),  # no phrase: the last number
        ("the answer is: -4", "-4"),
        ("The answer is 3. Then again, the answer is 5 apples and 2 pears", "5"),  # the last phrase wins
        ("I do not know", None),
    ],
)
def test_the_answer_a_model_gave_is_found(output, answer):
    assert last_number(output) == answer


def test_numbers_compare_by_value():
    assert numeric_match("18.00", "18") and numeric_match("$1,234.50", "1234.5") and numeric_match("18.", "18")
    assert not numeric_match("18", "19") and not numeric_match(None, "18") and not numeric_match("x", "18")
    assert number_value("1,000,000") == 1e6 and number_value("twelve") is None


@settings(max_examples=60, deadline=None)
@given(value=st.integers(-10**9, 10**9), cents=st.integers(0, 99), other=st.integers(0, 10**6))
def test_a_written_number_reads_back_as_its_value(value, cents, other):
    written = f"{value:,}.{cents:02d}"
    assert number_value(written) == pytest.approx(float(f"{value}.{cents:02d}"))
    # the phrase marks the answer even when other numbers follow it
    output = f"We had {other} items. The answer is {written}, from {other + 1} before."
    assert numeric_match(last_number(output), f"{value}.{cents:02d}")


def test_every_gsm8k_solution_ends_in_its_own_gold(data_dir):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    golds = [gsm8k_gold(r["answer"]) for r in rows]
    assert all(number_value(g) is not None for g in golds)
    # the reference chain of thought, read as a model's output, gives the gold
    assert all(numeric_match(last_number(r["answer"]), g) for r, g in zip(rows, golds))


def test_bbh_answers_after_a_chain_of_thought():
    cot = "Let's think step by step.\nThe statement is false.\nSo the answer is False."
    assert after_answer_is(cot) == "False." and exact_match(after_answer_is(cot), "False")
    assert exact_match(after_answer_is("So the answer is (B).\nQ: next"), "(B)")
    assert exact_match("B", "(B)") and not exact_match("(C)", "(B)") and not exact_match(None, "(B)")
    assert after_answer_is("  valid\nmore text") == "valid" and after_answer_is("") == ""
    assert normalize_choice(" (a). ") == "a" and normalize_choice("] ] )") == "] ] )"  # dyck closings stay


def test_bbh_gold_targets_match_themselves_in_every_answer_format(data_dir):
    formats = set()
    for path in sorted((data_dir / "bbh" / "bbh").glob("*.json")):
        for ex in json.loads(path.read_text())["examples"][:20]:
            gold = ex["target"]
            assert exact_match(after_answer_is(f"Step by step.\nSo the answer is {gold}."), gold), (path.stem, gold)
            formats.add("letter" if normalize_choice(gold) != gold.lower().strip() else "text")
    assert formats == {"letter", "text"}


def test_free_form_metrics():
    assert token_f1("The cat sat.", "a cat sat") == 1.0
    assert token_f1("cat", "cat sat") == pytest.approx(2 / 3) and token_f1("dog", "cat") == 0.0
    assert token_f1(None, "cat") == 0.0 and token_f1("", "") == 1.0
    assert contains("I think it is Paris, France.", "paris") and not contains("London", "Paris")
