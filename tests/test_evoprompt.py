"""EvoPrompt (GA and DE) against the planted fake LM, with the final prompt in <prompt> tags."""

from pathlib import Path

import hydra.utils
import numpy as np
import pytest
from omegaconf import OmegaConf

from methods.evoprompt import DEMO, EvoPrompt, EvoState, copies_demo, roulette_pairs, tagged
from methods.racing import fixed_dev
from tests.fakes import PlantedLM, assert_outcomes, planted_task, quality, resumed_and_uninterrupted, run_steps

ROOT = Path(__file__).resolve().parents[1]
DECOY = "Seven purple banana maybe"


class TaggedLM(PlantedLM):
    """Writes an intermediate (bad) prompt first and the proposal inside <prompt> tags.

    Every other reply lacks the closing tag, as a backend that stops on "</prompt>" returns it.
    """

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        outs = super().generate(
            contexts, max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed
        )
        if "</prompt>" not in stop:  # the seed paraphrases: plain text
            return outs
        close = ["</prompt>", ""]
        return [[f"{DECOY}.\n2. <prompt>{o}{close[k % 2]}" for k, o in enumerate(row)] for row in outs]


run = run_steps


@pytest.mark.parametrize("variant", ["ga", "de"])
def test_evoprompt_climbs_and_never_loses_its_best(variant):
    task, lm = planted_task(n_dev=60), TaggedLM()
    method = EvoPrompt(initial="paraphrase", variant=variant, pop_size=6, n_eval=0)
    state, reports = run(method, task, lm, steps=6)
    assert quality(method.best(state).text) > quality(task.instruction) + 0.15
    curve = [r.metrics["dev_score"] for r in reports]
    assert curve == sorted(curve) and curve[-1] > curve[0]
    assert len(state.population) == 6 and lm.calls == 2 * 6  # one generate + one score per step
    offspring = [e.prompt for r in reports[1:] for e in r.evaluated]
    assert offspring and not any(DECOY.lower() in p.lower() for p in offspring)


def test_ga_keeps_the_top_n_of_parents_and_children():
    task, lm = planted_task(), TaggedLM()
    method = EvoPrompt(initial="paraphrase", variant="ga", pop_size=4)
    state, _ = run(method, task, lm, steps=1)
    new, report = method.step(state, task, lm, lm, np.random.default_rng(1))
    union = list(state.population) + [(e.prompt, e.score) for e in report.evaluated]
    assert sorted(s for _, s in new.population) == sorted(s for _, s in union)[-4:]
    assert set(new.population) <= set(union)


def test_de_replaces_a_member_only_with_a_strictly_better_child():
    task, lm = planted_task(), TaggedLM()
    method = EvoPrompt(initial="paraphrase", variant="de", pop_size=5)
    state, _ = run(method, task, lm, steps=2, seed=4)
    children = {}
    rng = np.random.default_rng(4)
    for _ in range(4):
        new, report = method.step(state, task, lm, lm, rng)
        children = {e.prompt: e.score for e in report.evaluated}
        for (old_text, old_score), (text, score) in zip(state.population, new.population):
            if text != old_text:
                assert children[text] == score > old_score
            else:
                assert score == old_score
        changed = sum(a != b for a, b in zip(state.population, new.population))
        assert new.replaced - state.replaced == changed
        state = new
    assert state.replaced > 0


class MemberChildLM(PlantedLM):
    """For DE meta-prompt ``i`` (one per member, in member order) writes a child tagged ``i``:
    good for even members (every planted good word), useless for odd ones."""

    TAGS = ("ant", "bee", "cat", "dog", "elk", "fox")

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        if "</prompt>" not in stop:  # the seed paraphrases
            return super().generate(contexts, max_new_tokens=max_new_tokens, temperature=temperature, n=n, seed=seed)
        body = ("carefully decide the sentiment label of the review", "maybe purple")
        return [[f"<prompt>{body[i % 2]} {self.TAGS[i]}</prompt>"] * n for i in range(len(contexts))]


