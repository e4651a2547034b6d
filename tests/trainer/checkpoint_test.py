"""Tests for aem_jax.trainer.checkpoint: round trips, corruption, full disks."""

import errno
import os
import shutil
from collections import namedtuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from aem_jax import sharding
from aem_jax.trainer import checkpoint


def _state(mesh, scale=1.0):
    w = jax.device_put(scale * jnp.arange(32.0).reshape(8, 4), NamedSharding(mesh, P("fsdp", "tensor")))
    return {
        "params": {"w": w, "b": jnp.full((3,), scale)},
        "opt": {"count": jnp.asarray(7, jnp.int32)},
        "rng": jax.random.key(3),
    }


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _assert_state_equal(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        if jax.dtypes.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        assert g.sharding.is_equivalent_to(w.sharding, g.ndim)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"fsdp": 4, "tensor": 2})


def test_round_trip_sharded_state_host_buffer_and_meta(tmp_path, mesh):
    state = _state(mesh)
    replay = {
        "obs": np.arange(15, dtype=np.float32).reshape(5, 3),
        "ids": np.array([4, 2], np.int64),
        "not_yet_filled": [np.zeros((0, 7), np.float32), np.array([True, False])],
    }
    meta = {"task_cursor": 11, "rng_position": [2, 5], "config": {"algorithm": "grpo"}}
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        assert ckpt.restore(_abstract(state)) is None
        assert ckpt.save(1, state, meta=meta, host=replay)
        assert ckpt.save(2, _state(mesh, 2.0), meta=meta)
        assert ckpt.save(3, _state(mesh, 3.0), meta=meta, host=replay)
        ckpt.wait()
        assert ckpt.all_steps() == [2, 3] and ckpt.latest_step() == 3
        restored = ckpt.restore(_abstract(state))
    assert restored.step == 3 and restored.meta == {"step": 3, **meta}
    _assert_state_equal(restored.state, _state(mesh, 3.0))
    assert restored.state["params"]["w"].sharding.spec == P("fsdp", "tensor")
    np.testing.assert_array_equal(restored.host["obs"], replay["obs"])
    np.testing.assert_array_equal(restored.host["ids"], replay["ids"])
    empty, flags = restored.host["not_yet_filled"]
    assert empty.shape == (0, 7) and empty.dtype == np.float32
    np.testing.assert_array_equal(flags, replay["not_yet_filled"][1])
    # A fresh Checkpointer on the same directory sees the same steps.
    again = checkpoint.Checkpointer(tmp_path / "ckpt")
    step2 = again.restore(_abstract(state), step=2)
    again.close()
    assert step2.host is None
    _assert_state_equal(step2.state, _state(mesh, 2.0))


def test_save_interval_and_force(tmp_path, mesh):
    with checkpoint.Checkpointer(tmp_path, save_interval_steps=5) as ckpt:
        assert not ckpt.save(3, _state(mesh))
        assert ckpt.save(5, _state(mesh))
        assert ckpt.save(6, _state(mesh), force=True)
        ckpt.wait()
        assert ckpt.all_steps() == [5, 6]


