"""Bad input fails in one line with nothing half-written; secrets and remote code stay out.

The bad inputs here complement ``tests/test_pipeline.py`` (unknown method, task and model,
missing data dir, mistyped method argument, empty method list, unknown scheduler) and
``tests/test_budget.py`` (negative budget).
"""

from __future__ import annotations

import inspect
import json
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from backends import loading
from backends.hf import HFBackend
from backends.tiny import tiny_model, tiny_tokenizer
from tests._fault_cluster import free_port
from tests.conftest import ROOT, run_cli

TINY = ["model@lm.scorer=tiny", "model@lm.proposer=tiny", "logger=none"]
SMALL = ["task.n_train=20", "task.n_dev=16", "task.n_test=24"]


def _assert_one_line_error(proc, message: str, run_dir: Path) -> None:
    """Exit 2, exactly one ``error:`` line on stderr (the last one) naming the problem, no run dir left."""
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and lines[-1] == errors[0] and message in errors[0], proc.stderr[-3000:]
    assert not run_dir.exists(), f"a failed run left {sorted(p.name for p in run_dir.iterdir())}"


def _table(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


ROWS = "".join(f"review number {i} is here,{i % 2}\n" for i in range(8))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: _table(d, "no_label.csv", "text,stars\n" + ROWS), "column(s) ['label'] not found"),
        (lambda d: _table(d, "torn.csv", "text,label\n" + ROWS + "a row cut short\n"), "no value for column 'label'"),
        (lambda d: _table(d, "bad.jsonl", '{"text": "fine", "label": 1}\n{"text": "cut\n'), "line 2 is not valid JSON"),
        (lambda d: _table(d, "maybe.csv", "text,label\n" + ROWS + "not sure,maybe\n"), "label 'maybe' is not one of"),
        (lambda d: _table(d, "long.csv", "text,label\n" + ROWS + " ".join(["word"] * 3000) + ",1\n"),
         "exceeds the model's context of 512 tokens"),
    ],
    ids=["csv-missing-column", "csv-short-row", "jsonl-not-json", "label-outside-verbalizer", "longer-than-context"],
)
def test_bad_table_is_one_line_and_exit_2(make, message, tmp_path):
    run_dir = tmp_path / "run"
    path = make(tmp_path)
    proc = run_cli(*TINY, "task=custom", f"task.path={path}", "task.n_train=3", "task.n_dev=3", "task.n_test=0",
                   f"hydra.run.dir={run_dir}")
    _assert_one_line_error(proc, message, run_dir)


