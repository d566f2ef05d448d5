"""PBT islands: a migration takes another island's population and keeps this island's own counters."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.lm.client import Meter
from pipelines.plan import UserError, check_islands
from pipelines.trial import ISLANDS_DIR, TrialContext, _migrated

SPEC = {"method_name": "evoprompt", "task_name": "sst2", "seed": 3, "method": {}, "task": {}}


def _role(examples: int) -> SimpleNamespace:
    return SimpleNamespace(meter=Meter(examples=examples))


def test_a_migration_takes_the_donors_population_and_keeps_the_islands_own_counters(tmp_path):
    ctx = TrialContext(run_dir=str(tmp_path), namespace="n", scorer=("scorer", 1), proposer=("scorer", 1), models={},
                       max_steps=10, islands=True)
    own = {"step": 2, "elapsed": 5.0, "live": {"run": "mine"}, "migrations": 1, "island": 2,
           "migrated_from": [["x", 1]], "scorer_usage": Meter(examples=256), "proposer_usage": Meter(examples=8)}
    (tmp_path / ISLANDS_DIR).mkdir()
    (tmp_path / ISLANDS_DIR / "me.pkl").write_bytes(pickle.dumps(own))
    donor = {"state": ("the donor's population",), "rng": np.random.default_rng(0), "step": 4, "elapsed": 40.0,
             "dev_score": 0.9, "live": {"run": "donor's"}}
    scorer, proposer = _role(999), _role(999)
    run = _migrated(dict(donor), "donor", "me", ctx, SPEC, scorer, proposer)
    assert run["state"] == donor["state"] and run["dev_score"] == 0.9  # the population moved
    assert (run["step"], run["elapsed"], run["live"], run["island"]) == (2, 5.0, {"run": "mine"}, 2)
    assert (scorer.meter.examples, proposer.meter.examples) == (256, 8)  # its own spend, not the donor's 999
    assert run["migrations"] == 2 and run["migrated_from"] == [["x", 1], ["donor", 4]]
    donor_next = np.random.default_rng(0).integers(2**31, size=4)
    assert not np.array_equal(run["rng"].integers(2**31, size=4), donor_next)  # no replay of the donor's draws


def test_a_first_migration_before_any_own_checkpoint_starts_counting_from_zero(tmp_path):
    ctx = TrialContext(run_dir=str(tmp_path), namespace="n", scorer=("scorer", 1), proposer=("scorer", 1), models={},
                       max_steps=10, islands=True)
    scorer, proposer = _role(0), _role(0)
    run = _migrated({"state": "s", "rng": None, "step": 3, "elapsed": 1.0}, "d", "me", ctx, SPEC, scorer, proposer)
    assert run["step"] == 0 and run["migrations"] == 1 and scorer.meter.examples == 0


@pytest.mark.parametrize("search, n_specs, message", [
    ({"scheduler": "pbt", "islands": 4, "params": {"evoprompt": {}}}, 3, "one method on one task and seed"),
    ({"scheduler": "pbt", "islands": 1, "params": {"evoprompt": {}}}, 1, "needs a population"),
    ({"scheduler": "pbt", "islands": 4, "params": {}}, 1, "perturbs search.params"),
    ({"scheduler": "fifo", "islands": 0}, 1, "islands must be an integer >= 1"),
])
def test_island_settings_are_checked_before_ray_starts(search, n_specs, message):
    with pytest.raises(UserError, match=message):
        check_islands(search, [{}] * n_specs)


def test_good_island_settings_pass():
    check_islands({"scheduler": "pbt", "islands": 4, "params": {"evoprompt": {"temperature": {}}}}, [{}])
    check_islands({"scheduler": "fifo", "islands": 4}, [{}] * 3)


def test_pbt_islands_migrate_end_to_end_and_each_keeps_its_own_log(tmp_path, data_dir):
    """Four soft-prompt islands on the tiny model under PBT (lr perturbed): every island finishes,
    at least one migration happens, no island's log repeats a (step, idx) record, and each island's
    scorer spend is its own (under its cap), not a donor's."""
    import json

    from pipelines.results import read_jsonl
    from tests.conftest import run_cli

    run_dir = tmp_path / "run"
    proc = run_cli("model=tiny", "task.n_train=20", "task.n_dev=16", "task.n_test=16", "cache.enabled=false",
                   "logger=none", f"data_dir={data_dir}", "method=soft_prompt", "search.methods=[soft_prompt]",
                   "search.islands=4", "search.scheduler=pbt", "search.pbt_interval=2", "search.max_steps=10",
                   "+search.params={soft_prompt: {lr: {loguniform: [0.0001, 0.5]}}}", "method.n_virtual=2",
                   "method.eval_every=1", "method.n_eval=8", "method.batch_size=4", "budget.scorer.examples=400",
                   f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((run_dir / "summary.json").read_text())["trials"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert sorted(r["island"] for r in rows) != [0, 0, 0, 0] or sum(r["migrations"] for r in rows) >= 1
    assert sum(r["migrations"] for r in rows) >= 1, [(r["island"], r["migrations"]) for r in rows]
    assert "island migration 1: took trial" in proc.stdout
    for r in rows:
        assert r["scorer_examples"] <= 400
        keys = [(x["step"], x["idx"]) for x in read_jsonl(run_dir / "evaluations" / f"{r['trial']}.jsonl")]
        assert keys and len(keys) == len(set(keys))