def test_relative_directory_is_taken_from_the_cwd(tmp_path, mesh, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with checkpoint.Checkpointer("runs/x/checkpoints", save_interval_steps=1) as ckpt:
        assert ckpt.save(1, _state(mesh))
        ckpt.wait()
        assert ckpt.all_steps() == [1]
    assert (tmp_path / "runs/x/checkpoints/1").is_dir()


def _corrupt(step_dir: epath.Path) -> None:
    """Truncates every file of the array store, as a crash of the storage would."""
    for root, _, files in os.walk(step_dir / "state"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")


def test_corrupted_latest_step_falls_back_to_previous(tmp_path, mesh):
    state = _state(mesh)
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    for step in (1, 2, 3):
        ckpt.save(step, _state(mesh, float(step)), meta={"cursor": step})
    ckpt.wait()
    _corrupt(tmp_path / "3")
    with pytest.warns(RuntimeWarning, match="checkpoint step 3 .* failed to restore"):
        restored = ckpt.restore(_abstract(state))
    assert restored.step == 2 and restored.meta["cursor"] == 2
    _assert_state_equal(restored.state, _state(mesh, 2.0))
    assert ckpt.all_steps() == [1, 2] and (tmp_path / "corrupt_3").is_dir()
    # The resumed run can write step 3 again.
    assert ckpt.save(3, _state(mesh, 30.0), meta={"cursor": 3})
    ckpt.wait()
    _assert_state_equal(ckpt.restore(_abstract(state)).state, _state(mesh, 30.0))
    ckpt.close()


def test_no_restorable_step_raises_and_moves_nothing(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, _state(mesh))
    ckpt.wait()
    shutil.rmtree(tmp_path / "1" / "state")
    with pytest.warns(RuntimeWarning, match="step 1"), pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        ckpt.restore(_abstract(_state(mesh)))
    assert ckpt.all_steps() == [1]
    with pytest.raises(checkpoint.CheckpointError, match="step 1"):
        ckpt.restore(_abstract(_state(mesh)), step=1)
    ckpt.close()


def test_unwritable_directory_reported_at_start(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(checkpoint.CheckpointError, match="a_file/ckpt.*not writable"):
        checkpoint.Checkpointer(blocker / "ckpt")
    with pytest.raises(checkpoint.CheckpointError, match="min_free_bytes"):
        checkpoint.Checkpointer(tmp_path / "ok", min_free_bytes=1 << 62)


# orbax's background threads report the injected failure once more on exit.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_during_async_save_leaves_no_partial_step(tmp_path, mesh, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, _state(mesh))
    ckpt.wait()

    original = epath.Path.write_text

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(self))

    monkeypatch.setattr(epath.Path, "write_text", full_disk)
    with pytest.raises(checkpoint.CheckpointError, match=r"step 2 .*disk full"):
        ckpt.save(2, _state(mesh, 2.0))
        ckpt.wait()
    monkeypatch.setattr(epath.Path, "write_text", original)
    assert sorted(os.listdir(tmp_path)) == ["1"]
    assert ckpt.all_steps() == [1]
    assert ckpt.save(3, _state(mesh, 3.0))
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(mesh))).step == 3


def test_not_enough_free_space_is_reported_before_writing(tmp_path, mesh, monkeypatch):
    ckpt = checkpoint.Checkpointer(tmp_path)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(100, 90, 10))
    with pytest.raises(checkpoint.CheckpointError, match="step 4 needs about .* only 10 are free"):
        ckpt.save(4, _state(mesh))
    assert ckpt.all_steps() == [] and not [n for n in os.listdir(tmp_path) if n.startswith("4")]
    ckpt.close()


def test_leftover_tmp_dir_of_a_killed_save_is_ignored_and_cleaned(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, _state(mesh))
    ckpt.close()
    leftover = tmp_path / "2.orbax-checkpoint-tmp"
    (leftover / "state").mkdir(parents=True)
    (leftover / "state" / "half_written").write_bytes(b"\x00" * 10)
    resumed = checkpoint.Checkpointer(tmp_path)
    assert resumed.latest_step() == 1
    assert resumed.restore(_abstract(_state(mesh))).step == 1
    resumed.close()
    assert not leftover.exists()


def test_nnx_model_and_optimizer_state_restore_into_rule_shardings(tmp_path, mesh):
    def init():
        with nnx.use_eager_sharding(False):
            model = nnx.Linear(4, 8, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": ("embed", "mlp")})
        return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    model, optimizer = sharding.create_sharded(init, mesh)
    optimizer.update(model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param)))
    state = nnx.state((model, optimizer))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(5, state)
    fresh_model, fresh_optimizer = sharding.create_sharded(init, mesh)
    target = sharding.abstract_state(nnx.state((fresh_model, fresh_optimizer)), mesh)
    restored = checkpoint.Checkpointer(tmp_path).restore(target)
    nnx.update((fresh_model, fresh_optimizer), restored.state)
    np.testing.assert_array_equal(fresh_model.kernel[...], model.kernel[...])
    assert fresh_model.kernel[...].sharding.spec == P("fsdp", "tensor")
    assert int(fresh_optimizer.step[...]) == 1
