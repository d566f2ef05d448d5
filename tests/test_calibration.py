"""Intent-based prompt calibration against the planted fake LM."""

import csv
import dataclasses
import pickle
import re
from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy.stats import spearmanr

from methods.calibration import Calibration, clean_input, ranker_seed, written_field
from tasks.core import Example, Task, example_key
from tests.fakes import (
    PlantedGenLM, PlantedLM, assert_outcomes, label_word, planted_gen_task, planted_task, quality,
    resumed_and_uninterrupted, run_steps,
)

ROOT = Path(__file__).resolve().parents[1]
# An annotator instruction with every planted good word: the fake annotator is then always right.
INTENT = "carefully decide the sentiment label of the review"
TARGET = re.compile(r"whose correct answer is (\w+)\.")

run = run_steps


def is_case_context(c: str) -> bool:
    return "Prompt under test:" in c


def is_suggestion(c: str) -> bool:
    return c.endswith("New prompt:")


class RecordingLM(PlantedLM):
    """Keeps every generate round and every scored context."""

    def __init__(self):
        super().__init__()
        self.rounds, self.scored = [], []

    def generate(self, contexts, **kw):
        self.rounds.append(list(contexts))
        return super().generate(contexts, **kw)

    def loglikelihood(self, requests):
        self.scored.append([r.context for r in requests])
        return super().loglikelihood(requests)


class CaseWriter(RecordingLM):
    """Writes each boundary case as "tricky case N is <word>": the word its context asked for, or,
    for every ``lie``-th case, the other word (a case whose intended label is wrong)."""

    def __init__(self, lie: int = 0, suggestions=None):
        super().__init__()
        self.lie, self.suggestions, self.written = lie, suggestions, 0

    def generate(self, contexts, **kw):
        outs = super().generate(contexts, **kw)
        for k, c in enumerate(contexts):
            target = TARGET.search(c)
            if is_case_context(c) and target:
                self.written += 1
                word = target.group(1)
                if self.lie and self.written % self.lie == 0:
                    word = "no" if word == "yes" else "yes"
                outs[k] = [f"tricky case {self.written} is {word}"]
            elif is_suggestion(c) and self.suggestions:
                outs[k] = list(self.suggestions[: kw.get("n", 1)])
        return outs


def test_calibration_climbs_the_planted_objective():
    task, lm = planted_task(n_dev=60), PlantedLM()
    method = Calibration(n_proposals=6, n_eval=0, annotator_instruction=INTENT, patience=0)
    state, reports = run(method, task, lm, steps=8)
    assert quality(method.best(state).text) >= quality(task.instruction) + 0.2
    assert reports[0].evaluated[0].kind == "seed" and reports[0].evaluated[0].prompt == task.instruction
    assert reports[-1].metrics["dev_score"] > reports[0].metrics["dev_score"]
    assert reports[-1].metrics["benchmark"] > reports[0].metrics["benchmark"]


class SplitLM(CaseWriter):
    """A scorer on which one prompt is right on dev and wrong on written cases, another the reverse."""

    def _ll(self, context, continuation, prompt):
        instruction, _, rest = context.partition("\nInput: ")
        truth = " yes" if rest.split("\n")[0].endswith("yes") else " no"
        if "dev expert" in instruction.lower():
            right = rest.startswith("case")
        elif "case expert" in instruction.lower():
            right = rest.startswith("tricky")
        else:
            return super()._ll(context, continuation, prompt)
        return 0.0 if (continuation == truth) == right else -1.0


def test_candidates_are_ranked_on_the_annotated_cases_not_on_dev():
    task = planted_task(n_dev=40)
    lm = SplitLM(suggestions=["Dev expert prompt", "Case expert prompt"])
    method = Calibration(n_real=0, n_synthetic=6, n_proposals=2, n_eval=0, annotator_instruction=INTENT, patience=0)
    state, reports = run(method, task, lm, steps=3)
    second = {e.prompt: e.score for e in reports[1].evaluated}
    assert second["Dev expert prompt"] == 1.0 and second["Case expert prompt"] == 0.0  # dev would pick the other one
    assert method.best(state).text == "Case expert prompt"
    assert reports[1].metrics["synthetic_score"] == 1.0
    # dev_score is the selected prompt's dev score, not the best one seen
    assert reports[1].metrics["dev_score"] == 0.0
    dev_pick = dataclasses.replace(method, select_on="dev")
    state, _ = run(dev_pick, task, SplitLM(suggestions=["Dev expert prompt", "Case expert prompt"]), steps=3)
    assert dev_pick.best(state).text == "Dev expert prompt"


