"""Tests for experiments/summary.py: the comparison's statistics and its JSON."""
import importlib.util
import itertools
import json
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_summary", REPO / "experiments" / "summary.py")
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)


def _brute_p(d):
    """Two-sided sign-flip p-value by looping over subsets of flipped pairs."""
    d = list(map(float, d))
    total, hits = 0, 0
    for k in range(len(d) + 1):
        for flipped in itertools.combinations(range(len(d)), k):
            s = sum(-x if i in flipped else x for i, x in enumerate(d))
            hits += abs(s) >= abs(sum(d)) - 1e-12
            total += 1
    return hits / total


def test_sign_flip_p_value_matches_enumeration_on_random_differences():
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 7):
        for _ in range(20):
            d = np.round(rng.normal(size=n), 2)
            assert summary.sign_flip_p_value(d) == pytest.approx(_brute_p(d), abs=1e-12)
    assert summary.sign_flip_p_value([0.1, 0.2, 0.05, 0.3, 0.4]) == pytest.approx(2 / 32)
    assert summary.sign_flip_p_value([0.0, 0.0]) == 1.0
    with pytest.raises(ValueError, match="21 pairs"):
        summary.sign_flip_p_value(np.ones(21))


def test_bootstrap_interval_of_the_mean():
    assert summary.bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx([0.4, 0.4])
    x = np.random.default_rng(1).normal(0.5, 0.2, size=400)
    lo, hi = summary.bootstrap_ci(x)
    half = 1.96 * x.std() / np.sqrt(x.size)  # the normal approximation, fine at n = 400
    assert lo == pytest.approx(x.mean() - half, abs=0.15 * half)
    assert hi == pytest.approx(x.mean() + half, abs=0.15 * half)
    assert summary.bootstrap_ci(x) == [lo, hi]  # reproducible
    with pytest.raises(ValueError):
        summary.bootstrap_ci([])


def _run(seed, success, after=None, before=None, wall=None):
    return {"seed": seed, "success": success, "wall_s": wall, "summary": {"final_success": float(np.mean(success[-10:]))},
            "heldout": None if after is None else {"success_after": after, "success_before": before}}


def test_summary_file_shape_sources_and_pairs(tmp_path):
    compare = {"env": "treasure", "budget_env_steps": 100.0, "steps": 20, "overrides": [], "results": {
        "grpo": [_run(s, [0.2] * 10 + [0.5] * 10, after=0.5 + 0.01 * s, before=0.2) for s in range(5)],
        "grpo_aem": [_run(s, [0.2] * 10 + [0.6] * 10, after=0.6 + 0.01 * s, before=0.2) for s in range(5)],
        "ppo": [_run(s, [0.1] * 10 + [0.3] * 10) for s in range(3)],
    }}
    src = tmp_path / "compare.json"
    src.write_text(json.dumps(compare))
    out = tmp_path / "results" / "summary.json"
    summary.main(["--compare", f"treasure={src}", "--out", str(out)])
    data = json.loads(out.read_text())
    env = data["environments"]["treasure"]
    grpo, ppo = env["methods"]["grpo"], env["methods"]["ppo"]
    assert grpo["seeds"] == 5 and grpo["start_success"] == pytest.approx(0.2)
    assert grpo["final_success_mean"] == pytest.approx(0.52) and "held-out" in grpo["final_success_source"]
    lo, hi = grpo["final_success_ci95"]
    assert 0.5 <= lo <= 0.52 <= hi <= 0.54
    assert ppo["final_success_mean"] == pytest.approx(0.3) and "training" in ppo["final_success_source"]
    assert ppo["start_success"] == pytest.approx(0.1) and ppo["start_success_per_seed"] == [0.1] * 3
    assert ppo["seeds_above_start"] == 3 and grpo["seeds_above_start"] == 5
    pair = env["aem_pairs"]["grpo"]
    assert set(env["aem_pairs"]) == {"grpo"}
    assert pair["mean_difference"] == pytest.approx(0.1) and pair["p_value"] == pytest.approx(2 / 32)
    assert pair["seeds"] == [0, 1, 2, 3, 4] and pair["smallest_possible_p_value"] == pytest.approx(2 / 32)
    assert not (tmp_path / "results" / "summary.json.tmp").exists()
    assert grpo["loop_hours"] is None  # the fake runs carry no wall times


def test_a_committed_comparison_summarises(tmp_path):
    out = tmp_path / "s.json"
    summary.main(["--compare", f"treasure={REPO / 'docs' / 'compare_treasure.json'}", "--out", str(out)])
    methods = json.loads(out.read_text())["environments"]["treasure"]["methods"]
    assert {"grpo", "grpo_aem"} <= set(methods)


