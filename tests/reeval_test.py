"""Tests for experiments/reeval.py: the paired statistics, and a run restored and re-evaluated."""
import importlib.util
import json
import pathlib

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("experiments_reeval", REPO / "experiments" / "reeval.py")
rv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rv)


def test_paired_difference_against_a_plain_computation():
    rng = np.random.default_rng(0)
    before = (rng.random((50, 3)) < 0.3).astype(float)
    after = (rng.random((50, 3)) < 0.5).astype(float)
    out = rv.paired_difference(before, after, draws=4000)
    assert out["before"] == pytest.approx(before.mean()) and out["after"] == pytest.approx(after.mean())
    d = after.mean(1) - before.mean(1)
    assert out["difference"] == pytest.approx(d.mean())
    lo, hi = out["difference_ci95"]
    se = d.std(ddof=1) / np.sqrt(d.size)
    assert lo < d.mean() < hi
    assert (hi - lo) == pytest.approx(2 * 1.96 * se, rel=0.15)  # the bootstrap's width is the normal one's
    assert (out["tasks"], out["samples_per_task"]) == (50, 3)
    same = rv.paired_difference(before, before)
    assert same["difference"] == 0.0 and same["difference_ci95"] == [0.0, 0.0]


def test_paired_difference_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(4, 2\) and \(4, 1\)"):
        rv.paired_difference(np.zeros((4, 2)), np.zeros((4, 1)))


def test_reeval_restores_a_run_and_plays_both_policies_on_the_same_tasks(tmp_path, monkeypatch):
    from aem_jax.trainer import loop
    from tests.trainer.archer_test import load_config

    monkeypatch.chdir(REPO)
    config = load_config("default", "smoke")
    config.total_steps = 2
    config.eval.num_tasks = 0
    config.optim.learning_rate = 1e-2  # the policy moves visibly in 2 steps
    loop.train(config, str(tmp_path / "run"))
    flags = ["--config=configs/default.py:smoke", "--config.total_steps=2", "--config.eval.num_tasks=0",
             "--config.optim.learning_rate=0.01"]
    out = tmp_path / "reeval.json"
    result = rv.main(["--workdir", str(tmp_path / "run"), "--tasks", "6", "--samples", "2", "--out", str(out),
                      "--", *flags])
    assert result["step"] == 2 and (result["tasks"], result["samples_per_task"]) == (6, 2)
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    assert result["relative_parameter_change"] > 0.0
    assert json.loads(out.read_text()) == result
    assert not list(tmp_path.glob("*.tmp"))
    # a config that differs from the run's is refused, naming the key
    with pytest.raises(Exception, match="optim.learning_rate"):
        rv.main(["--workdir", str(tmp_path / "run"), "--tasks", "2", "--", *flags[:-1]])