def test_every_prompt_is_scored_on_all_labelled_cases_written_so_far():
    task, lm = planted_task(), CaseWriter()
    method = Calibration(n_real=0, n_synthetic=3, n_proposals=2, annotator_instruction=INTENT, patience=0)
    state, reports = run(method, task, lm, steps=3)
    written = [c for c in state.main.cases if not c.real]
    assert len(written) == 9 and [r.metrics["benchmark"] for r in reports] == [3, 6, 9]
    last_scoring = lm.scored[-1]  # the scorer's call of step 3 (the annotator's came before it)
    prompts = {c.split("\nInput: ")[0] for c in last_scoring}
    assert len(prompts) >= 2  # the selected prompt and step 2's suggestions
    for case in written:
        shown = f"\nInput: {case.value('sentence')}\nLabel:"
        assert {c.split("\nInput: ")[0] for c in last_scoring if c.endswith(shown)} == prompts


def test_the_annotator_relabels_cases_whose_intended_label_is_wrong_and_counts_them():
    task, lm = planted_task(), CaseWriter(lie=3)
    method = Calibration(n_real=0, n_synthetic=6, annotator_instruction=INTENT, patience=0)
    state, reports = run(method, task, lm, steps=2)
    written = [c for c in state.main.cases if not c.real]
    assert len(written) == 12
    for case in written:
        assert task.verbalizer[case.label].strip() == label_word(case.value("sentence"))  # the annotator is right
    changed = [c for c in written if c.label != c.intended]
    assert len(changed) == 4  # every third case was written for the wrong label
    assert [r.metrics["annotator_changed_step"] for r in reports] == [2, 2]
    assert reports[-1].metrics["annotator_changed"] == 4


def test_the_llm_annotator_reads_the_tasks_own_instruction_not_the_prompt_under_test():
    task = planted_task()
    scorer, proposer = PlantedLM(), CaseWriter()
    method = Calibration(n_real=4, n_synthetic=4, n_proposals=4, patience=0)
    rng = np.random.default_rng(0)
    state = method.init(task, scorer, proposer, rng)
    for _ in range(4):
        state, _ = method.step(state, task, scorer, proposer, rng)
    under_test = {re.search(r"Prompt under test: (.*)\n", c).group(1) for r in proposer.rounds for c in r
                  if is_case_context(c)}
    assert under_test - {task.instruction}  # cases were written against suggested prompts
    annotated = [c for call in proposer.scored for c in call]
    assert annotated and all(c.startswith(task.instruction + "\nInput: ") for c in annotated)


