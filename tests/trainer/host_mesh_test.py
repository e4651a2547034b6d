"""Host-blocked meshes and each host's rollout copy of the policy.

Multi-host rollouts (``trainer.distributed.process_local``) need every
process's devices to form one block of the mesh (``sharding.make_mesh`` lays
them out so), and give each host a copy of the parameters in the compute
dtype split over all of its chips. On the 8 fake CPU devices of one process
the hosts are simulated (``process_of``: device id // 4, two hosts of four);
the last test runs two real processes over gloo, four devices each.

Run as a script, this file is one worker of that test: ``python host_mesh_test.py PID PORT``.
"""
from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import socket
import subprocess
import sys
import types

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
MESHES = [(1, 4, 2), (2, 2, 2), (4, 1, 2), (1, 2, 4), (8, 1, 1), (1, 1, 8), (2, 4, 1)]


def _fake_devices(hosts: int, per_host: int) -> list:
    return [types.SimpleNamespace(id=i, process_index=i // per_host, platform="cpu", device_kind="cpu")
            for i in range(hosts * per_host)]


def _owners(devices: np.ndarray) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index, otypes=[int])(devices)


@pytest.mark.parametrize("sizes", [(1, 8, 4), (4, 2, 4), (1, 4, 8), (2, 8, 2), (32, 1, 1), (1, 1, 32), (2, 2, 8)])
def test_host_blocked_layout_gives_each_process_one_block_of_the_grid(sizes):
    from aem_jax import sharding

    devices = _fake_devices(8, 4)  # e.g. a v5p-64: 8 hosts of 4 chips
    mesh = sharding.host_blocked_devices(sizes, devices)
    assert mesh.shape == sizes and sorted(d.id for d in mesh.flat) == list(range(32))
    local = sharding.host_block_shape(sizes, 4)
    assert math.prod(local) == 4 and all(n % l == 0 for n, l in zip(sizes, local))
    # tensor is filled first: inside one host whenever it fits
    assert local[2] == math.gcd(sizes[2], 4)
    owners = _owners(mesh)
    for p in range(8):
        where = np.argwhere(owners == p)
        lo, hi = where.min(0), where.max(0) + 1
        assert tuple(hi - lo) == local and (lo % np.array(local) == 0).all()
        assert (owners[tuple(slice(a, b) for a, b in zip(lo, hi))] == p).all()
    # blocks in process order along the grid, row-major
    hosts = tuple(n // l for n, l in zip(sizes, local))
    corners = owners[tuple(slice(None, None, l) for l in local)]
    np.testing.assert_array_equal(corners, np.arange(8).reshape(hosts))


def test_block_shape_and_unequal_hosts_fail_naming_the_mesh_and_the_counts():
    from aem_jax import sharding

    assert sharding.host_block_shape((1, 16, 4), 4) == (1, 1, 4)
    assert sharding.host_block_shape((4, 2, 4), 8) == (1, 2, 4)
    assert sharding.host_block_shape((6, 4, 1), 12) == (3, 4, 1)
    with pytest.raises(ValueError, match=r"'fsdp': 3, 'tensor': 1\} cannot be split into blocks of 2 devices"):
        sharding.host_block_shape((1, 3, 1), 2)
    devices = _fake_devices(2, 4)[:7]  # process 1 holds only 3
    with pytest.raises(ValueError, match=r"mesh \{'data': 1, 'fsdp': 7, 'tensor': 1\}.*different numbers.*\{0: 4, 1: 3\}"):
        sharding.host_blocked_devices((1, 7, 1), devices)


def test_make_mesh_of_one_process_is_unchanged():
    import jax

    from aem_jax import sharding

    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    want = jax.make_mesh((1, 4, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    assert mesh.devices.tolist() == want.devices.tolist()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
@pytest.mark.parametrize("name,shape", [("v5p-64", {"fsdp": 8, "tensor": 4}), ("v5p-128", {"fsdp": 16, "tensor": 4}),
                                        ("v6e-64", {"fsdp": 8, "tensor": 8}), ("v5p-64", {"data": 4, "fsdp": 2, "tensor": 4})])
def test_the_recommended_tpu_meshes_split_by_host(name, shape, monkeypatch):
    """The meshes docs/tpu.md recommends, over libtpu's deviceless TPU devices (4 chips per
    host): ``jax.make_mesh``'s torus order scatters a host's chips over the first two, the
    host-blocked layout gives every host one block with ``tensor`` inside it."""
    import jax

    from aem_jax import plan, sharding
    from aem_jax.trainer import distributed

    for k, v in plan._LIBTPU_ENV.items():
        monkeypatch.setenv(k, os.environ.get(k, v))
    devices = plan.topology_devices(plan.parse_slice(name))
    mesh = sharding.make_mesh(shape, devices=devices)
    layout = distributed.host_layout(mesh)
    assert math.prod(layout.local) == 4 and layout.local[2] == 4
    assert sorted(layout.owners.flat) == sorted({d.process_index for d in devices})
    for p in (0, len(devices) // 4 - 1):
        assert {d.process_index for d in layout.local_mesh(p).devices.flat} == {p}
    if name == "v5p-64" and "data" not in shape:
        sizes = sharding.mesh_shape(shape, len(devices))
        torus = jax.make_mesh(sizes, sharding.MESH_AXES, devices=devices)
        with pytest.raises(ValueError, match="is not laid out by host"):
            distributed.host_layout(torus)


def _simulated(sizes):
    import jax
    from jax.sharding import AxisType, Mesh

    from aem_jax import sharding

    host = lambda d: d.id // 4  # noqa: E731
    devices = sharding.host_blocked_devices(sizes, jax.devices(), host)
    return Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3), host


def test_a_mesh_not_laid_out_by_host_is_refused_with_the_mesh_and_the_per_host_count():
    import jax

    from aem_jax.trainer import distributed

    interleaved = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"mesh \{'data': 1, 'fsdp': 2, 'tensor': 4\} is not laid out by host: "
                                         r"each of its 2 processes' 4 devices must form one block"):
        distributed.host_layout(interleaved, lambda d: d.id % 2)
    mesh, host = _simulated((1, 2, 4))
    layout = distributed.host_layout(mesh, host)
    assert (layout.local, layout.hosts) == ((1, 1, 4), (1, 2, 1))
    assert [sorted(d.id for d in layout.local_mesh(p).devices.flat) for p in (0, 1)] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_host_copy_spec_spreads_a_parameter_over_the_hosts_data_and_fsdp_chips():
    import jax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from aem_jax.trainer.distributed import host_copy_spec

    def local(shape):
        return Mesh(np.array(jax.devices()[:math.prod(shape)]).reshape(shape), ("data", "fsdp", "tensor"))

    assert host_copy_spec(P(None, "fsdp", "tensor"), (3, 64, 16), local((2, 2, 1))) == P(None, ("fsdp", "data"))
    assert host_copy_spec(P(None, "fsdp", "tensor"), (3, 64, 16), local((1, 1, 4))) == P(None, None, "tensor")
    assert host_copy_spec(P("tensor", "fsdp"), (8, 8), local((4, 1, 2))) == P("tensor", "data")
    assert host_copy_spec(P("tensor", "fsdp"), (8, 6), local((3, 1, 2))) == P("tensor", "data")
    assert host_copy_spec(P("tensor", "fsdp"), (8, 5), local((2, 1, 2))) == P("tensor")  # 5 % 2: whole
    assert host_copy_spec(P(), (7,), local((4, 1, 1))) == P()


@pytest.mark.parametrize("sizes", MESHES)
def test_host_copy_is_the_bf16_parameters_split_over_all_chips_of_its_host(sizes):
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from aem_jax.trainer import distributed

    mesh, host = _simulated(sizes)
    layout = distributed.host_layout(mesh, host)
    rng = np.random.default_rng(0)
    values = {"w": rng.normal(size=(2, 16, 8)).astype(np.float32), "norm": rng.normal(size=(16,)).astype(np.float32),
              "ids": np.arange(8, dtype=np.int32)}
    specs = {"w": P(None, "fsdp", "tensor"), "norm": P(), "ids": P("tensor")}
    tree = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}
    for p in (0, 1):
        copy, local = distributed.host_copy(tree, layout, p, "bfloat16")
        mine = set(range(4 * p, 4 * p + 4))
        assert {d.id for d in local.devices.flat} == mine and local.axis_names == mesh.axis_names
        for k, v in values.items():
            x = copy[k]
            assert {d.id for d in x.sharding.device_set} == mine
            assert x.dtype == (jnp.bfloat16 if k != "ids" else jnp.int32)
            np.testing.assert_array_equal(np.asarray(x), v.astype(x.dtype))
        # every chip of the host holds a quarter of the matrix, the small vector whole
        assert [s.data.size for s in copy["w"].addressable_shards] == [values["w"].size // 4] * 4
        assert {s.data.size for s in copy["norm"].addressable_shards} == {16}


def test_host_copy_keeps_a_leaf_already_split_so_without_copying():
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from aem_jax.trainer import distributed

    mesh, host = _simulated((1, 2, 4))  # tensor inside each host, fsdp across the two
    layout = distributed.host_layout(mesh, host)
    x = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("tensor")))  # whole along fsdp
    y = jax.device_put(np.ones((8, 4), np.float32), NamedSharding(mesh, P("fsdp", "tensor")))
    (cx, cy), _ = distributed.host_copy((x, y), layout, 1, None)
    same = {s.device: s.data.unsafe_buffer_pointer() for s in x.addressable_shards}
    assert all(same[s.device] == s.data.unsafe_buffer_pointer() for s in cx.addressable_shards)
    assert cy.sharding.spec == P(None, "tensor") and cy.dtype == y.dtype  # regathered over fsdp