def test_bad_arguments_are_named(tmp_path, capsys):
    with pytest.raises(SystemExit):
        summary.main(["--compare", "treasure"])
    assert "expected ENV=PATH.json" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        summary.main(["--compare", f"treasure={tmp_path / 'missing.json'}"])
    assert "no such file" in capsys.readouterr().err


def test_an_environment_pools_its_files_and_pairs_the_ablations(tmp_path):
    grpo = [_run(s, [0.5] * 10, after=0.5, before=0.3, wall=360.0) for s in range(5)]
    aem = [_run(s, [0.6] * 10, after=0.6 + 0.01 * s, before=0.3, wall=360.0) for s in range(5)]
    main = {"budget_env_steps": 100.0, "steps": 10, "results": {"grpo": grpo, "grpo_aem": aem}}
    abl = {"budget_env_steps": 90.0, "steps": 10, "results": {
        "grpo_aem": aem, "aem_reversed": [_run(s, [0.4] * 10, after=0.4, before=0.3, wall=360.0) for s in range(5)]}}
    (tmp_path / "main.json").write_text(json.dumps(main))
    (tmp_path / "abl.json").write_text(json.dumps(abl))
    out = tmp_path / "s.json"
    summary.main(["--compare", f"t={tmp_path / 'main.json'}", "--compare", f"t={tmp_path / 'abl.json'}",
                  "--out", str(out), "--markdown", str(tmp_path / "s.md")])
    text = (tmp_path / "s.md").read_text()
    assert "| grpo_aem | 5 | 0.30 | **0.62** [0.61, 0.63] | 0.60, 0.61, 0.62, 0.63, 0.64 | 5/5 | - | 0.50 |" in text
    assert "| aem_reversed - grpo_aem | 5 | -0.220 [-0.232, -0.208] | 0.062 (smallest possible 0.062) |" in text
    env = json.loads(out.read_text())["environments"]["t"]
    assert set(env["methods"]) == {"grpo", "grpo_aem", "aem_reversed"}
    assert env["loop_hours"] == pytest.approx(15 * 360 / 3600)  # 5 runs x 3 methods x 360 s
    assert env["budget_env_steps"] == [100.0, 90.0]
    assert env["aem_pairs"]["grpo"]["mean_difference"] == pytest.approx(0.12)
    rev = env["ablation_pairs"]["aem_reversed"]
    assert rev["against"] == "grpo_aem" and rev["mean_difference"] == pytest.approx(-0.22)
    assert rev["p_value"] == pytest.approx(2 / 32)
    abl["results"]["grpo_aem"] = [_run(s, [0.6] * 10, after=0.7, before=0.3, wall=360.0) for s in range(5)]
    (tmp_path / "abl.json").write_text(json.dumps(abl))
    with pytest.raises(SystemExit):
        summary.main(["--compare", f"t={tmp_path / 'main.json'}", "--compare", f"t={tmp_path / 'abl.json'}",
                      "--out", str(out)])


def test_a_reevaluation_is_kept_under_its_environment_and_tabled(tmp_path, capsys):
    compare = {"env": "dungeon", "budget_env_steps": 100.0, "steps": 20, "overrides": [], "results": {
        "etpo": [_run(s, [0.2] * 20, after=0.2, before=0.2) for s in range(2)]}}
    src = tmp_path / "compare.json"
    src.write_text(json.dumps(compare))
    reeval = {"tasks": 512, "samples_per_task": 1, "methods": {"etpo": {
        "seeds": 2, "before_mean": 0.2, "after_mean": 0.21, "difference_mean": 0.01, "difference_ci95": [-0.01, 0.03],
        "seeds_above_start": 1, "runs": [{"difference": 0.03}, {"difference": -0.01}]}},
        "pairs": {"etpo_q4 - etpo": {"seeds": 2, "mean_difference": 0.02, "ci95": [0.0, 0.04], "p_value": 0.5}}}
    path = tmp_path / "reeval.json"
    path.write_text(json.dumps(reeval))
    out, md = tmp_path / "s.json", tmp_path / "s.md"
    summary.main(["--compare", f"dungeon={src}", "--reeval", f"dungeon={path}", "--out", str(out),
                  "--markdown", str(md)])
    kept = json.loads(out.read_text())["environments"]["dungeon"]["paired_reevaluation"]
    assert kept["methods"] == reeval["methods"] and kept["source"] == str(path)
    assert "| etpo | 2 | 0.200 | 0.210 | **+0.010** [-0.010, +0.030] | 1/2 | +0.030, -0.010 |" in md.read_text()
    with pytest.raises(SystemExit):
        summary.main(["--compare", f"dungeon={src}", "--reeval", f"treasure={path}", "--out", str(out)])
    assert "no --compare for 'treasure'" in capsys.readouterr().err