def filled(path: Path, labels: dict[str, str]) -> None:
    """What a person does in a spreadsheet: type labels into some rows and save."""
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["label"] = labels.get(row["id"], row["label"])
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def read(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_annotation_file_round_trip(tmp_path):
    path = tmp_path / "cases.csv"
    task = planted_task()
    method = Calibration(n_real=0, n_synthetic=4, annotator="file", annotation_file=str(path), patience=0)
    lm, rng = CaseWriter(), np.random.default_rng(0)
    state = method.init(task, lm, lm, rng)
    state, first = method.step(state, task, lm, lm, rng)
    rows = read(path)
    assert [r["id"] for r in rows] == ["0", "1", "2", "3"] and all(r["label"] == "" for r in rows)
    assert list(rows[0]) == ["id", "step", "sentence", "intended", "label"]
    assert first.metrics["waiting"] == 4 and first.metrics["benchmark"] == 0
    assert [e.kind for e in first.evaluated] == ["seed"] and method.best(state).text == task.instruction

    # the sweep is checkpointed and resumed while a person labels two rows, one against its intent
    state, rng = pickle.loads(pickle.dumps((state, rng)))
    lm_then = pickle.loads(pickle.dumps(lm))  # a resumed trial's LM answers as this one would
    wrong = "yes" if rows[1]["intended"] == "no" else "no"
    filled(path, {"0": rows[0]["intended"].upper(), "1": wrong})
    scored_before = len(lm.scored)
    resumed = pickle.loads(pickle.dumps((state, rng)))
    state, second = method.step(state, task, lm, lm, rng)
    labelled = {c.id: c for c in state.main.cases if c.label is not None}
    assert sorted(labelled) == [0, 1]
    assert task.verbalizer[labelled[1].label].strip() == wrong and labelled[1].intended != labelled[1].label
    assert second.metrics["annotator_changed"] == 1 and second.metrics["waiting"] == 2 + 4
    scored = [c for call in lm.scored[scored_before:] for c in call]
    texts = {c.split("\nInput: ")[1].split("\nLabel:")[0] for c in scored}
    assert {rows[0]["sentence"], rows[1]["sentence"]} <= texts  # the labelled cases are the benchmark
    assert not {rows[2]["sentence"], rows[3]["sentence"]} & texts  # the unlabelled ones wait
    after = read(path)
    assert [r["id"] for r in after] == [str(i) for i in range(8)] and after[0]["label"] == rows[0]["intended"].upper()

    # a resumed trial repeats step 2: the same rows are not written twice
    state2, rng2 = resumed
    state2, _ = method.step(state2, task, lm_then, lm_then, rng2)
    assert state2 == state
    assert [r["id"] for r in read(path)] == [str(i) for i in range(8)]


def test_a_file_annotator_needs_a_file():
    with pytest.raises(ValueError, match="annotation_file"):
        Calibration(annotator="file")
    with pytest.raises(ValueError, match="annotator must be one of"):
        Calibration(annotator="crowd")
    with pytest.raises(ValueError, match="select_on"):
        Calibration(select_on="test")
    with pytest.raises(ValueError, match="warmup"):
        Calibration(warmup=0)


class Stuck(PlantedLM):
    """A proposer that suggests the same prompt every time: nothing new to score after the first."""

    def generate(self, contexts, **kw):
        outs = super().generate(contexts, **kw)
        return [["Purple banana seven."] * kw.get("n", 1) if is_suggestion(c) else o for c, o in zip(contexts, outs)]


def test_patience_ends_the_search_after_the_warmup():
    method = Calibration(warmup=2, patience=3, annotator_instruction=INTENT)
    state, reports = run(method, planted_task(), Stuck(), steps=30)
    assert method.done(state) and len(reports) == 2 + 3
    assert [r.metrics["stale"] for r in reports] == [0, 0, 1, 2, 3]
    capped = Calibration(max_iterations=4, patience=0, annotator_instruction=INTENT)
    state, reports = run(capped, planted_task(), PlantedLM(), steps=30)
    assert capped.done(state) and len(reports) == 4


def test_case_writing_sees_the_previous_iterations_errors():
    task, lm = planted_task(), RecordingLM()
    method = Calibration(n_real=8, warmup=1, n_synthetic=4, annotator_instruction=INTENT, patience=0)
    state, _ = run(method, task, lm, steps=2)
    errors = state.main.rounds[0].errors
    assert errors  # the seed gets some of the real examples wrong
    first_cases = [c for r in lm.rounds for c in r if is_case_context(c)]
    assert len(first_cases) == 4  # the warm-up iteration wrote none: these are step 2's
    for context in first_cases:
        assert any(f"{text}\nPrediction: {pred}; correct: {gold}" in context for text, pred, gold in errors)
        assert f"Prompt: {state.main.rounds[0].prompt}\n" in context


def test_suggestions_see_the_analysis_and_the_history():
    task, lm = planted_task(), RecordingLM()
    method = Calibration(annotator_instruction=INTENT, patience=0)
    state, _ = run(method, task, lm, steps=3)
    analyses = [c for r in lm.rounds for c in r if c.endswith("Analysis:")]
    suggestions = [c for r in lm.rounds for c in r if is_suggestion(c)]
    assert len(analyses) == 3 and len(suggestions) == 3
    assert state.main.rounds[-1].analysis in suggestions[-1]
    assert "Prediction:" in analyses[0] and "Confusion (rows: correct answer" in analyses[0]
    assert f"Prompt: {task.instruction}\nScore:" in suggestions[0]


class Calls:
    """Counts calls of each kind on one LM role, per step."""

    def __init__(self, lm):
        self.lm, self.log = lm, []
        self.capabilities = lm.capabilities

    def loglikelihood(self, requests):
        self.log.append("loglikelihood")
        return self.lm.loglikelihood(requests)

    def generate(self, contexts, **kw):
        self.log.append("generate")
        return self.lm.generate(contexts, **kw)


def test_each_step_batches_each_kind_of_request_into_one_call():
    task, method = planted_task(), Calibration(annotator_instruction=INTENT, patience=0)
    scorer, proposer, rng = Calls(PlantedLM()), Calls(PlantedLM()), np.random.default_rng(0)
    state = method.init(task, scorer, proposer, rng)
    for step in range(4):
        scorer.log, proposer.log = [], []
        state, _ = method.step(state, task, scorer, proposer, rng)
        assert scorer.log == ["loglikelihood"]
        cases = ["generate", "loglikelihood"] if step else []  # the warm-up step writes no cases
        assert proposer.log == cases + ["generate", "generate"]  # analysis, then suggestions


class Requests(Calls):
    def loglikelihood(self, requests):
        self.log.append(len({r.context for r in requests}))
        return self.lm.loglikelihood(requests)


def test_an_unchanged_benchmark_is_not_scored_again():
    task, method = planted_task(), Calibration(n_real=0, n_synthetic=4, max_cases=4, n_eval=10, patience=0,
                                               annotator_instruction=INTENT)
    scorer, proposer, rng = Requests(PlantedLM()), Calls(Stuck()), np.random.default_rng(0)
    state = method.init(task, scorer, proposer, rng)
    logs = []
    for _ in range(3):
        scorer.log, proposer.log = [], []
        state, report = method.step(state, task, scorer, proposer, rng)
        logs.append((scorer.log, proposer.log))
    assert logs[0][0] == [4 + 10]  # the seed on the 4 cases and on dev
    assert logs[1][0] == [4 + 10]  # only the new suggestion: the seed's score on the same 4 cases stands
    assert logs[2] == ([], ["generate"])  # nothing new to score or analyse: one suggestion call
    assert report.metrics["benchmark"] == 4 and state.main.rounds[-1].analysis == state.main.rounds[-2].analysis


def test_a_two_field_task_writes_the_last_field_and_copies_the_others():
    base = planted_task()

    def two(split):
        return tuple(Example({"topic": f"topic {i}", **ex.inputs}, ex.label) for i, ex in enumerate(split))

    task = Task(
        name="two", template="{instruction}\nInput: {topic} | {sentence}\nLabel:",
        verbalizer=base.verbalizer, instruction=base.instruction,
        train=two(base.train), dev=two(base.dev), test=two(base.test),
    )
    assert written_field(task) == "sentence"
    state, _ = run(Calibration(n_real=0, annotator_instruction=INTENT), task, RecordingLM(), steps=2)
    written = [c for c in state.main.cases if not c.real]
    topics = {ex.inputs["topic"] for ex in task.train}
    assert written and all(c.value("topic") in topics for c in written)


def test_a_task_with_its_own_options_calibrates_on_real_examples_only():
    base = planted_task()
    options = tuple(Example(ex.inputs, ex.label, choices=(" no", " yes")) for ex in base.train)
    task = dataclasses.replace(base, train=options)
    assert written_field(task) is None
    with pytest.raises(ValueError, match="n_real > 0"):
        Calibration(n_real=0).init(task, PlantedLM(), PlantedLM(), np.random.default_rng(0))
    lm = RecordingLM()
    state, _ = run(Calibration(n_real=6), task, lm, steps=3)
    assert all(c.real for c in state.main.cases) and not any(is_case_context(c) for r in lm.rounds for c in r)


class Echoer(PlantedLM):
    def generate(self, contexts, **kw):
        outs = super().generate(contexts, **kw)
        return [["Correct answer: yes"] * kw.get("n", 1) if is_suggestion(c) else o for c, o in zip(contexts, outs)]


def test_suggestions_that_echo_the_meta_prompt_are_dropped():
    state, reports = run(Calibration(n_proposals=3, patience=0), planted_task(), Echoer(), steps=2)
    assert reports[1].metrics["proposed"] == 6 and reports[1].metrics["usable"] == 0
    assert state.main.pending == () and len(state.main.tried) == 1


def test_clean_input_keeps_one_reasonable_line():
    assert clean_input("\n  a tricky borderline case \nAnswer: no") == "a tricky borderline case"
    assert clean_input("one") == "" and clean_input(" ".join(["w"] * 100)) == ""
    assert clean_input("yes", min_words=1) == "yes"


class RecordingGenLM(PlantedGenLM):
    def __init__(self, scale: int):
        super().__init__(scale)
        self.scored = []

    def loglikelihood(self, requests):
        self.scored.append([r.context for r in requests])
        return super().loglikelihood(requests)


def test_the_ranker_route_calibrates_a_ranker_then_improves_the_generation_prompt():
    method = Calibration(n_eval=0, ranker_scale=2, ranker_steps=8, n_proposals=8, annotator_instruction=INTENT,
                         patience=0)
    agreement = []
    for seed in range(4):
        task, lm = planted_gen_task(n_dev=40), RecordingGenLM(scale=2)
        state, reports = run(method, task, lm, steps=8 + 6, seed=seed)
        assert [r.metrics["ranking"] for r in reports] == [1.0] * 8 + [0.0] * 6
        seed_ranker = ranker_seed(task.instruction, 2)
        assert quality(state.ranker.best) >= quality(seed_ranker) + 0.3  # the ranker was calibrated
        ratings = [c for c in state.ranker.cases if not c.real]
        assert ratings and all(c.label is not None for c in ratings)  # its written outputs were annotated
        assert quality(method.best(state).text) >= quality(task.instruction) + 0.2
        assert reports[-1].metrics["dev_score"] >= reports[0].metrics["dev_score"] + 0.2  # the task's own metric
        assert [e.kind for e in reports[0].evaluated] == ["seed"]
        keys = tuple(example_key(ex) for ex in task.dev)
        for e in (e for r in reports for e in r.evaluated):  # what each written answer scored on dev
            assert e.examples == keys and np.mean(e.outcomes) == pytest.approx(e.score)
            assert (e.parent == "") == (e.kind == "seed")
        gen_cases = [c for c in state.main.cases if not c.real]
        assert gen_cases and all(c.label is None and c.intended is None for c in gen_cases)  # rated, not labelled
        rated = [c for call in lm.scored for c in call if c.endswith("\nRating:")]
        assert any(c.startswith(state.ranker.best + "\n") for c in rated)  # phase 2 rates with the calibrated ranker
        scored = [(t, s) for t, s, _ in state.main.tried if s is not None]
        agreement.append(spearmanr([s for _, s in scored], [quality(t) for t, _ in scored]).correlation)
    # the calibrated ranker's scores follow the planted objective (an uncalibrated one's barely do)
    assert np.mean(agreement) > 0.5


@pytest.mark.parametrize("make_task, make_lm", [(planted_task, PlantedLM), (planted_gen_task, PlantedGenLM)])
def test_calibration_state_pickles_and_resumes_identically(make_task, make_lm):
    method = Calibration(annotator_instruction=INTENT, ranker_steps=2, patience=0)
    resumed, full = resumed_and_uninterrupted(method, make_task(), make_lm, steps=5, split=3, seed=4)
    assert resumed == full and dataclasses.is_dataclass(resumed)


@pytest.mark.parametrize("name", ["calibration", "calibration_paper"])
def test_calibration_yamls_instantiate(name):
    cfg = OmegaConf.load(ROOT / f"conf/method/{name}.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, Calibration) and method.n_synthetic >= 1 and method.select_on == "synthetic"


def test_a_suggestion_records_the_prompt_it_was_asked_to_improve_and_its_dev_outcomes():
    from methods.racing import fixed_dev

    task, lm = planted_task(), RecordingLM()
    method = Calibration(n_proposals=4, n_eval=16, annotator_instruction=INTENT, patience=0, select_on="dev")
    rng = np.random.default_rng(0)
    state, improved = method.init(task, lm, lm, rng), set()
    for _ in range(5):
        before, asked = state.main, len(lm.rounds)
        state, report = method.step(state, task, lm, lm, rng)
        for e in report.evaluated:
            assert_outcomes(task, e, fixed_dev(task, 16))
            if e.kind == "seed":
                assert e.parent == ""
                continue
            # written last step, after the analysis of the prompt selected then
            assert e.parent == before.best == before.rounds[-1].prompt and e.prompt in before.pending
            improved.add(e.parent)
        analysed = [c for contexts in lm.rounds[asked:] for c in contexts if c.endswith("Analysis:")]
        assert all(f"Prompt: {state.main.best}\n" in c for c in analysed)  # what the next suggestions improve
    assert len(improved) > 1  # the selection moved, and later suggestions name the new prompt
