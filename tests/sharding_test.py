"""Tests for aem_jax.sharding on the 8 fake CPU devices of conftest."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import multiprocess
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from aem_jax import sharding


class TinyMLP(nnx.Module):
    """Embedding -> SwiGLU-free MLP -> unembedding, annotated with logical names."""

    def __init__(self, vocab: int, embed: int, mlp: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.5)
        self.embedding = nnx.Param(init(rngs.params(), (vocab, embed)), out_sharding=("vocab", "embed"))
        self.up = nnx.Param(init(rngs.params(), (embed, mlp)), out_sharding=("embed", "mlp"))
        self.down = nnx.Param(init(rngs.params(), (mlp, embed)), out_sharding=("mlp", "embed"))
        self.scale = nnx.Param(jnp.ones((embed,)), out_sharding=("norm",))
        self.bias = nnx.Param(jnp.zeros((mlp,)))  # no annotation: replicated

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        x_BTD = self.embedding[...][tokens_BT]
        x_BTD = sharding.constrain(x_BTD, ("batch", "length", "embed"))
        h_BTF = jax.nn.gelu(x_BTD @ self.up[...] + self.bias[...])
        y_BTD = (h_BTF @ self.down[...]) * self.scale[...]
        return y_BTD @ self.embedding[...].T


def _make(vocab=16, embed=8, mlp=12):
    # flax creates annotated variables eagerly sharded by default, which needs
    # a mesh; the unsharded reference is built without one.
    with nnx.use_eager_sharding(False):
        return TinyMLP(vocab, embed, mlp, rngs=nnx.Rngs(0))


def test_make_mesh_shapes_and_axis_types():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == (2, 2, 2)
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert tuple(sharding.make_mesh({"fsdp": -1}).shape.values()) == (1, 8, 1)
    explicit = sharding.make_mesh({"tensor": 8}, axis_type="explicit")
    assert explicit.axis_types == (AxisType.Explicit,) * 3
    assert tuple(sharding.make_mesh(None, devices=jax.devices()[:1]).shape.values()) == (1, 1, 1)


@pytest.mark.parametrize(
    "shape, match",
    [({"data": 3}, "needs 3 devices"), ({"model": 8}, "unknown axes"), ({"data": -1, "fsdp": -1}, "at most one")],
)
def test_make_mesh_bad_shapes(shape, match):
    with pytest.raises(ValueError, match=match):
        sharding.make_mesh(shape)


def test_logical_to_spec_rules_and_divisibility_fallback():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert sharding.logical_to_spec(("batch", "length", "embed"), mesh=mesh, shape=(8, 3, 4)) == P(
        ("data", "fsdp"), None, None
    )  # embed would reuse fsdp: dropped
    assert sharding.logical_to_spec(("batch", None), mesh=mesh, shape=(6, 5)) == P("data", None)
    assert sharding.logical_to_spec(("kv_heads", "head_dim"), mesh=mesh, shape=(3, 4)) == P(None, None)
    assert sharding.logical_to_spec(("unknown_name",)) == P(None)


def test_activation_rules_leave_batch_axes_to_the_batch():
    from flax.core import spmd

    rules = dict(sharding.activation_rules())
    assert rules["batch"] == ("data", "fsdp") and rules["embed"] is None and rules["mlp"] == "tensor"
    custom = dict(sharding.activation_rules((("batch", "data"), ("embed", ("data", "fsdp")))))
    assert custom == {"batch": "data", "embed": "fsdp"}
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with sharding.use_mesh(mesh):
        assert jax.sharding.get_abstract_mesh().shape == mesh.shape
        assert dict(spmd.get_logical_axis_rules())["embed"] is None
    assert spmd.get_logical_axis_rules() == ()


def test_create_sharded_splits_params_and_matches_unsharded():
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = sharding.create_sharded(_make, mesh)
    assert model.up[...].sharding.spec == P("fsdp", "tensor")
    assert model.embedding[...].sharding.spec == P("tensor", "fsdp")
    assert model.bias[...].sharding.spec == P()
    # Each device holds a quarter of every 2-D matrix and all of the vectors.
    full = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    per_device = sharding.bytes_per_device(nnx.state(model))
    assert len(per_device) == 8
    expected = (16 * 8 + 8 * 12 + 12 * 8) * 4 // 4 + (8 + 12) * 4
    assert set(per_device.values()) == {expected} and expected < full

    reference = _make()
    tokens_BT = jnp.arange(8 * 4, dtype=jnp.int32).reshape(8, 4) % 16
    with sharding.use_mesh(mesh):
        out = jax.jit(lambda m, t: m(t))(model, sharding.put_batch(tokens_BT, mesh))
    np.testing.assert_allclose(out, reference(tokens_BT), rtol=1e-5, atol=1e-5)
    assert out.sharding.spec[0] == ("data", "fsdp")


def test_create_sharded_non_divisible_dims_replicate():
    mesh = sharding.make_mesh({"fsdp": 2, "tensor": 4})
    model = sharding.create_sharded(lambda: _make(vocab=10, embed=6, mlp=7), mesh)
    assert model.embedding[...].sharding.spec == P(None, "fsdp")  # vocab 10 % 4 != 0
    assert model.up[...].sharding.spec == P("fsdp", None)  # mlp 7 % 4 != 0


def test_optimizer_state_follows_param_shardings_and_abstract_state():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})

    def init():
        model = _make()
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    model, optimizer = sharding.create_sharded(init, mesh)
    mu = optimizer.opt_state[0].mu
    assert mu["up"][...].sharding.spec == P("fsdp", "tensor")
    abstract = sharding.abstract_state(nnx.state(model), mesh)
    down = abstract["down"].get_value()
    assert isinstance(down, jax.ShapeDtypeStruct) and down.sharding.spec == P("tensor", "fsdp")


def test_constrain_is_noop_without_mesh():
    x = jnp.ones((4, 3))
    assert sharding.constrain(x, ("batch", None)) is x



# --- the models use the same mapping -------------------------------------------

def _decoder_config(num_heads: int, num_kv_heads: int):
    from aem_jax.models import ModelConfig

    return ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=1,
                       num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=8,
                       tie_embeddings=False)


def _dims(spec: P, ndim: int) -> tuple:
    return tuple(spec) + (None,) * (ndim - len(spec))


def _sharded_decoder_logits(config, mesh, monkeypatch):
    """(sharded model, logits, unsharded logits, {shape: spec} of every activation constraint)."""
    from aem_jax import models

    model = sharding.create_sharded(lambda: models.Decoder(config, rngs=nnx.Rngs(0)), mesh)
    graphdef, state = nnx.split(model)
    reference = nnx.merge(graphdef, jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), state))
    tokens_BT = (np.arange(8 * 6, dtype=np.int32).reshape(8, 6) * 7) % config.vocab_size
    mask_BT = np.ones_like(tokens_BT)
    mask_BT[0, :2] = 0  # left padding in one row
    constraints, original = {}, jax.lax.with_sharding_constraint

    def record(x, spec):
        constraints[tuple(x.shape)] = spec
        return original(x, spec)

    monkeypatch.setattr(jax.lax, "with_sharding_constraint", record)
    with sharding.use_mesh(mesh):
        batch = sharding.put_batch({"tokens": tokens_BT, "mask": mask_BT}, mesh)
        out = jax.jit(models.logits)(model, batch["tokens"], batch["mask"])
    monkeypatch.undo()
    expected = jax.jit(models.logits)(reference, jnp.asarray(tokens_BT), jnp.asarray(mask_BT))
    return model, out, expected, constraints, batch["tokens"].sharding.spec[0]


@pytest.mark.parametrize(
    "mesh_fn",
    [
        lambda: sharding.make_mesh({"data": 2, "tensor": 4}),
        # A mesh without a "data" axis: the batch must still go on "fsdp", in
        # the model exactly as in put_batch (a per-copy fallback once lost it).
        lambda: jax.make_mesh((2, 4), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2),
    ],
    ids=["data_tensor", "fsdp_tensor_only"],
)
def test_decoder_activation_constraints_match_parameter_and_batch_specs(mesh_fn, monkeypatch):
    mesh = mesh_fn()
    config = _decoder_config(num_heads=4, num_kv_heads=2)  # kv_heads=2 does not divide tensor=4
    model, out, expected, constraints, batch_spec = _sharded_decoder_logits(config, mesh, monkeypatch)
    attn, mlp = model.layers.attn, model.layers.mlp  # stacked: [L, ...], layer axis whole
    q_spec, k_spec = attn.q[...].sharding.spec, attn.k[...].sharding.spec
    up_spec, head_spec = mlp.up[...].sharding.spec, model.lm_head[...].sharding.spec
    assert _dims(q_spec, 4)[0] is None and _dims(up_spec, 3)[0] is None
    q_spec, k_spec, up_spec = (P(*_dims(spec, n)[1:]) for spec, n in ((q_spec, 4), (k_spec, 4), (up_spec, 3)))
    assert _dims(q_spec, 3)[1] == "tensor" and _dims(k_spec, 3)[1] is None
    b, t = 8, 6
    # Each activation dimension is laid out like the parameter dimension of the same name.
    assert _dims(constraints[(b, 4, t, 8)], 4) == (batch_spec, _dims(q_spec, 3)[1], None, None)
    assert _dims(constraints[(b, 2, t, 8)], 4) == (batch_spec, _dims(k_spec, 3)[1], None, None)
    assert _dims(constraints[(b, t, 24)], 3) == (batch_spec, None, _dims(up_spec, 2)[1])
    assert _dims(constraints[(b, t, 32)], 3) == (batch_spec, None, _dims(head_spec, 2)[1])
    assert _dims(constraints[(b, t, 16)], 3) == (batch_spec, None, None)  # embed: batch axes taken
    assert batch_spec is not None
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_decoder_heads_not_divisible_by_tensor_fall_back_to_replication(monkeypatch):
    mesh = sharding.make_mesh({"data": 2, "tensor": 4})
    config = _decoder_config(num_heads=6, num_kv_heads=3)  # neither divides tensor=4
    model, out, expected, constraints, batch_spec = _sharded_decoder_logits(config, mesh, monkeypatch)
    assert _dims(model.layers.attn.q[...].sharding.spec, 4)[2] is None
    assert _dims(constraints[(8, 6, 6, 8)], 4) == (batch_spec, None, None, None)
    assert _dims(constraints[(8, 3, 6, 8)], 4) == (batch_spec, None, None, None)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_there_is_one_logical_sharding_implementation():
    import importlib.util
    import pathlib

    import aem_jax
    from aem_jax.models import decoder, hf, sampler

    assert importlib.util.find_spec("aem_jax.trainer.sharding") is None
    for module in (decoder, hf, sampler):
        assert not hasattr(module, "logical_spec") and not hasattr(module, "logical_to_spec")
        assert getattr(module, "constrain", sharding.constrain) is sharding.constrain
        assert module.sharding is sharding
    root = pathlib.Path(aem_jax.__file__).parent
    mappers = sorted(
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if any(word in path.read_text() for word in ("with_sharding_constraint", "get_logical_axis_rules"))
    )
    assert mappers == ["sharding.py"], mappers


_WORKER = r"""
import json, sys
import numpy as np
from aem_jax.trainer import distributed
assert distributed.maybe_initialize(None)
import jax, jax.numpy as jnp
from flax import nnx
from aem_jax import sharding
from aem_jax.trainer import checkpoint

