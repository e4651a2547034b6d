"""Tests for aem_jax.trainer.checkpoint: round trips, corruption, full disks."""

import errno
import json
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
from aem_jax.trainer import checkpoint, checksums


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
    # Every leaf was checked on restore: the restored tree has the saved paths.
    saved = _read_meta(tmp_path / "5")["_checksums"]["state"]
    assert set(saved) == set(checksums.inspect_arrays(restored.state).checksums) and len(saved) > 3


def _read_meta(step_dir) -> dict:
    return json.loads((step_dir / "meta" / "metadata").read_text())


def _strip_checksums(step_dir) -> None:
    """Makes a step look like one written before checksums existed."""
    meta = _read_meta(step_dir)
    del meta["_checksums"]
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


def _big_state(mesh, seed):
    """Shards of 8 KiB: OCDBT keeps values under about 1 KiB inline in its
    B-tree nodes, which carry a CRC (a flipped byte there fails to decode);
    larger ones go to data files that carry none. Random values: compression
    cannot shrink them much, so most bytes of that file are the values."""
    w = np.random.default_rng(seed).standard_normal((256, 64)).astype(np.float32)
    return {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp", "tensor"))), "rng": jax.random.key(seed)}


def _flip_a_byte_in_the_array_data(step_dir) -> None:
    """Flips one byte in the middle of the largest data file of OCDBT's store
    (``state/ocdbt.process_0/d/<hash>``: the one holding the shards of w)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_corruption_that_still_decodes_is_caught_by_checksums(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(tmp_path / "run", max_to_keep=3)
    for step in (1, 2):
        ckpt.save(step, _big_state(mesh, step), meta={"cursor": step})
    ckpt.wait()
    meta = _read_meta(tmp_path / "run" / "2")
    assert set(meta["_checksums"]["state"]) == {"['w']", "['rng']"}
    _flip_a_byte_in_the_array_data(tmp_path / "run" / "2")
    # Without checksums the flipped byte restores silently as other numbers:
    # this is the corruption that nothing but the checksums can see.
    shutil.copytree(tmp_path / "run" / "2", tmp_path / "unchecked" / "2")
    _strip_checksums(tmp_path / "unchecked" / "2")
    with checkpoint.Checkpointer(tmp_path / "unchecked") as unchecked:
        silent = unchecked.restore(_abstract(_big_state(mesh, 2)), step=2)
    differs = np.asarray(silent.state["w"]) != np.asarray(_big_state(mesh, 2)["w"])
    assert 0 < differs.sum() < differs.size
    # With them, step 2 is reported, set aside, and step 1 is used.
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 2 .*differ from the saved ones.*\['w'\] \(saved"):
        restored = ckpt.restore(_abstract(_big_state(mesh, 1)))
    assert restored.step == 1 and restored.meta == {"step": 1, "cursor": 1}
    _assert_state_equal(restored.state, _big_state(mesh, 1))
    assert ckpt.all_steps() == [1] and (tmp_path / "run" / "corrupt_2").is_dir()
    ckpt.close()
    # Asked for exactly that step, the mismatch is raised, not skipped.
    shutil.copytree(tmp_path / "run" / "corrupt_2", tmp_path / "again" / "2")
    with checkpoint.Checkpointer(tmp_path / "again") as again:
        with pytest.raises(checkpoint.CheckpointError, match="step 2 restored arrays that differ"):
            again.restore(_abstract(_big_state(mesh, 2)), step=2)


def test_checkpoint_written_before_checksums_still_restores(tmp_path, mesh):
    replay = {"obs": np.arange(6.0).reshape(2, 3)}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(mesh, 2.0), meta={"cursor": 1}, host=replay)
    assert set(_read_meta(tmp_path / "1")["_checksums"]) == {"state", "host"}
    _strip_checksums(tmp_path / "1")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(_abstract(_state(mesh)))
    assert restored.step == 1 and restored.meta == {"step": 1, "cursor": 1}
    _assert_state_equal(restored.state, _state(mesh, 2.0))
    np.testing.assert_array_equal(restored.host["obs"], replay["obs"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_corrupted_host_arrays_are_caught_too(tmp_path, mesh):
    replay = {"obs": np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)}
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, _state(mesh), host=replay)
        ckpt.save(2, _state(mesh), host=replay)
    files = [p for p in (tmp_path / "2" / "host").rglob("*") if p.is_file() and p.parent.name == "d"]
    largest = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(largest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    largest.write_bytes(bytes(data))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.warns(RuntimeWarning, match=r"step 2 .*\['obs'\] \(saved"):
            assert ckpt.restore(_abstract(_state(mesh))).step == 1


def test_nonfinite_state_is_never_saved(tmp_path, mesh):
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, _state(mesh))
    ckpt.wait()
    state = _state(mesh)
    state["params"]["w"] = state["params"]["w"].at[3, 1].set(jnp.nan)
    state["params"]["z"] = jnp.full((2,), jnp.inf)  # after w in tree order
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"refusing to save checkpoint step 2: state leaf \['params'\]\['w'\] holds NaN or inf "
                             r"\(2 such leaves\).*nothing was written \(latest good step: 1\)"):
        ckpt.save(2, state)
    ckpt.wait()
    assert ckpt.all_steps() == [1] and sorted(os.listdir(tmp_path)) == ["1"]
    # Integer leaves are never "non-finite"; a finite state saves again.
    assert ckpt.save(2, _state(mesh, 2.0))
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path).restore(_abstract(_state(mesh))).step == 2


def test_other_layout_is_a_short_error_not_corruption(tmp_path, mesh):
    """A step written for other arrays (older code: per-layer params instead
    of a stack) gets a short message naming the differing paths; nothing is
    moved aside and older steps are not tried."""
    old = {"params": {"layer_0": {"w": jnp.ones((2, 3))}, "layer_1": {"w": jnp.ones((2, 3))},
                      "emb": jnp.zeros(4)}}
    new = {"params": {"layers": {"w": jnp.ones((2, 2, 3))}, "emb": jnp.zeros(4)}}
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=3) as ckpt:
        ckpt.save(1, old, meta={})
        ckpt.save(2, old, meta={})
        ckpt.wait()
        with pytest.raises(checkpoint.LayoutMismatchError) as err:
            ckpt.restore(_abstract(new))
    message = str(err.value)
    assert "step 2" in message and len(message) < 800
    assert "params/layer_0/w" in message and "params/layers/w" in message
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if not p.name.startswith(".")) == ["1", "2"]


def test_layout_check_passes_optax_named_tuples_and_reports_shapes(tmp_path, mesh):
    params = {"w": jnp.ones((4, 3)), "b": jnp.zeros(3)}
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(optax.cosine_decay_schedule(1e-3, 10)))
    state = {"params": params, "opt": opt.init(params), "rng": jax.random.key(0)}
    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        ckpt.save(1, state, meta={"k": 1})
        ckpt.wait()
        _assert_state_equal(ckpt.restore(_abstract(state)).state, state)
        wider = dict(state, params={"w": jnp.ones((4, 5)), "b": jnp.zeros(3)})
        with pytest.raises(checkpoint.LayoutMismatchError, match=r"params/w \(4, 3\) on disk vs \(4, 5\)"):
            ckpt.restore(_abstract(wider))


def test_check_meta_runs_before_arrays_and_its_error_propagates(tmp_path, mesh):
    state = _state(mesh)
    seen = []

    def check(meta, step):
        seen.append((step, meta["config"]))
        raise ValueError("config changed: optim.learning_rate")

    with checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2) as ckpt:
        ckpt.save(3, state, meta={"config": {"seed": 1}})
        ckpt.wait()
        with pytest.raises(ValueError, match="learning_rate"):
            ckpt.restore(_abstract(state), check_meta=check)
        assert seen == [(3, {"seed": 1})]
        assert ckpt.all_steps() == [3]  # not moved aside
