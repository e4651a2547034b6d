"""The experiment scripts' own arithmetic: tables, curves and figures from metrics files."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = load_script("compare")
mechanism = load_script("mechanism")


def write_run(workdir, rows):
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def fake_rows(n, *, env_steps=100, seed=0, rise_at=10):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        success = float(i >= rise_at)
        hist = np.zeros(mechanism.ALPHA_BINS)
        hist[mechanism.ALPHA_BINS // 2 if i < n // 2 else 0] = 1.0
        rows.append({"step": i + 1, "env_steps": env_steps, "success": success, "token_entropy": 2.0 - i / n,
                     "invalid_action_rate": 1.0 - success, "wall_s": 10.0 * (i + 1),
                     "time_rollout_s": 30.0 if i < 5 else 2.0, "time_update_s": 3.0,
                     "predicted_entropy_drift": float(rng.normal()), "measured_entropy_change": float(rng.normal()),
                     "predicted_entropy_drift_pos": 0.1, "predicted_entropy_drift_neg": -0.2,
                     "frac_positive_advantage": 0.5, **{f"alpha_hist_{k}": float(h) for k, h in enumerate(hist)}})
    return rows


@pytest.mark.parametrize("n,width", [(1, 5), (3, 5), (12, 5), (12, 4), (7, 1)])
def test_smooth_is_the_mean_of_the_values_in_reach(n, width):
    values = np.random.default_rng(n).normal(size=n)
    got = compare.smooth(values.tolist(), width)
    w = min(width, n)
    # np.convolve(mode="same") centres the window at offset (w - 1) // 2 of the kernel.
    lo = [max(0, i - (w - 1) + (w - 1) // 2) for i in range(n)]
    hi = [min(n, i + (w - 1) // 2 + 1) for i in range(n)]
    want = [values[a:b].mean() for a, b in zip(lo, hi)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    np.testing.assert_allclose(compare.smooth([3.0] * n, width), 3.0)


def test_summarise_reads_up_to_the_budget():
    curves = compare.curves(fake_rows(30, rise_at=10))
    full = compare.summarise(curves, budget=3000, threshold=0.8)
    assert full["steps_used"] == 30
    assert full["final_success"] == 1.0 and full["final_invalid"] == 0.0
    # Success is 1 from index 10: the 5-step mean over indices 9..13 is the first
    # to reach 0.8, so the threshold is reached at index 13, after 14 x 100 env steps.
    assert full["env_steps_to_threshold"] == 1400
    early = compare.summarise(curves, budget=1000, threshold=0.8)
    assert early["steps_used"] == 10
    assert early["final_success"] == 0.0 and early["env_steps_to_threshold"] is None
    short = compare.summarise(compare.curves(fake_rows(2, rise_at=0)), budget=1e9, threshold=0.8)
    assert short["steps_used"] == 2 and short["env_steps_to_threshold"] == 200


def test_total_wall_sums_resumed_sessions():
    assert compare.total_wall([{"wall_s": w} for w in (5, 10, 15)]) == 15
    assert compare.total_wall([{"wall_s": w} for w in (5, 10, 3, 8, 2)]) == 20


def test_table_reports_mean_std_and_unreached_seeds():
    results = {}
    for method, rise in (("fast", 5), ("never", 100)):
        runs = []
        for seed in range(3):
            c = compare.curves(fake_rows(20, seed=seed, rise_at=rise + seed))
            runs.append(dict(c, seed=seed, summary=compare.summarise(c, 2000, 0.8)))
        results[method] = runs
    text = compare.table(results, 0.8, 2000)
    lines = text.splitlines()
    assert lines[0].count("|") == lines[2].count("|") == 8
    assert "| fast | 3 | 1.00 +- 0.00 | 1,000 +- 82 | 0.00 +- 0.00 | 2.00 + 3.00 | 200 |" in text
    assert "| never | 3 | 0.00 +- 0.00 | never (0/3 seeds) | 1.00 +- 0.00 |" in text


def test_command_per_environment_and_unknown_method():
    cmd = compare.command("grpo_aem", "textworld", 2, 40, "/w", ["--config.x=1"])
    assert cmd[1:4] == ["-m", "aem_jax.train", "--config=configs/default.py:textworld"]
    assert "--config.aem.enabled=True" in cmd and "--config.seed=2" in cmd and "--config.total_steps=40" in cmd
    assert cmd[-1] == "--workdir=/w" and "--config.x=1" in cmd
    assert compare.command("etpo", "treasure", 0, 5, "/w", [])[3] == "--config=configs/etpo.py"
    assert "--config.archer.critic_steps=3" in compare.command("archer", "textworld", 0, 5, "/w", [])
    assert not [a for a in compare.command("archer", "treasure", 0, 5, "/w", []) if "critic_steps" in a]
    with pytest.raises(ValueError, match="unknown method 'grpo_aen'.*grpo_aem"):
        compare.command("grpo_aen", "treasure", 0, 5, "/w", [])
    for group in compare.GROUPS.values():
        assert set(group) <= set(compare.METHODS)


def test_comparison_runs_every_method_with_the_same_dual_clip():
    """The default job turns dual clip on; a comparison turns it off for every
    method except the *_dc pair, which measures it, and the default job itself."""
    from aem_jax.trainer import setup

    assert setup.load_config(os.path.join(ROOT, "configs/default.py")).loss.dual_clip == 3.0
    for env in compare.ENVS:
        for method in compare.METHODS:
            cmd = compare.command(method, env, 0, 5, "/w", [])
            spec = cmd[3].removeprefix("--config=")
            overrides = [a.removeprefix("--config.") for a in cmd if a.startswith("--config.")]
            config = setup.load_config(os.path.join(ROOT, spec), overrides)
            assert config.loss.dual_clip == (3.0 if method.endswith("_dc") or method == "default" else 0.0), (env, method)


def test_compare_reuses_finished_runs_and_writes_table_and_figure(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    for method in ("grpo", "grpo_aem"):
        for seed in (0, 1):
            write_run(runs / f"{method}_s{seed}", fake_rows(12 if method == "grpo" else 15, seed=seed))
    out = tmp_path / "docs" / "cmp"
    os.makedirs(out.parent)
    monkeypatch.setattr(sys, "argv", ["compare.py", "--methods", "grpo", "grpo_aem", "--seeds", "0", "1",
                                      "--steps", "12", "--runs-dir", str(runs), "--out", str(out)])
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("finished runs must not be retrained"))
    compare.main()
    data = json.loads((tmp_path / "docs" / "cmp.json").read_text())
    assert data["budget_env_steps"] == 1200
    assert [r["summary"]["steps_used"] for r in data["results"]["grpo_aem"]] == [12, 12]
    assert (tmp_path / "docs" / "cmp.md").read_text().startswith("| method |")
    assert (tmp_path / "docs" / "cmp.png").stat().st_size > 10_000
    assert not [p for p in os.listdir(tmp_path / "docs") if ".tmp" in p]


def test_heldout_runs_evaluate_finished_runs_once_and_fill_the_seed_table(tmp_path, monkeypatch):
    """--heldout N: a finished run without eval.json is resumed (which only evaluates);
    one with it is reused; the per-run table reports the held-out success and steadiness."""
    runs = tmp_path / "runs"
    rows = fake_rows(12, rise_at=4)
    rows[9]["success"] = 0.5  # a dip after the 5-step mean first reached 0.9 (step 9)
    for r, kl in zip(rows, np.linspace(0.0, 3.0, 12)):
        r["approx_kl"] = float(kl)
    for seed in (0, 1):
        write_run(runs / f"grpo_aem_dc_s{seed}", rows)
    (runs / "grpo_aem_dc_s1" / "eval.json").write_text(json.dumps(
        {"step": 12, "num_tasks": 8, "success_before": 0.0, "success_after": 0.875}))
    calls = []

    def fake_train(cmd, **kwargs):  # what the trainer's final evaluation leaves behind
        calls.append(cmd)
        workdir = next(a for a in cmd if a.startswith("--workdir=")).removeprefix("--workdir=")
        assert "--config.eval.num_tasks=8" in cmd
        with open(os.path.join(workdir, "eval.json"), "w") as f:
            json.dump({"step": 12, "num_tasks": 8, "success_before": None, "success_after": 0.5}, f)

    monkeypatch.setattr(compare.subprocess, "run", fake_train)
    out = tmp_path / "seeds"
    monkeypatch.setattr(sys, "argv", ["compare.py", "--methods", "grpo_aem_dc", "--seeds", "0", "1", "--steps", "12",
                                      "--heldout", "8", "--runs-dir", str(runs), "--out", str(out)])
    compare.main()
    assert len(calls) == 1 and "--workdir=" + str(runs / "grpo_aem_dc_s0") in calls[0]
    text = (tmp_path / "seeds.md").read_text()
    assert "| grpo_aem_dc | 0 | 12 | 9 | 0.50 | 3.00 | 0.75 | 0.50 (8 tasks) |" in text
    assert "| grpo_aem_dc | 1 | 12 | 9 | 0.50 | 3.00 | 0.75 | 0.88 (8 tasks) |" in text
    compare.main()  # both evaluated now: nothing runs
    assert len(calls) == 1


def test_mechanism_stats_and_figures(tmp_path, monkeypatch):
    rows = fake_rows(40)
    pred = mechanism.series(rows, "predicted_entropy_drift")
    meas = mechanism.series(rows, "measured_entropy_change")
    meas[0] = np.nan  # the first step has no previous entropy
    for r, m in zip(rows, meas):
        r["measured_entropy_change"] = None if np.isnan(m) else float(m)
    stats = mechanism.drift_stats([rows])
    assert stats["n_steps"] == 39
    np.testing.assert_allclose(stats["pearson_r"], np.corrcoef(pred[1:], meas[1:])[0, 1])
    np.testing.assert_allclose(stats["sign_agreement"], np.mean(np.sign(pred[1:]) == np.sign(meas[1:])))
    np.testing.assert_allclose(mechanism.alpha_hist(rows[:20]), np.eye(mechanism.ALPHA_BINS)[mechanism.ALPHA_BINS // 2])

    write_run(tmp_path / "a_s0", rows)
    out = tmp_path / "mech"
    monkeypatch.setattr(sys, "argv", ["mechanism.py", "--runs", str(tmp_path / "a_s0"), "--out", str(out)])
    mechanism.main()
    summary = json.loads((tmp_path / "mech.json").read_text())
    assert summary["alpha_at_1_early_late"] == [1.0, 0.0]
    for suffix in ("drift", "positive", "alpha"):
        assert (tmp_path / f"mech_{suffix}.png").stat().st_size > 5_000


def test_random_player_matches_the_games_odds(monkeypatch, capsys):
    """A random valid player of the default game wins about 4% (docs/results.md), far below learnt policies."""
    random_player = load_script("random_player")
    monkeypatch.setattr(sys, "argv", ["random_player.py", "--episodes", "4000"])
    random_player.main()
    rate = float(capsys.readouterr().out.split(":")[1].split()[0])
    assert 0.03 < rate < 0.07


def test_warm_start_commands_load_into_configs(tmp_path):
    """--warm DIR: every method starts from DIR at lr 1e-4; ArCHer and ETPO carry their recipes,
    and every command still loads into a valid config."""
    from aem_jax.trainer import setup

    for method in compare.GROUPS["all"]:
        cmd = compare.command(method, "treasure", 0, 5, "/w", [], warm="/ws")
        overrides = [a.removeprefix("--config.") for a in cmd if a.startswith("--config.")]
        config = setup.load_config(os.path.join(ROOT, cmd[3].removeprefix("--config=")), overrides)
        assert config.model.source == "/ws" and config.optim.learning_rate == pytest.approx(1e-4), method
    archer = compare.command("archer", "dungeon", 0, 5, "/w", [], warm="/ws")
    assert {"--config.archer.critic.from_policy=True", "--config.optim.learning_rate=0.0001",
            "--config.archer.critic_learning_rate=0.0003"} <= set(archer)
    assert "--config.optim.learning_rate=0.0003" in compare.command("grpo", "dungeon", 0, 5, "/w", [], warm="/ws")
    assert "--config.archer.critic.from_policy=True" in archer and "--config=configs/archer.py:longhorizon" in archer
    etpo = compare.command("etpo", "treasure", 0, 5, "/w", [], warm="/ws")
    assert {"--config.etpo.q.residual=True", "--config.etpo.beta=0.1"} <= set(etpo)
    assert not [a for a in compare.command("grpo", "treasure", 0, 5, "/w", []) if "model.source" in a]


def test_report_only_tables_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    write_run(runs / "grpo_s0", fake_rows(12, seed=0))
    write_run(runs / "grpo_s1", fake_rows(7, seed=1))      # unfinished: left out
    write_run(runs / "grpo_aem_s1", fake_rows(12, seed=1))
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("--report-only trains nothing"))
    out = tmp_path / "partial"
    argv = ["compare.py", "--methods", "grpo", "grpo_aem", "ppo", "--seeds", "0", "1", "--steps", "12",
            "--runs-dir", str(runs), "--out", str(out), "--report-only"]
    monkeypatch.setattr(sys, "argv", argv)
    compare.main()
    data = json.loads((tmp_path / "partial.json").read_text())
    assert {m: [r["seed"] for r in rs] for m, rs in data["results"].items()} == {"grpo": [0], "grpo_aem": [1]}
    monkeypatch.setattr(sys, "argv", argv[:-7] + ["--runs-dir", str(tmp_path / "none"), "--out", str(out),
                                                  "--report-only"])
    with pytest.raises(SystemExit):
        compare.main()


def test_env_steps_budget_ends_each_run_where_its_environment_steps_reach_it(tmp_path, monkeypatch):
    rows = fake_rows(12)  # 100 environment steps per step
    assert compare.end_step(rows, 12) == 12 and compare.end_step(rows[:5], 12) is None
    assert compare.end_step(rows, 12, env_steps=450) == 5 and compare.end_step(rows, 12, env_steps=5000) == 12
    assert compare.end_step(rows[:3], 12, env_steps=450) is None
    cmd = compare.command("dapo", "treasure", 0, 60, "/w", [], env_steps=61440)
    assert "--config.env_steps_budget=61440" in cmd and "--config.total_steps=60" in cmd
    runs = tmp_path / "runs"
    for seed in (0, 1):  # a budget run stopped at step 5 with its evaluation there
        write_run(runs / f"dapo_s{seed}", rows[:5])
        (runs / f"dapo_s{seed}" / "eval.json").write_text(json.dumps(
            {"step": 5, "num_tasks": 8, "success_before": 0.0, "success_after": 0.5}))
    assert compare.finished(str(runs / "dapo_s0"), 12, 8, 450)
    assert not compare.finished(str(runs / "dapo_s0"), 12, 8, 0)  # without the budget it is 7 steps short
    monkeypatch.setattr(compare.subprocess, "run", lambda *a, **k: pytest.fail("finished runs must not be retrained"))
    out = tmp_path / "b"
    monkeypatch.setattr(sys, "argv", ["compare.py", "--methods", "dapo", "--seeds", "0", "1", "--steps", "12",
                                      "--env-steps", "450", "--heldout", "8", "--runs-dir", str(runs),
                                      "--out", str(out)])
    compare.main()
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["env_steps_budget"] == 450 and data["budget_env_steps"] == 500
    assert [len(r["success"]) for r in data["results"]["dapo"]] == [5, 5]
