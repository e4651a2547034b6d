"""Loading a checkpoint straight into its shardings, on one process and on two.

Every parameter must arrive in the `NamedSharding` its logical names map to,
with the values of the checkpoint, and every read of the checkpoint must be
one device's shard: on several processes, each reads only what its own
devices hold.
"""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import multiprocess
from flax import nnx

import aem_jax.models as M
from aem_jax import sharding
from aem_jax.models import hf

CONFIG = M.ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=3,
                       num_heads=4, num_kv_heads=2, head_dim=16, model_type="qwen3",
                       qkv_bias=False, qk_norm=True, tie_embeddings=False)
MESH = {"fsdp": 4, "tensor": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved checkpoint and {state path: numpy value} of what it holds, in our layout."""
    path = tmp_path_factory.mktemp("distributed") / "ckpt"
    model = M.init_model(CONFIG, seed=5)
    # Small shards, so that one stacked parameter spans several files.
    M.save_pretrained(model, None, path, max_shard_bytes=30_000)
    values = {"/".join(map(str, p)): np.asarray(v.get_value())
              for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    np.savez(path / "expected.npz", **values)
    return path, values


def _key(path):
    return "/".join(map(str, path))


def _normalise(index, shape):
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def test_load_onto_eight_devices_places_and_reads_only_shards(checkpoint, monkeypatch):
    path, values = checkpoint
    assert jax.device_count() == 8  # tests/conftest.py forces 8 CPU devices
    reads = []
    original = hf._read_shard

    def record(p, views, index, dtype, *, stacked):
        out = original(p, views, index, dtype, stacked=stacked)
        reads.append((_key(p), out.shape))
        return out

    monkeypatch.setattr(hf, "_read_shard", record)
    mesh = sharding.make_mesh(MESH)
    model = M.load_model(str(path), mesh=mesh)
    state = nnx.state(model, nnx.Param)
    shardings = sharding.state_shardings(state, mesh)
    shard_shapes = {}
    for (p, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(shardings)):
        value = var.get_value()
        assert value.sharding == want.get_value(), p
        np.testing.assert_array_equal(np.asarray(value), values[_key(p)], err_msg=_key(p))
        shard_shapes[_key(p)] = {s.data.shape for s in value.addressable_shards}
    # Each read is one device's shard, never a whole (stacked) parameter.
    assert {k for k, _ in reads} == set(values)
    for key, shape in reads:
        assert shape in shard_shapes[key], (key, shape)
    assert ("layers/mlp/up", (3, 16, 48)) in reads  # [L, D/fsdp, F/tensor]


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
import numpy as np
from flax import nnx
import aem_jax.models as M
from aem_jax import sharding
from aem_jax.models import hf

reads = []
original = hf._read_shard
def record(path, views, index, dtype, *, stacked):
    reads.append(("/".join(map(str, path)), index))
    return original(path, views, index, dtype, stacked=stacked)
hf._read_shard = record

mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
model = M.load_model(sys.argv[3], mesh=mesh)
expected = np.load(sys.argv[3] + "/expected.npz")
state = nnx.state(model, nnx.Param)
wanted = sharding.state_shardings(state, mesh)
arrays = {}
for (p, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(wanted)):
    arrays["/".join(map(str, p))] = (var.get_value(), want.get_value())
norm = lambda index, shape: [list(s.indices(n)[:2]) for s, n in zip(index, shape)]
bad_values, bad_shardings, foreign_reads, fraction_read = [], [], [], {}
for key, (value, want) in arrays.items():
    if value.sharding != want:
        bad_shardings.append(key)
    for shard in value.addressable_shards:
        if not np.array_equal(np.asarray(shard.data), expected[key][shard.index]):
            bad_values.append(key)
    own = [norm(i, value.shape) for i in value.sharding.addressable_devices_indices_map(value.shape).values()]
    mine = [norm(i, value.shape) for k, i in reads if k == key]
    foreign_reads += [(key, r) for r in mine if r not in own]
    covered = np.zeros(value.shape, bool)
    for r in mine:
        covered[tuple(slice(a, b) for a, b in r)] = True
    fraction_read[key] = float(covered.mean())
print("RESULT " + json.dumps({
    "process": jax.process_index(), "local_devices": jax.local_device_count(),
    "devices": jax.device_count(), "fully_addressable": value.is_fully_addressable,
    "bad_values": bad_values, "bad_shardings": bad_shardings, "foreign_reads": foreign_reads,
    "reads": len(reads), "fraction_read": fraction_read,
}), flush=True)
jax.distributed.shutdown()
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_each_read_only_their_own_shards(checkpoint):
    path, values = checkpoint
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, address, str(i), str(path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    results = multiprocess.results(procs, multiprocess.wait_all(procs, timeout=120))
    for pid, r in enumerate(results):
        assert r["process"] == pid and r["local_devices"] == 4 and r["devices"] == 8
        assert not r["fully_addressable"]
        assert r["bad_values"] == [] and r["bad_shardings"] == [] and r["foreign_reads"] == []
        assert set(r["fraction_read"]) == set(values)
        # The fsdp axis spans both processes: each reads half of every parameter
        # split along embed (and all of the replicated norm scales).
        assert r["fraction_read"]["layers/mlp/up"] == 0.5
        assert r["fraction_read"]["embed"] == 0.5
        assert r["fraction_read"]["layers/input_norm/scale"] == 1.0