def _unreadable_model(tmp_path: Path) -> str:
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    return str(tmp_path / "broken")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nonexistent_key=1"], "bad override: Could not override 'nonexistent_key'"),
        (["search.seeds=[0,"], "bad override 'search.seeds=[0,'"),
        (["search.max_steps=abc"], "search.max_steps='abc': expected an integer >= 0"),
        (["task.n_dev=0"], "the dev split is empty"),
        (["model@lm.scorer=hf", "lm.scorer.model=/nonexistent/model"],
         "'/nonexistent/model' is not a readable directory"),
        (["model@lm.scorer=hf", "lm.scorer.model={broken}"], "has no readable config.json"),
        (["resume={tmp}"], "nothing to resume in"),
    ],
    ids=["unknown-key", "override-syntax", "not-a-number", "empty-split", "missing-model-path",
         "unreadable-model-dir", "resume-not-a-run"],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tmp_path, data_dir):
    run_dir = tmp_path / "run"
    args = [a.format(broken=_unreadable_model(tmp_path) if "{broken}" in a else "", tmp=tmp_path) for a in args]
    proc = run_cli(*TINY, *SMALL, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", *args)
    _assert_one_line_error(proc, message, run_dir)


def _silent_server() -> tuple[socket.socket, int]:
    """A TCP port that accepts connections and never answers (not a Ray head)."""
    server = socket.socket()
    server.bind(("", 0))
    server.listen(64)

    def accept_forever() -> None:
        held = []
        try:
            while True:
                held.append(server.accept())
        except OSError:  # the test closed the server
            pass

    threading.Thread(target=accept_forever, daemon=True).start()
    return server, server.getsockname()[1]


def test_unreachable_cluster_fails_fast(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = run_cli(*TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", f"ray.address=127.0.0.1:{free_port()}")
    _assert_one_line_error(proc, "cannot reach the Ray cluster at '127.0.0.1:", run_dir)
    assert time.monotonic() - start < 60


def test_cluster_that_never_answers_times_out(tmp_path, data_dir):
    server, port = _silent_server()
    run_dir = tmp_path / "run"
    start = time.monotonic()
    try:
        # Under Ray's own 5 s: at 5 s its GCS client prints a warning of its own, which raced this error.
        proc = run_cli(*TINY, *SMALL, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                       f"ray.address=127.0.0.1:{port}", "ray.connect_timeout_s=3", timeout=240)
    finally:
        server.close()
    _assert_one_line_error(proc, "no answer within 3s", run_dir)
    assert time.monotonic() - start < 120


# ---------------------------------------------------------------------------- secrets

SECRETS = {"WANDB_API_KEY": "wandb-secret-5f3a9c", "OPENAI_API_KEY": "sk-openai-secret-81d2",
           "HF_TOKEN": "hf_secret_token_77ab"}


@pytest.mark.slow
def test_secrets_stay_out_of_logs_results_tune_files_and_wandb(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    ray_tmp = Path(tempfile.mkdtemp(prefix="psws", dir="/tmp"))  # short: Ray's socket paths
    try:
        proc = run_cli(*TINY[:2], *SMALL, "logger=wandb", f"data_dir={data_dir}", f"hydra.run.dir={run_dir}",
                       f"ray.temp_dir={ray_tmp}", "method=manual", "search=single", env=SECRETS)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _assert_no_secret_in(proc, [run_dir, ray_tmp])
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _assert_no_secret_in(proc, roots: list[Path]) -> None:
    """Neither the console nor any file under ``roots`` (run dir, Ray's logs) holds a secret."""
    files = [p for root in roots for p in root.rglob("*") if p.is_file() and p.stat().st_size < 50e6]
    assert any(p.parent.name.startswith("offline-run-") for p in files if p.suffix == ".wandb")
    assert any("tune" in p.parts for p in files) and any(p.suffix == ".log" for p in files)
    for name, secret in SECRETS.items():
        leaked = [str(p) for p in files if secret.encode() in p.read_bytes()]
        assert not leaked, f"{name} leaked into {leaked}"
        assert secret not in proc.stdout and secret not in proc.stderr, f"{name} leaked into the console"


# ---------------------------------------------------------------------------- model files


def test_trust_remote_code_is_off_unless_a_config_turns_it_on():
    assert inspect.signature(HFBackend).parameters["trust_remote_code"].default is False
    assert inspect.signature(loading.load_pretrained).parameters["trust_remote_code"].default is False
    for path in (ROOT / "conf" / "model").glob("*.yaml"):
        assert yaml.safe_load(path.read_text()).get("trust_remote_code", False) is False, path


def _save_tiny(path: Path) -> torch.nn.Module:
    tokenizer = tiny_tokenizer()
    model = tiny_model(len(tokenizer), seed=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


def test_a_model_with_its_own_code_is_refused_and_its_code_never_runs(tmp_path, data_dir):
    model_dir = tmp_path / "evil"
    _save_tiny(model_dir)
    marker = tmp_path / "code-ran"
    config = json.loads((model_dir / "config.json").read_text())
    config.update(model_type="evilnet", auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.Evil"})
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(loading.ModelLoadError):
        loading.load_pretrained(str(model_dir), torch.float32)
    run_dir = tmp_path / "run"
    proc = run_cli(*TINY, f"data_dir={data_dir}", f"hydra.run.dir={run_dir}", "model@lm.scorer=hf",
                   f"lm.scorer.model={model_dir}")
    _assert_one_line_error(proc, "runs its own code (auto_map)", run_dir)
    assert not marker.exists(), "the model's own code was executed"


def test_local_weights_load_from_safetensors_not_pickle(tmp_path):
    model_dir = tmp_path / "tiny"
    saved = _save_tiny(model_dir)
    assert list(model_dir.glob("*.safetensors"))
    # A pickle beside the safetensors file: loading it would run arbitrary code (and here fail).
    (model_dir / "pytorch_model.bin").write_bytes(b"not a pickle; unpickling this would fail")
    model, _ = loading.load_pretrained(str(model_dir), torch.float32)
    for (name, a), b in zip(saved.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
