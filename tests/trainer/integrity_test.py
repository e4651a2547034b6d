"""Tests for aem_jax.trainer.integrity: config fingerprints, workdir lock, checksums."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from aem_jax import sharding
from aem_jax.trainer import checksums, integrity
from configs import default as default_config
from tests.trainer.metrics_test import memory_workdir  # noqa: F401 (fixture)


def _config(**changes):
    c = ConfigDict()
    c.seed = 0
    c.total_steps = 10
    c.progress_bar = False
    c.distributed = False
    c.optim = ConfigDict({"learning_rate": 1e-3, "betas": (0.9, 0.99)})
    c.env = ConfigDict({"name": "treasure", "kwargs": ConfigDict({"num_boxes": 4, "max_turns": 2})})
    c.checkpoint = ConfigDict({"keep": 3, "every": 10})
    c.rollout = ConfigDict({"num_threads": 8, "step_timeout_s": 30.0})
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = c
        for name in parents:
            node = node[name]
        node[leaf] = value
    return c


# Config fingerprints and resume checks ------------------------------------


def test_fingerprint_is_a_flat_json_dict_with_a_stable_hash():
    fp = integrity.config_fingerprint(_config())
    assert fp["config"]["env.kwargs.num_boxes"] == 4
    assert fp["config"]["optim.betas"] == [0.9, 0.99]  # tuples as JSON lists
    assert fp["config"]["optim.learning_rate"] == 1e-3
    assert json.loads(json.dumps(fp)) == fp  # what a checkpoint stores is what it compares
    assert integrity.config_fingerprint(_config())["sha256"] == fp["sha256"]
    assert integrity.config_fingerprint(_config(**{"env.kwargs.num_boxes": 5}))["sha256"] != fp["sha256"]
    # The real default config fingerprints (every leaf is JSON), repeatably.
    real = integrity.config_fingerprint(default_config.get_config())
    assert real == integrity.config_fingerprint(default_config.get_config())
    assert "env.kwargs.num_boxes" in real["config"] and "optim.learning_rate" in real["config"]


def test_fingerprint_of_functions_has_no_memory_address():
    fp = integrity.config_fingerprint(ConfigDict({"fn": np.mean, "empty": ConfigDict()}))
    assert fp["config"] == {"fn": "numpy.mean", "empty": {}}


def test_resume_with_the_same_config_passes():
    saved = integrity.config_fingerprint(_config())
    integrity.check_resume(saved, _config(), restored_step=5)
    integrity.check_resume(saved["config"], _config(), restored_step=5)  # the flat dict alone


def test_changed_keys_are_all_named_sorted_with_old_and_new_values():
    saved = integrity.config_fingerprint(_config())
    changed = _config(**{"seed": 1, "optim.learning_rate": 2e-3, "env.kwargs.num_boxes": 6})
    with pytest.raises(integrity.ConfigMismatchError) as error:
        integrity.check_resume(saved, changed, restored_step=5, workdir="/runs/a")
    message = str(error.value)
    assert message.startswith(
        "resuming /runs/a from step 5 with a changed config: env.kwargs.num_boxes 4 -> 6, "
        "optim.learning_rate 0.001 -> 0.002, seed 0 -> 1; use a new --workdir, or set them back")
    assert isinstance(error.value, ValueError)


def test_resumable_keys_may_change_or_appear():
    saved = integrity.config_fingerprint(_config())
    integrity.check_resume(saved, _config(**{
        "total_steps": 20, "progress_bar": True, "checkpoint.keep": 5, "checkpoint.every": 2,
        "rollout.num_threads": 2, "rollout.step_timeout_s": 60.0, "distributed": True,
    }), restored_step=10)
    grown = _config()
    grown.eval = ConfigDict({"num_tasks": 8})  # a resumable key present on one side only
    grown.max_nonfinite_in_a_row = 3
    integrity.check_resume(saved, grown, restored_step=10)
    del grown["distributed"]
    grown.distributed = ConfigDict({"coordinator_address": "h:1"})  # sub-keys are covered too
    integrity.check_resume(saved, grown, restored_step=10)


def test_keys_on_one_side_only_and_total_steps_below_the_restored_step_fail():
    saved = integrity.config_fingerprint(_config())
    extra = _config()
    extra.env.kwargs.num_clues = 2
    with pytest.raises(integrity.ConfigMismatchError, match=r"env\.kwargs\.num_clues \(absent\) -> 2"):
        integrity.check_resume(saved, extra, restored_step=5)
    missing = _config()
    del missing.env.kwargs["max_turns"]
    with pytest.raises(integrity.ConfigMismatchError, match=r"env\.kwargs\.max_turns 2 -> \(absent\)"):
        integrity.check_resume(saved, missing, restored_step=5)
    with pytest.raises(integrity.ConfigMismatchError, match=r"total_steps 10 -> 4 \(below the restored step 5\)"):
        integrity.check_resume(saved, _config(total_steps=4), restored_step=5)
    integrity.check_resume(saved, _config(total_steps=5), restored_step=5)


def test_a_key_added_since_the_checkpoint_passes_only_at_the_value_the_run_had():
    old = _config()
    saved = integrity.config_fingerprint(old)
    key = next(iter(integrity.ADDED_KEYS))
    section, field = key.split(".")
    new = _config()
    new[section] = ConfigDict({field: integrity.ADDED_KEYS[key]})
    integrity.check_resume(saved, new, restored_step=5)       # absent before, the neutral value now
    new[section][field] = integrity.ADDED_KEYS[key] + 1
    with pytest.raises(integrity.ConfigMismatchError, match=rf"{key} \(absent\) -> "):
        integrity.check_resume(saved, new, restored_step=5)
    both = integrity.config_fingerprint(new)                   # present on both sides: compared as usual
    new[section][field] = integrity.ADDED_KEYS[key]
    with pytest.raises(integrity.ConfigMismatchError, match=rf"{key} "):
        integrity.check_resume(both, new, restored_step=5)


def test_checkpoint_without_fingerprint_is_not_checked(caplog):
    with caplog.at_level(logging.WARNING):
        integrity.check_resume(None, _config(), restored_step=3, workdir="/runs/old")
    assert "no config fingerprint" in caplog.text


# Workdir lock ----------------------------------------------------------------


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_second_trainer_on_a_workdir_is_refused_until_the_first_releases(tmp_path):
    workdir = tmp_path / "run"
    with integrity.WorkdirLock(workdir, enabled=True) as lock:
        holder = json.loads((workdir / "LOCK").read_text())
        assert holder["host"] == socket.gethostname() and holder["pid"] == os.getpid() and holder["started"]
        assert lock.held
        with pytest.raises(integrity.WorkdirLockedError) as error:
            integrity.WorkdirLock(workdir, enabled=True).acquire()
        message = str(error.value)
        assert f"host {socket.gethostname()!r}, pid {os.getpid()}" in message
        assert f"delete {workdir / 'LOCK'}" in message
    assert not (workdir / "LOCK").exists()
    integrity.WorkdirLock(workdir, enabled=True).acquire().release()


def test_exactly_one_of_many_simultaneous_trainers_wins(tmp_path):
    barrier = threading.Barrier(8)
    outcomes = []

    def start():
        lock = integrity.WorkdirLock(tmp_path, enabled=True)
        barrier.wait()
        try:
            lock.acquire()
            outcomes.append("won")
        except integrity.WorkdirLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["refused"] * 7 + ["won"]


def test_stale_lock_of_a_dead_local_process_is_taken_over(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "started": "x"}))
    with caplog.at_level(logging.WARNING), integrity.WorkdirLock(tmp_path, enabled=True):
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    assert f"stale lock {tmp_path / 'LOCK'} of pid {dead}" in caplog.text


def test_lock_of_another_host_is_never_taken_over(tmp_path):
    (tmp_path / "LOCK").write_text(json.dumps({"host": "tpu-vm-7", "pid": _dead_pid(), "started": "x"}))
    with pytest.raises(integrity.WorkdirLockedError, match="host 'tpu-vm-7'.*delete .*LOCK.*another host"):
        integrity.WorkdirLock(tmp_path, enabled=True).acquire()
    (tmp_path / "LOCK").write_text("{torn")
    with pytest.raises(integrity.WorkdirLockedError, match="unreadable"):
        integrity.WorkdirLock(tmp_path, enabled=True).acquire()


def test_release_deletes_only_our_own_lock(tmp_path):
    lock = integrity.WorkdirLock(tmp_path, enabled=True).acquire()
    other = {"host": "h", "pid": 1, "started": "x", "token": "someone-else"}
    (tmp_path / "LOCK").write_text(json.dumps(other))  # e.g. cleared by hand and retaken
    lock.release()
    assert json.loads((tmp_path / "LOCK").read_text()) == other and not lock.held


def test_only_process_zero_takes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    with integrity.WorkdirLock(tmp_path) as lock:
        assert not lock.held and not (tmp_path / "LOCK").exists()


def test_lock_on_an_object_store(memory_workdir):  # noqa: F811 (fixture)
    with integrity.WorkdirLock(memory_workdir, enabled=True):
        assert json.loads(epath.Path(f"{memory_workdir}/LOCK").read_text())["pid"] == os.getpid()
        with pytest.raises(integrity.WorkdirLockedError, match="in use by another trainer"):
            integrity.WorkdirLock(memory_workdir, enabled=True).acquire()
    assert not epath.Path(f"{memory_workdir}/LOCK").exists()


# Array checksums and finiteness -----------------------------------------------


def _reference_checksum(a: np.ndarray) -> int:
    """Plain-Python sum of word * (lowbias32(position) | 1) mod 2**32."""
    words = np.asarray(a).reshape(-1).view(np.uint32) if np.asarray(a).dtype.itemsize == 4 else None
    if words is None:
        raise ValueError("the reference handles 32-bit dtypes only")
    def lowbias32(h):
        h ^= h >> 16
        h = (h * 0x7FEB352D) % 2**32
        h ^= h >> 15
        h = (h * 0x846CA68B) % 2**32
        return h ^ (h >> 16)

    return sum(w * (lowbias32(i) | 1) for i, w in enumerate(words.tolist())) % 2**32


def test_checksum_matches_a_plain_reference_sharded_or_not_on_device_or_host():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    sharded = jax.device_put(x, NamedSharding(mesh, P("fsdp", "tensor")))
    got = checksums.inspect_arrays({"host": x, "device": jnp.asarray(x), "sharded": sharded}).checksums
    assert got == {"['host']": _reference_checksum(x), "['device']": _reference_checksum(x),
                   "['sharded']": _reference_checksum(x)}


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.float16, np.int8, np.uint8,
                                   np.int32, np.bool_, ml_dtypes.int4, np.complex64])
def test_device_and_host_checksums_agree_and_see_every_single_change(dtype):
    values = np.random.default_rng(1).standard_normal((5, 7)) * 3
    x = (values > 0) if dtype is np.bool_ else values.astype(dtype)
    host = checksums.inspect_arrays([x]).checksums["[0]"]
    assert checksums.inspect_arrays([jnp.asarray(x)]).checksums["[0]"] == host
    changed = x.copy()
    changed[4, 6] = not x[4, 6] if dtype is np.bool_ else x[4, 6] + 1
    assert checksums.inspect_arrays([changed]).checksums["[0]"] != host
    swapped = x.copy()
    swapped[[0, 1]] = x[[1, 0]]  # the same values in other places
    if not np.array_equal(swapped, x):
        assert checksums.inspect_arrays([swapped]).checksums["[0]"] != host


def test_typed_keys_scalars_and_mixed_device_sets_are_checksummed():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    tree = {
        "rng": jax.random.key(3),
        "count": jax.device_put(jnp.asarray(7, jnp.int32), jax.devices()[1]),  # another device set
        "w": jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("fsdp"))),
        "loose": jnp.zeros(3),  # uncommitted
        "name": np.array(["not numeric"]),
    }
    got = checksums.inspect_arrays(tree).checksums
    assert set(got) == {"['rng']", "['count']", "['w']", "['loose']"}
    assert got["['rng']"] == checksums.inspect_arrays([jax.random.key_data(jax.random.key(3))]).checksums["[0]"]
    assert got["['count']"] == 7 and got["['loose']"] == 0


def test_nonfinite_leaves_are_found_in_tree_order():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    bad = jax.device_put(jnp.ones((8, 2)).at[5, 1].set(jnp.inf), NamedSharding(mesh, P("fsdp")))
    tree = {"a": jnp.ones(2), "b": {"w": bad}, "c": np.array([np.nan]), "d": jnp.arange(3), "e": jnp.zeros(2)}
    assert checksums.inspect_arrays(tree).nonfinite == ["['b']['w']", "['c']"]
    assert checksums.inspect_arrays({"ok": jnp.ones(2), "i": jnp.arange(2)}).nonfinite == []


def test_checksum_mismatches_name_path_and_both_values():
    assert checksums.checksum_mismatches({"['w']": 1, "['b']": 2, "['gone']": 3}, {"['w']": 1, "['b']": 5}) == [
        "['b'] (saved 2, read 5)"]
