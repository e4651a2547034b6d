"""``python -m aem_jax.train``: bad input fails before compiling, naming what
is wrong; the smoke job leaves metrics, TensorBoard events, checkpoints and
a plot in its workdir and prints success before and after training.

Every run is a subprocess with ``JAX_LOG_COMPILES=1``, so any XLA
compilation prints a ``Compiling ...`` line that the fail-fast tests look for.
"""
from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys
import time

import pytest

from tests.trainer.resume_test import REPO, run_train, shared_cache_dir, train_cmd, train_env


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return shared_cache_dir(tmp_path_factory)


def _fails_fast(tmp_path, cache_dir, *overrides, workdir=None, **env) -> str:
    """Runs the CLI, expects a failure with no compilation; returns stderr."""
    t0 = time.monotonic()
    proc = run_train(workdir or tmp_path / "run", *overrides, check=False, timeout=120,
                     env=train_env(cache_dir, JAX_LOG_COMPILES="1", **env))
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert "Compiling" not in proc.stderr, proc.stderr[-3000:]
    # Only interpreter and library start-up: no model is built.
    assert elapsed < 60, elapsed
    return proc.stderr


def _last_line(stderr: str) -> str:
    return [line for line in stderr.splitlines() if line.strip()][-1]


def _config_error(tmp_path, cache_dir, *args, default_config=False) -> str:
    """Runs the CLI expecting a config error: exit status 2 and one line,
    ``error: ...``, on stderr (no traceback, nothing compiled, no workdir).
    Returns that line. ``default_config``: no --config (configs/default.py)."""
    workdir = tmp_path / "run"
    cmd = ([sys.executable, "-m", "aem_jax.train", f"--workdir={workdir}", *args] if default_config
           else train_cmd(workdir, *args))
    proc = subprocess.run(cmd, env=train_env(cache_dir, JAX_LOG_COMPILES="1"), cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert not workdir.exists()
    return lines[0]


@pytest.mark.parametrize("default_config", [False, True])
def test_unknown_config_key_names_the_key(tmp_path, cache_dir, default_config):
    # Without --config, config_flags reads the overrides while its flag is defined.
    line = _config_error(tmp_path, cache_dir, "--config.no_such_key=1", default_config=default_config)
    assert line.startswith("error: config.no_such_key is not a config key; keys of config: "), line
    line = _config_error(tmp_path, cache_dir, "--config.optim.learnig_rate=1e-4", default_config=default_config)
    assert line == "error: config.optim.learnig_rate is not a config key; did you mean optim.learning_rate?"


def test_unknown_algorithm_lists_the_registered_ones(tmp_path, cache_dir):
    last = _config_error(tmp_path, cache_dir, "--config.algorithm=nope")
    assert "'nope'" in last and "registered:" in last
    for name in ("grpo", "dapo", "gigpo", "ppo", "archer", "etpo"):
        assert name in last


def test_bad_value_names_the_key_and_the_allowed_values(tmp_path, cache_dir):
    last = _config_error(tmp_path, cache_dir, "--config.aem.scope=episode")
    assert "config.aem.scope='episode'" in last and "group" in last and "trajectory" in last
    last = _config_error(tmp_path, cache_dir, "--config.optim.learning_rate=inf")
    assert last == "error: config.optim.learning_rate=inf is not allowed; must be a finite number > 0"
    last = _config_error(tmp_path, cache_dir, "--config.optim.learning_rate=fast")
    assert last.startswith("error: flag --config.optim.learning_rate=fast: "), last


def test_unwritable_workdir_is_reported_before_compiling(tmp_path, cache_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    last = _last_line(_fails_fast(tmp_path, cache_dir, workdir=blocker / "run"))
    assert "CheckpointError" in last and "not writable" in last and str(blocker / "run") in last


def test_unreachable_model_source_says_how_to_use_a_local_copy(tmp_path, cache_dir):
    last = _last_line(_fails_fast(tmp_path, cache_dir, "--config.model.source=no-such-org/no-such-model",
                                  HF_HUB_OFFLINE="1"))
    assert "config.model.source='no-such-org/no-such-model'" in last and "local copy" in last


def test_smoke_job_leaves_metrics_events_checkpoints_and_a_plot(tmp_path, cache_dir):
    """Issue 3 on the smoke config: 2 steps, 2 tasks x 2 rollouts, 2 eval tasks."""
    workdir = tmp_path / "smoke"
    proc = run_train(workdir, env=train_env(cache_dir), timeout=240)
    assert "success before training:" in proc.stdout and "success after training:" in proc.stdout
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("success", "token_entropy", "alpha_std", "loss", "skipped_updates"):
        assert all(key in r for r in records), key
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["1", "2"]
    assert (workdir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((workdir / "eval.json").read_text())
    assert (result["step"], result["num_tasks"]) == (2, 2)
    printed = re.search(r"success after training: ([0-9.]+)", proc.stdout).group(1)
    assert f"{result['success_after']:.2f}" == printed and 0.0 <= result["success_before"] <= 1.0
    assert not list(workdir.glob("*.tmp"))
