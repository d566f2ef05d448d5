"""The comparison report from a synthetic run directory: numbers, plots, failures, families."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipelines import report

ROOT = Path(__file__).resolve().parents[1]
SUBJECTS = ("abstract_algebra", "virology")
LONG = "Think step by step | then answer " + "carefully " * 20 + "END_OF_LONG_PROMPT"
TEST = {  # (task, method) -> test score per seed; the report's means must come from these
    ("mmlu", "manual"): [0.40],
    ("mmlu", "ape"): [0.50, 0.56, 0.47],
    ("mmlu", "autoprompt"): [0.45, 0.43],
    ("mmlu", "soft"): [0.60, math.nan],
    ("sst2", "manual"): [0.70],
    ("sst2", "opro"): [0.82, 0.86],
    ("sst2", "prefix"): [0.75],
}
DEV = {"manual": 0.0, "ape": 0.1, "opro": 0.1, "autoprompt": 0.05, "soft": 0.15, "prefix": 0.12}
KIND = {"manual": "TextPrompt", "ape": "TextPrompt", "opro": "TextPrompt", "autoprompt": "TokenPrompt",
        "soft": "SoftPrompt", "prefix": "PrefixPrompt"}


def _prompt(method: str, seed: int) -> tuple[str, dict]:
    if method == "autoprompt":
        return f"answer truly seed{seed}", {"prompt_tokens": [101, 2204 + seed, 3185]}
    if method == "soft":
        return f"<soft 8x64: the correct option seed{seed}>", {"prompt_tokens": []}
    if method == "prefix":
        return "<prefix 8x11520: from 'Classify the review'>", {}
    if method == "opro":
        return (LONG if seed == 1 else "Classify | the `sentiment` *now*"), {}
    return f"{method} instruction seed{seed}", {}


def _row(task: str, method: str, seed: int, test: float) -> dict:
    text, extra = _prompt(method, seed)
    groups = {s: round(test + (0.1 if s == SUBJECTS[0] else -0.1), 3) for s in SUBJECTS} if task == "mmlu" else {}
    return {
        "trial": f"{task}-{method}-{seed}", "method": method, "task": task, "seed": seed,
        "scorer_model": "tiny-scorer", "proposer_model": "tiny-proposer", "params": {}, "prompt_kind": KIND[method],
        "best_prompt": text, "dev_score": 0.5 + 0.05 * seed + DEV[method], "test_score": test,
        "test_groups": groups, "n_test": 100, "steps": 3, "step": 3.0, "wall_s": 10.0 + seed,
        "scorer_calls": 30.0 + seed, "scorer_examples": 600.0 + 100 * seed, "n_dev": 50,
        "outputs": f"outputs/{task}-{method}-{seed}.jsonl",
        "scorer_requests": 300.0, "scorer_tokens": 1000.0 * (seed + 1), "proposer_calls": 3.0, "proposer_requests": 3.0,
        "proposer_tokens": 500.0, "status": "ok", **extra,
        **({"test_score_raw": test, "test_score_calibrated": 1.0} if task == "sst2" else {}),
    }


def _evaluations(row: dict) -> list[dict]:
    """Three steps of two candidates; the scores climb so best-so-far has something to show."""
    recs, steps = [], [1, 2, 3] if row["method"] != "manual" else [1]
    for step in steps:
        for idx in range(2):
            score = row["dev_score"] - 0.1 * (steps[-1] - step) - 0.02 * idx
            recs.append({
                "trial": row["trial"], "method": row["method"], "task": row["task"], "seed": row["seed"], "step": step,
                "idx": idx, "prompt": "p", "score": score, "n": 50, "kind": "candidate",
                "scorer_calls": (10 + 5 * len(row["method"])) * step + row["seed"], "time": 0.0,
                "scorer_examples": 200 * step, "tokens": 1000 * step, "wall_s": 2.0 * step,
            })
    return recs


N_TEST = 100


def _outputs(row: dict) -> list[dict]:
    """Per-example test records whose mean is the row's test score (each method and seed its own
    draw of which examples are right); SST-2 rows also carry raw and calibrated scores."""
    rng = np.random.default_rng(len(row["method"]) * 10 + row["seed"])
    right = np.zeros(N_TEST)
    right[rng.permutation(N_TEST)[: round(row["test_score"] * N_TEST)]] = 1
    recs = [{"input": f"x{i}", "output": "y", "gold": "y", "score": float(v), "correct": bool(v)} for i, v in enumerate(right)]
    if row["task"] == "sst2":
        for rec in recs:
            rec["score_raw"], rec["score_calibrated"] = rec["score"], 1.0
    return recs


def _write_run(run_dir: Path, with_evaluations: bool = True) -> list[dict]:
    rows = [_row(t, m, s, x) for (t, m), xs in TEST.items() for s, x in enumerate(xs)]
    (run_dir / "outputs").mkdir(parents=True, exist_ok=True)
    for row in rows:
        if math.isfinite(row["test_score"]):
            (run_dir / row["outputs"]).write_text("".join(json.dumps(r) + "\n" for r in _outputs(row)))
    failed = {"trial": "mmlu-ape-3", "method": "ape", "task": "mmlu", "seed": 3, "status": "failed",
              "error": "RuntimeError: proposer | out of memory"}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").write_text(json.dumps({"trials": rows + [failed], "wall_s": 42.0, "evaluations": 0}))
    if with_evaluations:
        lines = [json.dumps(r) for row in rows for r in _evaluations(row)]
        (run_dir / "evaluations.jsonl").write_text("\n".join(lines) + '\n{"trial": "torn')
    return rows


def _pm(xs: list[float]) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    return f"{np.mean(xs):.3f} ± {np.std(xs, ddof=1):.3f}" if len(xs) > 1 else f"{xs[0]:.3f} ± -"


def _line(text: str, start: str) -> str:
    hits = [line for line in text.splitlines() if line.startswith(start)]
    assert hits, f"no line starting with {start!r}"
    return hits[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("run")
    _write_run(path)
    report.write_report(path)
    return path


def test_summary_rows_carry_mean_and_std_over_seeds(run_dir):
    text = (run_dir / "report.md").read_text()
    mmlu = text.split("## mmlu")[1].split("## sst2")[0].split("### Cost")[1]
    ape = _line(mmlu, "| ape |")
    assert _pm(TEST["mmlu", "ape"]) in ape and "3 (+1 failed)" in ape
    assert _pm(TEST["mmlu", "autoprompt"]) in _line(mmlu, "| autoprompt |")
    assert _pm(TEST["mmlu", "manual"]) in _line(mmlu, "| manual |")  # one seed: no std to show
    soft = _line(mmlu, "| soft |")
    assert "0.600 ± -" in soft and "| 2 |" in soft  # the NaN test score is left out, the seed still counts
    # best prompt is the best-dev seed's; tokens add scorer and proposer; cost is the per-trial mean
    assert "ape instruction seed2" in ape and "2,500" in ape and "| 31 |" in ape


def test_prompts_are_escaped_truncated_and_kept_in_full(run_dir):
    text = (run_dir / "report.md").read_text()
    opro = _line(text.split("## sst2")[1].split("### Cost")[1], "| opro |")
    assert "Think step by step \\| then" in opro and "…" in opro and "END_OF_LONG_PROMPT" not in opro
    cells = [c for c in opro.replace("\\|", "").split("|")]
    assert len(cells) == 12  # ten columns: an unescaped | in a prompt would add one
    details = text.split("## Full best prompts")[1]
    assert LONG in details and "Classify | the `sentiment` *now*" in details


def test_failures_are_listed_with_their_error(run_dir):
    failures = (run_dir / "report.md").read_text().split("## Failed trials")[1].split("\n## ")[0]
    row = _line(failures, "| mmlu |")
    assert "mmlu-ape-3" in row and "RuntimeError: proposer \\| out of memory" in row


def test_family_section_shows_trigger_tokens_and_nearest_words(run_dir):
    family = (run_dir / "report.md").read_text().split("## What each family found")[1].split("## Full")[0]
    mmlu = family.split("### mmlu")[1].split("### sst2")[0]
    token = _line(mmlu, "| trigger tokens | autoprompt |")
    assert "answer truly seed1" in token and "[101, 2205, 3185]" in token  # seed 1 has the best dev
    soft = _line(mmlu, "| soft prompt | soft |")
    assert "the correct option seed1" in soft and "8 vectors x 64 dims" in soft and "&lt;soft" not in soft
    kinds = [line.split("|")[1].strip() for line in mmlu.splitlines() if line.startswith("| ") and "family" not in line]
    assert kinds == ["text instruction", "text instruction", "trigger tokens", "soft prompt"]
    prefix = _line(family.split("### sst2")[1], "| key/value prefix | prefix |")
    assert "trained from 'Classify the review'" in prefix and "8 positions x 11520 key/value numbers" in prefix


def test_group_table_is_subject_by_method(run_dir):
    groups = (run_dir / "report.md").read_text().split("### Test score per group")[1].split("\n## ")[0]
    assert _line(groups, "| group |") == "| group | manual | ape | autoprompt | soft |"
    algebra = _line(groups, "| abstract\\_algebra |")
    assert f"{np.mean(TEST['mmlu', 'ape']) + 0.1:.3f}" in algebra.split("|")[3]
    assert "### Test score per group" not in (run_dir / "report.md").read_text().split("## sst2")[1]


def test_plots_are_real_pngs_and_linked(run_dir):
    from matplotlib.image import imread

    paths = report.plot_paths(run_dir)
    names = {p.name for p in paths}
    assert names == {f"{kind}_{task}.png" for kind in ("best_so_far", "test", "cost") for task in ("mmlu", "sst2")}
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000
        h, w = imread(p).shape[:2]
        assert h >= 400 and w >= 500
        assert f"]({p.name})" in (run_dir / "report.md").read_text()


def test_tables_for_the_driver_are_numeric(run_dir):
    tables = report.report_tables(run_dir)
    assert set(tables) == {"summary/mmlu", "prompts/mmlu", "groups/mmlu", "summary/sst2", "prompts/sst2", "failures",
                           "leaderboard/mmlu", "leaderboard/sst2", "calibration/sst2"}
    ape = tables["summary/mmlu"].set_index("method").loc["ape"]
    assert ape["test_mean"] == pytest.approx(np.mean(TEST["mmlu", "ape"]))
    assert ape["test_std"] == pytest.approx(np.std(TEST["mmlu", "ape"], ddof=1))
    assert list(tables["failures"]["trial"]) == ["mmlu-ape-3"]


def test_best_so_far_keeps_full_dev_scores_and_shares_each_steps_cost_among_its_candidates():
    recs = [
        {"score": 0.5, "n": 40, "scorer_calls": 5},
        {"score": 0.9, "n": 8, "scorer_calls": 5},  # racing on 8 examples: too noisy to count, its cost does
        {"score": 0.4, "n": 40, "scorer_calls": 5},
        {"score": math.nan, "n": 40, "scorer_calls": 9},
        {"score": 0.7, "n": 40, "scorer_calls": 12},
    ]
    x, y = report.best_so_far(recs, "scorer_calls")
    assert np.allclose(x, [5 * 40 / 88, 5, 9, 12]) and y.tolist() == [0.5, 0.5, 0.5, 0.7]
    # a one-step method that scored four candidates on 64 examples each: four points, not one
    x, y = report.best_so_far([{"score": s, "n": 64, "scorer_examples": 256} for s in (0.6, 0.8, 0.7, 0.9)])
    assert x.tolist() == [64, 128, 192, 256] and y.tolist() == [0.6, 0.8, 0.8, 0.9]


def test_mean_curve_starts_with_the_last_seed_and_holds_each_final_best():
    seeds = [(np.array([1.0, 3.0]), np.array([0.2, 0.6])), (np.array([2.0]), np.array([0.4]))]
    x, mean, lo, hi = report.mean_curve(seeds)
    assert x.tolist() == [2, 3]  # from where both seeds have started
    assert np.allclose(mean, [0.3, 0.5]) and np.allclose(lo, [0.2, 0.4]) and np.allclose(hi, [0.4, 0.6])


def test_missing_log_and_only_failures_still_report(tmp_path):
    _write_run(tmp_path / "nolog", with_evaluations=False)
    text = report.write_report(tmp_path / "nolog").read_text()
    assert "_No best-so-far dev score plot" in text and "](test_mmlu.png)" in text
    failed = {"trial": "t0", "method": "ape", "task": "sst2", "seed": 0, "status": "failed", "error": "ValueError: bad"}
    (tmp_path / "fail").mkdir()
    (tmp_path / "fail" / "summary.json").write_text(json.dumps({"trials": [failed], "wall_s": 1.0, "evaluations": 0}))
    text = report.write_report(tmp_path / "fail").read_text()
    assert "_No trial finished._" in text and "ValueError: bad" in text
    assert report.plot_paths(tmp_path / "fail") == []


def test_cli_without_summary_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipelines.report", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and "summary.json" in proc.stderr


def test_every_method_gets_its_own_color_even_past_ten(tmp_path):
    rows = [_row("sst2", m, 0, 0.7) for m in ["manual", "ape", "opro", "autoprompt", "soft", "prefix"]]
    rows += [{**_row("sst2", "ape", 0, 0.7), "method": f"m{i}"} for i in range(6)]
    colors = report._colors(report.Run(tmp_path, tuple(rows), (), (), 0.0))
    assert len(colors) == 12 and len(set(colors.values())) == 12


def test_the_leaderboard_ranks_by_test_with_intervals_and_corrected_p_values(run_dir):
    board = report.report_tables(run_dir)["leaderboard/mmlu"].set_index("method")
    assert list(board.sort_values("rank").index) == ["soft", "ape", "autoprompt", "manual"]  # mean test, NaN seed out
    ape = board.loc["ape"]
    assert ape["test"] == pytest.approx(np.mean(TEST["mmlu", "ape"]))
    # the interval is over test examples: for one seed about +-2 binomial standard errors of n=100;
    # averaging three seeds' per-example scores first narrows it
    manual = board.loc["manual"]
    half = 1.96 * math.sqrt(manual["test"] * (1 - manual["test"]) / N_TEST)
    assert manual["ci_hi"] - manual["ci_lo"] == pytest.approx(2 * half, rel=0.15)
    assert ape["ci_lo"] < ape["test"] < ape["ci_hi"] and ape["ci_hi"] - ape["ci_lo"] < 2 * half
    lo, hi = ape[["seed_lo", "seed_hi"]]
    assert lo < ape["test"] < hi and math.isnan(board.loc["manual", "seed_lo"])  # one seed: no t-interval
    assert math.isnan(board.loc["manual", "p_manual"]) and math.isnan(board.loc["soft", "p_best"])
    assert board["p_empty"].isna().all()  # no empty baseline in this run
    # soft (0.60) vs manual (0.40) on 100 examples is a real difference; Holm never lowers a p-value
    assert board.loc["soft", "p_manual"] < 0.05
    run = report.load_run(run_dir)
    scores = lambda m: report.score_matrix(run, [r for r in run.ok if r["task"] == "mmlu" and r["method"] == m])  # noqa: E731
    raw = report._p(scores("soft"), scores("manual"))
    assert board.loc["soft", "p_manual"] == pytest.approx(min(1.0, 3 * raw))  # the smallest of three p-values: x3
    assert board.loc["ape", "examples"] == pytest.approx(700.0)  # mean of 600, 700, 800


def test_the_leaderboard_in_the_report_says_how_it_was_computed(run_dir):
    text = (run_dir / "report.md").read_text()
    board = text.split("## sst2")[1].split("### Leaderboard")[1].split("### Cost")[0]
    opro = _line(board, "| 1 | opro |")
    assert "0.840" in opro and "[" in opro and "0.840 → 1.000" in opro  # raw -> calibrated
    assert "Holm" in board and "paired permutation" in board
    cal = _line(text.split("## sst2")[1].split("### Raw and calibrated")[1], "| manual |")
    assert "0.700" in cal and "1.000" in cal and "+0.300" in cal


def test_anytime_score_rewards_finding_it_early():
    from pipelines.stats import anytime_score

    early = anytime_score(np.array([100.0, 200.0]), np.array([0.8, 0.8]), 1000)
    late = anytime_score(np.array([100.0, 900.0]), np.array([0.2, 0.8]), 1000)
    assert early == pytest.approx(0.8 * 0.9) and late == pytest.approx((0.2 * 800 + 0.8 * 100) / 1000)
    assert early > late
    assert anytime_score(np.array([100.0, 1500.0]), np.array([0.5, 1.0]), 1000) == pytest.approx(0.45)  # past the budget: cut


def test_the_overfit_flag_marks_a_dev_score_far_above_test(tmp_path):
    rows = [{**_row("sst2", "manual", 0, 0.70), "dev_score": 0.72},
            {**_row("sst2", "ape", 0, 0.70), "dev_score": 0.95, "n_dev": 50}]  # 0.25 > 2 SE of 50 examples
    board = report.leaderboard(report.Run(tmp_path, tuple(rows), (), (), 0.0), "sst2").set_index("method")
    assert bool(board.loc["ape", "overfit"]) and not bool(board.loc["manual", "overfit"])


def test_the_anytime_span_is_the_common_cap_else_the_largest_spend(tmp_path):
    rows = [{**_row("sst2", m, 0, 0.7), "budget_examples": 2000} for m in ("manual", "ape")]
    assert report.budget_span(report.Run(tmp_path, tuple(rows), (), (), 0.0), "sst2") == 2000
    rows[1]["budget_examples"] = None
    assert report.budget_span(report.Run(tmp_path, tuple(rows), (), (), 0.0), "sst2") == 600.0