def test_the_policy_on_a_host_copy_gives_the_full_models_logits():
    """A Qwen3-shaped decoder with float32 master weights and bfloat16 compute: its
    forward on host 1's copy (bfloat16, on that host's 4 chips) is the forward on
    the training parameters, since every matmul casts its weight to bfloat16 anyway."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from aem_jax import models, sharding
    from aem_jax.trainer import distributed

    mesh, host = _simulated((2, 2, 2))
    config = models.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, qkv_bias=False, qk_norm=True, dtype="bfloat16",
                                param_dtype="float32")
    model = sharding.create_sharded(lambda: models.Decoder(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = jnp.asarray(np.random.default_rng(1).integers(1, 64, size=(4, 12)), jnp.int32)
    positions, mask = jnp.broadcast_to(jnp.arange(12), (4, 12)), jnp.ones((4, 12), jnp.int32)

    def logits(p, r, m):
        with sharding.use_mesh(m):
            return np.asarray(jax.jit(lambda p, r, t: nnx.merge(graphdef, p, r)(t, positions, mask)[0])(p, r, tokens), np.float32)

    want = logits(params, rest, mesh)
    (cp, cr), local = distributed.host_copy((params, rest), distributed.host_layout(mesh, host), 1, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(cp)} == {jnp.dtype(jnp.bfloat16)}
    got = logits(cp, cr, local)
    np.testing.assert_allclose(got, want, atol=2e-2, rtol=2e-2)
    assert np.isfinite(want).all() and np.abs(want).max() > 0.1


# Two real processes ------------------------------------------------------------


def _worker(pid: int, port: int) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import json

    import jax.numpy as jnp
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from aem_jax import sharding
    from aem_jax.trainer import distributed

    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    full = np.arange(8 * 4 * 2, dtype=np.float32).reshape(8, 4, 2) / 7.0
    w = jax.make_array_from_callback(full.shape, NamedSharding(mesh, P("fsdp", None, "tensor")), lambda i: full[i])
    (copy,), local = distributed.process_local((w,), mesh, dtype="bfloat16")
    shards = [(s.device.id, s.data.shape) for s in copy.addressable_shards]
    ok = all(np.array_equal(np.asarray(s.data), full[s.index].astype(jnp.bfloat16)) for s in copy.addressable_shards)
    gathered = multihost_utils.process_allgather(np.asarray(copy.astype(jnp.float32)))  # each process's whole copy
    print("\nRESULT " + json.dumps({
        "local_devices": sorted(d.id for d in jax.local_devices()), "local_mesh": dict(local.shape),
        "copy_devices": sorted(d.id for d in copy.sharding.device_set), "dtype": str(copy.dtype), "shards": shards,
        "shards_ok": ok, "copies_equal_cast": bool(all(np.array_equal(g, full.astype(jnp.bfloat16).astype(np.float32))
                                                       for g in gathered))}), flush=True)


@pytest.mark.slow
def test_two_processes_each_get_a_bf16_copy_on_their_own_four_devices():
    from tests import multiprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "AEM_JAX_DISTRIBUTED"):
        env.pop(name, None)
    procs = [subprocess.Popen([sys.executable, __file__, str(pid), str(port)], env=env, cwd=REPO, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for pid in range(2)]
    found = multiprocess.results(procs, multiprocess.wait_all(procs, timeout=180))
    for pid, r in enumerate(found):
        assert r["copy_devices"] == r["local_devices"] and len(r["local_devices"]) == 4
        # data=2 x fsdp=2 x tensor=2 over 2 hosts of 4: each host holds a (1, 2, 2) block
        assert r["local_mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
        assert r["dtype"] == "bfloat16" and r["shards_ok"] and r["copies_equal_cast"]
        assert sorted(shape for _, shape in r["shards"]) == [[4, 4, 1]] * 4
    assert found[0]["local_devices"] != found[1]["local_devices"]


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
