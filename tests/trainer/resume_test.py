"""Reliability of ``python -m aem_jax.train``: resume after SIGKILL, corrupted
checkpoints and runs of non-finite updates.

Every run is a real subprocess of the CLI on ``configs/default.py:smoke``.
The runs share a persistent XLA compilation cache (one per test module) so
that only the first one pays for compilation.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = f"--config={REPO / 'configs' / 'default.py'}:smoke"
# Keys whose values depend on the wall clock, not on the run's maths.
TIMING_SUFFIXES = ("_per_s",)
TIMING_PREFIXES = ("time_", "rollout_time_")
TIMING_KEYS = ("wall_s",)


def train_env(cache_dir: pathlib.Path, **extra: str) -> dict[str, str]:
    """Environment of a CLI subprocess: CPU, the shared compilation cache."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    env.update(extra)
    return env


def train_cmd(workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "aem_jax.train", CONFIG, f"--workdir={workdir}", *overrides]


def run_train(workdir, *overrides, env, timeout=240, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run(train_cmd(workdir, *overrides), env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def is_timing(key: str) -> bool:
    return key in TIMING_KEYS or key.startswith(TIMING_PREFIXES) or key.endswith(TIMING_SUFFIXES)


def deterministic_metrics(workdir: pathlib.Path) -> list[dict]:
    """metrics.jsonl without the wall-clock keys."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in lines if line]


def load_state(step_dir: pathlib.Path) -> dict[str, np.ndarray]:
    """The ``state`` item of a checkpoint step as flat numpy arrays, read on one
    device whatever mesh (or number of processes) saved it."""
    path = step_dir / "state"
    with ocp.StandardCheckpointer() as ckptr:
        meta = ckptr.metadata(path)
        tree = getattr(meta, "item_metadata", meta)
        tree = getattr(tree, "tree", tree)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
        restored = ckptr.restore(path, target)
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(restored)}


def assert_same_state(a: dict[str, np.ndarray], b: dict[str, np.ndarray], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=atol, rtol=0, err_msg=name)


def assert_same_metrics(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for line_a, line_b in zip(a, b):
        assert line_a.keys() == line_b.keys(), (line_a.keys() ^ line_b.keys())
        for key in line_a:
            assert line_a[key] == pytest.approx(line_b[key], rel=1e-6, abs=1e-6), (line_a["step"], key)


def finished_steps(ckpt_dir: pathlib.Path) -> list[int]:
    """Committed step directories (orbax writes ``<step>.orbax-checkpoint-tmp*``
    first and renames it to ``<step>`` at the end)."""
    if not ckpt_dir.exists():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())


def shared_cache_dir(tmp_path_factory) -> pathlib.Path:
    """One XLA compilation cache for every CLI run of this pytest session,
    shared by the pytest-xdist workers (JAX writes cache entries atomically)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the workers' temp dirs are siblings
    path = base / "aem_jax_xla_cache"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> pathlib.Path:
    return shared_cache_dir(tmp_path_factory)


# N steps, killed once step K is checkpointed; no eval (it does not touch the
# trained state and would only add compile time). The untrained smoke model
# plays no valid action, so all returns of a group are equal and advantages
# are zero; an entropy bonus gives every update a non-zero gradient, so the
# parameters (and with them the next rollouts) really change from step to step.
N, K = 6, 2
COMMON = ("--config.eval.num_tasks=0", "--config.checkpoint.every=1", "--config.checkpoint.keep=3",
          "--config.loss.entropy_coef=0.05")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache_dir) -> pathlib.Path:
    """A finished N-step run (the reference)."""
    workdir = tmp_path_factory.mktemp("uninterrupted")
    run_train(workdir, f"--config.total_steps={N}", *COMMON, env=train_env(cache_dir))
    return workdir


def test_sigkill_and_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path, cache_dir):
    """Issue 7a: kill -9 after step K is checkpointed, resume to N: the final
    parameters, optimizer state and every logged metric equal the run that was
    never interrupted."""
    workdir = tmp_path / "killed"
    log = tmp_path / "killed.log"  # a file, not a pipe: nobody reads while it runs
    with open(log, "w") as out:
        proc = subprocess.Popen(train_cmd(workdir, f"--config.total_steps={N}", *COMMON), env=train_env(cache_dir),
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    try:
        while not any(s >= K for s in finished_steps(workdir / "checkpoints")):
            assert proc.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    killed_at = finished_steps(workdir / "checkpoints")
    assert killed_at and max(killed_at) < N, f"the run was not interrupted: {killed_at}"

    resumed = run_train(workdir, f"--config.total_steps={N}", *COMMON, env=train_env(cache_dir))
    assert "success before" not in resumed.stdout  # a resumed run does not evaluate the start again

    assert finished_steps(workdir / "checkpoints")[-1] == N
    assert_same_state(load_state(uninterrupted / "checkpoints" / str(N)), load_state(workdir / "checkpoints" / str(N)))
    reference = deterministic_metrics(uninterrupted)
    assert [r["step"] for r in reference] == list(range(1, N + 1))
    assert all(r["grad_norm"] > 0 for r in reference)  # the parameters really moved
    assert_same_metrics(reference, deterministic_metrics(workdir))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_step(uninterrupted, tmp_path, cache_dir):
    """Issue 7b: garbage in the latest step's array files: the restore names
    that step, uses step N-1 and training continues to the new end."""
    workdir = tmp_path / "corrupted"
    shutil.copytree(uninterrupted, workdir)
    latest = workdir / "checkpoints" / str(N)
    damaged = 0
    for path in (latest / "state").rglob("*"):
        if path.is_file() and ("ocdbt" in path.parts[-2] or path.parent.name == "d"):
            path.write_bytes(b"\x00garbage" * 8)
            damaged += 1
    assert damaged, sorted(p.name for p in (latest / "state").rglob("*"))

    proc = run_train(workdir, f"--config.total_steps={N + 2}", *COMMON, env=train_env(cache_dir))
    assert f"checkpoint step {N} " in proc.stderr and "failed to restore" in proc.stderr, proc.stderr[-3000:]
    assert (workdir / "checkpoints" / f"corrupt_{N}").exists()
    assert finished_steps(workdir / "checkpoints")[-1] == N + 2
    steps = [r["step"] for r in deterministic_metrics(workdir)]
    assert steps == list(range(1, N + 3)), steps  # step N was trained again from N-1
    # Step N retrained from the good step N-1 repeats the original step N.
    assert_same_metrics(deterministic_metrics(uninterrupted)[N - 1:N], deterministic_metrics(workdir)[N - 1:N])


# The CLI with one patch applied first: ``{patch}`` is Python run in the
# training process before ``aem_jax.train.main``.
_PATCHED_CLI = r"""
import sys
from absl import app
from aem_jax import train
{patch}
sys.argv = ["aem_jax.train"] + sys.argv[1:]
app.run(train.main)
"""

# Every advantage NaN (pg.init reads the module global when it jits the step).
_NAN_ADVANTAGES = """
import jax.numpy as jnp
from aem_jax.trainer import pg

compute = pg.compute_advantages

def nan_advantages(*args, **kwargs):
    adv, info, rest = compute(*args, **kwargs)
    return jnp.full_like(adv, jnp.nan), info, rest

pg.compute_advantages = nan_advantages
"""

# The disk is full from the second checkpoint on.
_DISK_FULL_AFTER_FIRST_SAVE = """
import collections, itertools
from aem_jax.trainer import checkpoint

usage = checkpoint.shutil.disk_usage
calls = itertools.count()

def disk_usage(path):
    real = usage(path)
    return real if next(calls) == 0 else collections.namedtuple("usage", "total used free")(real.total, real.total, 0)

checkpoint.shutil.disk_usage = disk_usage
"""


def run_patched(patch: str, workdir: pathlib.Path, *overrides: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-c", _PATCHED_CLI.format(patch=patch), CONFIG, f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)


def test_resume_with_another_model_size_names_the_key_not_the_arrays(uninterrupted, tmp_path, cache_dir):
    """The config check reads each step's metadata before its arrays, so a
    changed model shape is reported as the changed key (one short line),
    and nothing is moved aside."""
    workdir = tmp_path / "resized"
    shutil.copytree(uninterrupted, workdir)
    before = finished_steps(workdir / "checkpoints")
    proc = run_train(workdir, f"--config.total_steps={N + 1}", *COMMON, "--config.model.num_layers=3",
                     env=train_env(cache_dir), check=False)
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "changed config" in last and "model.num_layers 1 -> 3" in last, last
    assert len(last) < 2000 and "Source: MISSING" not in proc.stderr
    assert finished_steps(workdir / "checkpoints") == before


def test_full_disk_at_save_is_reported_by_step_without_a_partial_checkpoint(tmp_path, cache_dir):
    """Issue 8: a checkpoint that does not fit stops the run naming the step;
    the step directory is never created, the previous one stays usable."""
    workdir = tmp_path / "full"
    proc = run_patched(_DISK_FULL_AFTER_FIRST_SAVE, workdir, "--config.total_steps=3", *COMMON,
                       env=train_env(cache_dir))
    assert proc.returncode != 0
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert "CheckpointError" in last and "checkpoint for step 2" in last and "nothing was written" in last, last
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, cache_dir):
    """Issue 8: NaN advantages make every loss non-finite: each update is
    skipped (parameters unchanged, counted in metrics.jsonl) and the run stops
    after config.max_nonfinite_in_a_row of them with a FloatingPointError."""
    workdir = tmp_path / "nan"
    limit = 3
    proc = run_patched(_NAN_ADVANTAGES, workdir, "--config.total_steps=6", f"--config.max_nonfinite_in_a_row={limit}",
                       *COMMON, env=train_env(cache_dir))
    assert proc.returncode != 0
    assert "FloatingPointError" in proc.stderr and f"max_nonfinite_in_a_row={limit}" in proc.stderr, \
        proc.stderr[-3000:]
    records = deterministic_metrics(workdir)
    # Every optimiser step of every training step was skipped, and counted.
    skipped = np.array([r["skipped_updates"] for r in records])
    assert len(records) >= 2 and (skipped >= 1).all(), skipped
    in_a_row = [r["nonfinite_in_a_row"] for r in records]
    assert in_a_row == np.cumsum(skipped).astype(int).tolist()
    # The run stopped at the first step that reached the limit.
    assert in_a_row[-1] >= limit > in_a_row[-2]
    assert all(np.isnan(r["loss"]) for r in records)
    # Skipped updates leave the parameters where they started.
    first, second = (load_state(workdir / "checkpoints" / str(s)) for s in (1, len(records)))
    params = [k for k in first if k.startswith("['params']")]
    assert params
    for name in params:
        np.testing.assert_array_equal(first[name], second[name], err_msg=name)
