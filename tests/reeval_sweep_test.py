"""Tests for experiments/reeval_sweep.py: the tables from finished runs' paired re-evaluations."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
_spec = importlib.util.spec_from_file_location("experiments_reeval_sweep", REPO / "experiments" / "reeval_sweep.py")
rs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rs)


def _fake_run(workdir: pathlib.Path, *, steps: int, heldout: int, before: float, after: float, seed: int):
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "env_steps": 10.0}) + "\n"
                                                   for i in range(steps)))
    (workdir / "eval.json").write_text(json.dumps({"step": steps, "num_tasks": heldout}))
    (workdir / "reeval_8x1.json").write_text(json.dumps(
        {"before": before, "after": after, "difference": after - before, "difference_ci95": [after - before - 0.1,
                                                                                              after - before + 0.1],
         "seed": seed}))


def test_sweep_tables_per_seed_means_and_pairs_from_finished_runs(tmp_path, capsys):
    runs = tmp_path / "runs"
    afters = {"etpo": [0.20, 0.22, 0.25], "etpo_q4": [0.30, 0.21, 0.35]}
    for m, values in afters.items():
        for s, a in enumerate(values):
            _fake_run(runs / f"{m}_s{s}", steps=3, heldout=4, before=0.2, after=a, seed=s)
    (runs / "etpo_s3").mkdir()  # unfinished: left out
    out = tmp_path / "docs" / "table"
    result = rs.main(["--env", "dungeon", "--methods", "etpo", "etpo_q4", "--seeds", "0", "1", "2", "3",
                      "--steps", "3", "--heldout", "4", "--warm", "WARM", "--runs-dir", str(runs), "--tasks", "8",
                      "--pairs", "etpo_q4-etpo", "--out", str(out)])
    q4 = result["methods"]["etpo_q4"]
    assert q4["seeds"] == 3 and q4["seed_list"] == [0, 1, 2]
    np.testing.assert_allclose(q4["difference_mean"], np.mean(np.array(afters["etpo_q4"]) - 0.2))
    assert q4["seeds_above_start"] == 3 and q4["seeds_ci_above_zero"] == 1  # only 0.15 - 0.1 > 0
    assert result["methods"]["etpo"]["seeds_above_start"] == 2              # 0.20 - 0.2 = 0 is not above
    pair = result["pairs"]["etpo_q4 - etpo"]
    np.testing.assert_allclose(pair["differences"], [0.10, -0.01, 0.10])
    assert pair["p_value"] == pytest.approx(0.5)   # 4 of the 8 sign patterns give |sum| >= 0.19
    assert json.loads((tmp_path / "docs" / "table.json").read_text()) == result
    md = (tmp_path / "docs" / "table.md").read_text()
    assert "| etpo_q4 | 2 | 0.200 | 0.350 | +0.150 [+0.050, +0.250] |" in md
    assert "skipped (not finished)" in capsys.readouterr().out


def test_config_flags_keep_only_config_flags():
    assert rs.config_flags(["python", "-m", "aem_jax.train", "--config=c.py:x", "--config.seed=1",
                            "--workdir=w"]) == ["--config=c.py:x", "--config.seed=1"]


def test_unknown_method_and_bad_pair_are_named(tmp_path):
    with pytest.raises(SystemExit):
        rs.main(["--methods", "nope", "--steps", "1", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        rs.main(["--methods", "etpo", "--steps", "1", "--runs-dir", str(tmp_path), "--pairs", "etpo-archer",
                 "--out", str(tmp_path / "o")])
