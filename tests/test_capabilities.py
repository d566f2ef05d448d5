"""Backends declare what they can do, methods what they need; the plan refuses a mismatch up front."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from backends.hf import HFBackend
from backends.masked import MaskedLMBackend
from backends.openai_compat import OpenAICompatLM
from methods.lm import ANSWER_STATES, CAPABILITIES, GENERATE, PREFIX_STATES, PROMPT_GRAD, TOKEN_EMBEDDINGS, Needs
from pipelines.lm.stack import backend_capabilities
from pipelines.plan import UserError, _load_group_yaml, check_needs
from tests.conftest import ROOT, run_cli

BACKENDS = [HFBackend, MaskedLMBackend, OpenAICompatLM]


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.__name__)
def test_a_backend_implements_exactly_the_capabilities_it_declares(backend):
    assert backend.capabilities <= CAPABILITIES
    for name in CAPABILITIES:  # each capability is named after the call it allows
        assert hasattr(backend, name) == (name in backend.capabilities), name
    for name in ("loglikelihood", "tokenize", "decode"):  # the required contract
        assert callable(getattr(backend, name))


def test_capabilities_are_read_from_a_class_or_a_factorys_return_type():
    assert backend_capabilities("backends.hf.HFBackend") == CAPABILITIES
    assert backend_capabilities("backends.tiny.tiny_backend") == CAPABILITIES
    assert backend_capabilities("backends.openai_compat.OpenAICompatLM") == {GENERATE}
    with pytest.raises(ValueError, match="declares no capabilities"):
        backend_capabilities("backends.loading.load_pretrained")
    with pytest.raises(ValueError, match="cannot import"):
        backend_capabilities("backends.nope.Backend")


def _needs(name: str, **overrides) -> Needs:
    import hydra.utils

    cfg = _load_group_yaml("method", name, [ROOT / "conf"])  # honours evoprompt_de's defaults list
    return hydra.utils.instantiate({**cfg, **overrides}).needs()


TEXT = ["ape", "opro", "protegi", "evoprompt", "evoprompt_de", "promptbreeder", "calibration", "grips", "gepa", "promptimal"]


def test_every_method_config_declares_its_needs():
    names = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    presets = {n for n in names if n.endswith("_paper")}  # a method's paper settings (tests/test_configs.py)
    assert set(TEXT) | {"manual", "empty", "autoprompt", "soft_prompt", "p_tuning", "prefix_tuning", "label_search", "rlprompt"} == set(names) - presets
    for name in TEXT + sorted(p for p in presets if p.removesuffix("_paper") in TEXT):
        assert _needs(name) == Needs(proposer=frozenset({GENERATE})), name
    assert _needs("grips", paraphrase=False) == Needs()  # only paraphrases call the proposer
    assert _needs("manual") == _needs("empty") == Needs()
    grads = frozenset({PROMPT_GRAD, TOKEN_EMBEDDINGS})
    assert _needs("autoprompt") == _needs("soft_prompt") == _needs("p_tuning") == Needs(scorer=grads)
    assert _needs("prefix_tuning") == Needs(scorer=grads | {PREFIX_STATES})
    assert _needs("label_search") == _needs("label_search_paper") == Needs(scorer=frozenset({ANSWER_STATES}))
    assert _needs("autoprompt_paper") == Needs(scorer=grads | {ANSWER_STATES})  # its preset searches labels first
    # the policy reads the proposer's states; its prompts are rendered as text, so any scorer rewards them
    assert _needs("rlprompt") == _needs("rlprompt_paper") == Needs(proposer=frozenset({ANSWER_STATES}))


def test_a_need_the_backend_lacks_is_one_line_naming_it():
    caps = {"scorer": frozenset({GENERATE}), "proposer": CAPABILITIES}
    method = type("M", (), {"needs": lambda self: Needs(scorer=frozenset({PROMPT_GRAD, TOKEN_EMBEDDINGS}))})()
    with pytest.raises(UserError) as err:
        check_needs("autoprompt", method, caps, {"model@lm.scorer": "openai"})
    assert str(err.value) == ("autoprompt needs the scorer to provide prompt_grad, token_embeddings, but "
                              "model@lm.scorer=openai provides generate; choose a local model for the scorer (smollm2, hf)")
    check_needs("autoprompt", method, {"scorer": CAPABILITIES, "proposer": frozenset()}, {})  # enough: no error
    with pytest.raises(UserError, match="the proposer to provide generate"):
        check_needs("ape", type("M", (), {"needs": lambda self: Needs(proposer=frozenset({GENERATE}))})(),
                    {"scorer": CAPABILITIES, "proposer": frozenset()}, {})


def test_the_cli_refuses_autoprompt_on_an_endpoint_in_seconds(tmp_path):
    start = time.perf_counter()
    out = run_cli("method=autoprompt", "model@lm.scorer=openai", "logger=none", f"hydra.run.dir={tmp_path}/run")
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: autoprompt needs the scorer to provide prompt_grad, token_embeddings, but model@lm.scorer=openai "
        "provides generate; choose a local model for the scorer (smollm2, hf)"
    ]
    assert "Ray" not in out.stdout and not Path(tmp_path / "run").exists()
    assert time.perf_counter() - start < 60


def test_a_generative_task_needs_a_scorer_that_generates_and_a_method_that_fits():
    from methods.autoprompt import AutoPrompt
    from methods.manual import Manual
    from pipelines.plan import check_fit
    from tasks.generative import GenExample, GenTask

    exs = (GenExample({"q": "2+2"}, ("4",)),)
    task = GenTask("math", "{instruction} Q: {q} A:", "", exs, exs, exs, metric="numeric")
    scoring_only = {"scorer": frozenset({PROMPT_GRAD, TOKEN_EMBEDDINGS}), "proposer": CAPABILITIES}
    with pytest.raises(UserError) as err:
        check_fit("manual", Manual(), task, scoring_only, {"model@lm.scorer": "masked"})
    assert str(err.value) == ("task 'math' is scored on generated answers, but model@lm.scorer=masked cannot "
                              "generate; choose a model that can (smollm2, hf, openai)")
    every = {"scorer": CAPABILITIES, "proposer": CAPABILITIES}
    check_fit("manual", Manual(), task, every, {})
    check_fit("autoprompt", AutoPrompt(), task, every, {})  # nll: trains on the gold answer
    with pytest.raises(UserError, match="autoprompt on task 'math': objective=accuracy needs label scoring"):
        check_fit("autoprompt", AutoPrompt(objective="accuracy"), task, every, {})