def test_de_puts_each_child_in_the_slot_of_the_member_it_was_bred_from():
    task, lm = planted_task(), MemberChildLM()
    method = EvoPrompt(initial="paraphrase", variant="de", pop_size=6)
    state, _ = run(method, task, lm, steps=1)
    assert len(state.population) == 6 and max(quality(t) for t, _ in state.population) < 1.0
    new, _ = method.step(state, task, lm, lm, np.random.default_rng(0))
    for i, ((old, _), (text, _)) in enumerate(zip(state.population, new.population)):
        if i % 2 == 0:  # a perfect child replaces its own member, and only its own
            assert text.endswith(MemberChildLM.TAGS[i]), (i, text)
        else:  # a useless child never replaces anyone
            assert text == old, (i, text)


def test_roulette_prefers_high_scores_and_never_pairs_a_member_with_itself():
    state = EvoState(population=(("a b", 0.5), ("c d", 0.3), ("e f", 0.2)))
    pairs = roulette_pairs(state, 2000, np.random.default_rng(0))
    counts = np.bincount(np.array(pairs).ravel(), minlength=3)
    assert all(a != b for a, b in pairs)
    assert counts[0] > counts[1] > counts[2]


def test_tagged_reads_the_final_prompt_robustly():
    assert tagged("x\n2. <prompt>Final one.</prompt> tail") == "Final one."
    assert tagged("bracketed with <prompt> and </prompt>.\n<prompt>Last wins") == "Last wins"
    assert tagged("1. Crossover Prompt: Mixed\n2. Final Prompt: Do it well</prompt>") == "Do it well"
    assert tagged("\n Prompt 1: Plain first line\nmore") == "Plain first line"
    de = '"a" vs "b"\n2. Mutated parts: "c"\n3. New Prompt: Step three.\n4. Final Prompt: Step four.'
    assert tagged(de) == "Step four." and tagged(de.rsplit("\n", 1)[0]) == "Step three."
    assert tagged("<prompt></prompt>") == "" and tagged("") == ""


class DemoCopier(TaggedLM):
    """Answers every operator meta-prompt with (a near copy of) the demonstration's answer."""

    def generate(self, contexts, *, max_new_tokens, temperature=1.0, n=1, seed=None, stop=()):
        if "</prompt>" not in stop:
            return super().generate(contexts, max_new_tokens=max_new_tokens, n=n, seed=seed, stop=stop)
        self.calls += 1
        return [[f"x\n2. <prompt>{DEMO[3].replace(',', ' while')}</prompt>"] * n for _ in contexts]


@pytest.mark.parametrize("variant", ["ga", "de"])
def test_children_copying_the_demonstration_are_dropped_unscored(variant):
    task, lm = planted_task(), DemoCopier()
    method = EvoPrompt(initial="paraphrase", variant=variant, pop_size=4)
    state, reports = run(method, task, lm, steps=3)
    assert reports[1].evaluated == () and reports[2].metrics["usable"] == reports[0].metrics["usable"]
    assert copies_demo(DEMO[7]) and not copies_demo(task.instruction)


@pytest.mark.parametrize("variant", ["ga", "de"])
def test_evoprompt_state_pickles_and_resumes_identically(variant):
    task, method = planted_task(), EvoPrompt(initial="paraphrase", variant=variant, pop_size=4)
    state, full = resumed_and_uninterrupted(method, task, TaggedLM, seed=2)
    assert state == full


def test_evoprompt_rejects_unknown_variant():
    with pytest.raises(ValueError, match="variant"):
        EvoPrompt(initial="paraphrase", variant="pso")


def test_evoprompt_yaml_instantiates():
    cfg = OmegaConf.load(ROOT / "conf/method/evoprompt.yaml")
    method = hydra.utils.instantiate(cfg, _convert_="all")
    assert isinstance(method, EvoPrompt) and method.variant in ("ga", "de")


