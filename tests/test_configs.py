"""Every experiment and the default config compose, and every method they name gets valid arguments."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from pipelines.plan import UserError, check_arguments, trial_specs

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def specs_of(cfg):
    return trial_specs(cfg, [CONF], dict(cfg.hydra.runtime.choices))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_valid_method_arguments(experiment):
    cfg = composed(f"+experiment={experiment}", "data_dir=/unused")
    specs = specs_of(cfg)
    assert specs and {s["method_name"] for s in specs} == set(cfg.search.methods)
    first_line = (CONF / "experiment" / f"{experiment}.yaml").read_text().splitlines()[1]
    assert first_line.startswith("# python -m pipelines.run +experiment="), "the YAML must start with its command"


def test_default_sweep_is_manual_against_ape_on_sst2():
    cfg = composed("data_dir=/unused")
    assert [(s["method_name"], s["task_name"]) for s in specs_of(cfg)] == [("manual", "sst2"), ("ape", "sst2")]


def test_method_overrides_reach_only_their_method():
    cfg = composed("data_dir=/unused", "+search.method_overrides.ape.n_prompts=3")
    by_name = {s["method_name"]: s["method"] for s in specs_of(cfg)}
    assert by_name["ape"]["n_prompts"] == 3 and "n_prompts" not in by_name["manual"]


def test_argument_checks_catch_wrong_names_and_types():
    with pytest.raises(UserError, match="unknown argument"):
        check_arguments("methods.ape.APE", {"n_promtps": 3})
    with pytest.raises(UserError, match="should be float"):
        check_arguments("methods.ape.APE", {"temperature": "hot"})
    check_arguments("methods.ape.APE", {"temperature": 1})  # an int is a fine float


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_every_method_yaml_starts_with_its_command(method):
    assert (CONF / "method" / f"{method}.yaml").read_text().startswith("# python -m pipelines.run")


def test_model_shorthand_sets_both_roles():
    from pipelines.plan import expand_model_shorthand

    assert expand_model_shorthand(["task=mmlu", "model=smollm2"]) == [
        "task=mmlu", "model@lm.scorer=smollm2", "model@lm.proposer=smollm2"]
    assert expand_model_shorthand(["model@lm.scorer=hf"]) == ["model@lm.scorer=hf"]


def test_search_tasks_runs_every_method_on_each_task_variant():
    cfg = composed("+experiment=ii_ape", "data_dir=/unused")
    specs = specs_of(cfg)
    assert len(specs) == 6 * 2  # six tasks x (manual, ape) x one seed
    assert all(s["task"]["task_name"] == s["task_name"] for s in specs)
    assert {s["task"]["_target_"] for s in specs} == {"tasks.gen_loaders.ii"}
    gpu = specs_of(composed("+experiment=ii_ape_gpu", "data_dir=/unused"))
    assert len({s["task_name"] for s in gpu}) == 24  # the twin's tasks add to the CPU six


COMPARISONS = ["sst2_all", "sst2_all_gpu", "sst2_text", "sst2_gradient", "gsm8k_text", "gsm8k_text_gpu", "bbh_cot",
               "bbh_cot_gpu"]


@pytest.mark.parametrize("experiment", COMPARISONS)
def test_comparisons_give_every_method_the_same_example_budget_and_both_baselines(experiment):
    from pipelines.lm.budget import Budget

    cfg = composed(f"+experiment={experiment}", "data_dir=/unused")
    budget = Budget.parse(dict(cfg.budget))
    assert budget.scorer.examples and budget.scorer.examples > 0
    assert {"manual", "empty"} <= set(cfg.search.methods)


@pytest.mark.parametrize("method", sorted(p.stem for p in (CONF / "method").glob("*_paper.yaml")))
def test_every_paper_preset_says_where_each_setting_comes_from(method):
    lines = [ln for ln in (CONF / "method" / f"{method}.yaml").read_text().splitlines()
             if ln and not ln.startswith("#") and not ln.startswith("_target_")]
    assert lines, method
    uncited = [ln for ln in lines if "#" not in ln or len(ln.split("#", 1)[1].strip()) < 10]
    assert not uncited, f"{method}: settings without a source: {uncited}"
    base = method.removesuffix("_paper")
    assert (CONF / "method" / f"{base}.yaml").is_file(), f"{method} presets a method with no {base}.yaml"