mesh = sharding.make_mesh({"data": 2, "fsdp": 2})

def init():
    with nnx.use_eager_sharding(False):
        return nnx.Linear(4, 6, rngs=nnx.Rngs(0), kernel_metadata={"out_sharding": ("embed", "mlp")})

model = sharding.create_sharded(init, mesh)
x = sharding.put_batch(np.arange(32, dtype=np.float32).reshape(8, 4) / 32, mesh)
with sharding.use_mesh(mesh):
    loss = jax.jit(lambda m, x: jnp.sum(m(x) ** 2))(model, x)
    total = jax.jit(jnp.sum)(x)
ckpt = checkpoint.Checkpointer(sys.argv[1])
ckpt.save(1, nnx.state(model), meta={"cursor": 5})
ckpt.wait()
restored = ckpt.restore(sharding.abstract_state(nnx.state(model), mesh))
ckpt.close()
same = all(
    bool(np.array_equal(a.addressable_shards[0].data, b.addressable_shards[0].data))
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(nnx.state(model)))
)
print("RESULT " + json.dumps({
    "info": distributed.process_info(), "loss": float(loss), "total": float(total),
    "local_shards": len(x.addressable_shards), "same": same, "meta": restored.meta,
}), flush=True)
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_local_processes_share_a_mesh_and_a_checkpoint(tmp_path):
    """Two CPU processes (2 devices each, gloo) act as one 4-device machine."""
    import os
    import subprocess
    import sys

    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(tmp_path / "ckpt")],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    results = multiprocess.results(procs, multiprocess.wait_all(procs, timeout=90))

    with nnx.use_eager_sharding(False):
        reference = nnx.Linear(4, 6, rngs=nnx.Rngs(0))
    x = np.arange(32, dtype=np.float32).reshape(8, 4) / 32
    expected_loss = float(jnp.sum(reference(jnp.asarray(x)) ** 2))
    for pid, result in enumerate(results):
        assert result["info"]["process_index"] == pid and result["info"]["process_count"] == 2
        assert result["info"]["devices"] == 4 and result["local_shards"] == 2
        assert result["loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert result["total"] == pytest.approx(float(x.sum()), rel=1e-6)
        assert result["same"] and result["meta"] == {"step": 1, "cursor": 5}


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, False),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "1"}, True),
        ({"JAX_COORDINATOR_ADDRESS": "10.0.0.2:1234", "JAX_NUM_PROCESSES": "1"}, False),
        ({"TPU_WORKER_HOSTNAMES": "t1-w-0,t1-w-1"}, True),
        ({"TPU_WORKER_HOSTNAMES": "localhost"}, False),
        ({"SLURM_NTASKS": "2"}, True),
        ({"AEM_JAX_DISTRIBUTED": "1"}, True),
        ({"AEM_JAX_DISTRIBUTED": "0", "SLURM_NTASKS": "2"}, False),
    ],
)
def test_launched_multi_process_reads_the_environment(env, expected):
    from aem_jax.trainer import distributed

    assert distributed.launched_multi_process(env) is expected


def test_initialize_kwargs_and_bad_values():
    from aem_jax.trainer import distributed

    env = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:99", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
    assert distributed.initialize_kwargs(env) == {
        "coordinator_address": "127.0.0.1:99", "num_processes": 2, "process_id": 1,
    }  # fmt: skip
    assert distributed.initialize_kwargs({}) == {}
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 must be in \[0, JAX_NUM_PROCESSES=2\)"):
        distributed.initialize_kwargs({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two' must be an integer"):
        distributed.initialize_kwargs({"JAX_NUM_PROCESSES": "two"})
    with pytest.raises(ValueError, match="AEM_JAX_DISTRIBUTED='maybe'"):
        distributed.launched_multi_process({"AEM_JAX_DISTRIBUTED": "maybe"})
    # In this (single) test process nothing asks for it, so nothing happens.
    assert distributed.maybe_initialize(False) is False
    assert distributed.process_info()["process_count"] == 1 and distributed.is_primary()
