"""The optimiser state is sharded like the parameters it tracks (not replicated)."""
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from aem_jax import sharding
from aem_jax.trainer import update


def test_adam_moments_follow_their_parameters():
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2}, devices=jax.devices()[:8])
    spec = PartitionSpec("fsdp", "tensor")
    w = jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), NamedSharding(mesh, spec))
    b = jnp.zeros(32)  # not yet on the mesh: replicated
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    state = update.new_train_state({"w": w, "b": b}, optimizer, mesh)
    adam = state.opt_state[1][0]
    for moment in (adam.mu, adam.nu):
        (params_mu, _extra) = moment
        assert params_mu["w"].sharding.spec == spec
        assert params_mu["w"].addressable_shards[0].data.shape == (16, 16)  # a 1/8 slice on each device
        assert params_mu["b"].sharding.spec == PartitionSpec()
    assert adam.count.sharding.spec == PartitionSpec()
    # the values are those of optimizer.init
    want = optimizer.init(({"w": jnp.asarray(w), "b": b}, {}))
    for got, ref in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want)):
        assert jnp.array_equal(got, ref)