class Recording(TaggedLM):
    def __init__(self) -> None:
        super().__init__()
        self.contexts = []

    def generate(self, contexts, **kwargs):
        self.contexts.append(list(contexts))
        return super().generate(contexts, **kwargs)


def test_the_population_starts_from_the_top_half_of_scored_manual_and_ape_prompts_each_paraphrased():
    """Fails on the old behaviour (the seed instruction and paraphrases of it): as the reference's
    para_topk, the first step scores the seed and APE proposals, the second paraphrases the top half."""
    from methods.ape import FORWARD_TEMPLATE, RESAMPLE_TEMPLATE

    task, lm = planted_task(n_dev=60), Recording()
    method = EvoPrompt(pop_size=4, init_pool=6, n_eval=0)
    rng = np.random.default_rng(0)
    state, report = method.step(method.init(task, lm, lm, rng), task, lm, lm, rng)
    assert len(lm.contexts[0]) == 6 and all(c.startswith(FORWARD_TEMPLATE.split("{")[0]) for c in lm.contexts[0])
    assert not state.population and state.pool[0][1] == max(s for _, s in state.pool)
    assert task.instruction in [t for t, _ in state.pool] and len(report.evaluated) == len(state.pool)
    assert method.best(state).text == state.pool[0][0]  # a budget may stop it here
    state, report = method.step(state, task, lm, lm, rng)
    top = state.pool[:2]
    assert lm.contexts[1] == [RESAMPLE_TEMPLATE.format(instruction=t) for t, _ in top]
    assert len(state.population) == 4 and state.population[:2] == top
    assert {e.prompt for e in report.evaluated} <= {t for t, _ in state.population}
    assert report.evaluated and {e.parent for e in report.evaluated} <= {t for t, _ in top}  # each paraphrases one
    state, _ = method.step(state, task, lm, lm, rng)  # then evolution as before
    assert len(state.population) == 4 and "Cross over" in lm.contexts[2][0]


class PairChildLM(MemberChildLM):
    """Also keeps each operator meta-prompt, so a test can read which prompts child ``i`` was bred from."""

    def __init__(self) -> None:
        super().__init__()
        self.operator_contexts = []

    def generate(self, contexts, **kw):
        if "</prompt>" in kw.get("stop", ()):
            self.operator_contexts = list(contexts)
        return super().generate(contexts, **kw)


@pytest.mark.parametrize("variant", ["ga", "de"])
def test_each_child_records_the_parent_it_was_bred_from_and_its_outcomes(variant):
    task, lm = planted_task(), PairChildLM()
    method = EvoPrompt(initial="paraphrase", variant=variant, pop_size=6, n_eval=16)
    state, (first,) = run(method, task, lm, steps=1)
    assert [e.parent for e in first.evaluated] == [""] + [task.instruction] * (len(first.evaluated) - 1)
    _, report = method.step(state, task, lm, lm, np.random.default_rng(0))
    score = dict(state.population)
    assert report.evaluated
    for e in first.evaluated + report.evaluated:
        assert_outcomes(task, e, fixed_dev(task, 16))
    for e in report.evaluated:
        i = MemberChildLM.TAGS.index(e.prompt.split()[-1])
        context = lm.operator_contexts[i]
        if variant == "de":  # the member it is crossed with, whose slot it may take
            assert e.parent == state.population[i][0]
            assert context.endswith(f"Basic Prompt: {e.parent}\n\n1. Different parts:")
        else:  # the better of the pair the meta-prompt crossed (its last pair; the first is the demo's)
            p1, p2 = context.split("Prompt 1: ")[-1].split("\n")[0], context.split("Prompt 2: ")[-1].split("\n")[0]
            assert e.parent == (p1 if score[p1] >= score[p2] else p2)
