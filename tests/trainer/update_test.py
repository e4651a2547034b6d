"""The jitted policy update: sharded == unsharded, non-finite updates are skipped."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from aem_jax import models, sharding
from aem_jax.batch import TurnBatch
from aem_jax.trainer.update import LossSettings, PGBatch, TrainState, pg_update_step, place_state

CONFIG = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=8, model_type="qwen3", qkv_bias=False, qk_norm=True, max_position_embeddings=64)


def _batch(B=8, T=16, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(B, T)).astype(np.int32)
    attention = np.ones((B, T), np.int32)
    attention[::3, :4] = 0  # some left padding
    loss_mask = np.zeros((B, T), np.float32)
    loss_mask[:, 8:12] = 1.0
    turn_ids = np.where(loss_mask > 0, 0, -1).astype(np.int32)
    bk = np.zeros((B, 1), np.float32)
    batch = TurnBatch(
        tokens=tokens, attention_mask=attention, loss_mask=loss_mask, turn_ids=turn_ids,
        old_logp=(-rng.random((B, T)) * 4).astype(np.float32), ref_logp=np.zeros((B, T), np.float32),
        old_entropy=np.zeros((B, T), np.float32), turn_rewards=bk, turn_valid=bk == 0,
        anchor_ids=bk.astype(np.int32), group_ids=np.zeros(B, np.int32), episode_ids=np.arange(B, dtype=np.int32),
        turn_offset=np.zeros(B, np.int32), done=bk > 0)
    return PGBatch(batch=batch, advantages=(rng.normal(size=(B, T)) * loss_mask).astype(np.float32),
                   returns=np.zeros((B, T), np.float32))


def _one_update(mesh, batch):
    state, metrics, _ = _one_update_scaled(mesh, batch, 1.0)
    return state, metrics


def _one_update_scaled(mesh, batch, scale):
    """(state after one update with ``scale`` on the optimiser's step, its metrics, initial params)."""
    with sharding.use_mesh(mesh):
        model = sharding.create_sharded(lambda: models.Decoder(CONFIG, rngs=nnx.Rngs(0)), mesh)
        graphdef, params, _ = nnx.split(model, nnx.Param, ...)
        optimizer = optax.adam(1e-2)
        state = place_state(TrainState(
            step=jnp.zeros((), jnp.int32), params=params, extra={},
            opt_state=optimizer.init((params, {})), nonfinite=jnp.zeros((), jnp.int32)), mesh)
        step = jax.jit(functools.partial(pg_update_step, graphdef=graphdef, optimizer=optimizer,
                                         settings=LossSettings(chunk_size=32)))
        before = jax.tree.map(np.asarray, params)
        new_state, metrics = step(state, sharding.put_batch(batch, mesh), jnp.float32(scale))
        return new_state, metrics, before


def test_sharded_update_equals_single_device():
    assert jax.device_count() == 8
    batch = _batch()
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    eight = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    s1, m1 = _one_update(one, batch)
    s8, m8 = _one_update(eight, batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m8["grad_norm"], m1["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    # parameters are really split: each device holds well under the full size
    total = sum(x.nbytes for x in jax.tree.leaves(s1.params))
    per_device = sharding.bytes_per_device(s8.params)
    assert len(per_device) == 8
    assert max(per_device.values()) < 0.6 * total, (per_device, total)
    embed = s8.params["embed"][...]
    assert embed.addressable_shards[0].data.shape == (CONFIG.vocab_size // 2, CONFIG.hidden_size // 2)


def test_non_finite_update_is_skipped():
    batch = _batch(seed=1)
    batch.advantages[0, 8] = np.nan
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    with sharding.use_mesh(mesh):
        model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
        graphdef, params, _ = nnx.split(model, nnx.Param, ...)
        optimizer = optax.adam(1e-2)
        state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra={},
                           opt_state=optimizer.init((params, {})), nonfinite=jnp.zeros((), jnp.int32))
        before = jax.tree.map(np.asarray, state.params)
        new, metrics = pg_update_step(state, batch, graphdef=graphdef, optimizer=optimizer,
                                      settings=LossSettings(chunk_size=32))
    assert float(metrics["skipped"]) == 1.0
    assert int(new.nonfinite) == 1 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_entropy_bonus_can_skip_zero_advantage_responses():
    """entropy_mask="nonzero_advantage": a batch whose advantages are all 0 gives no gradient at all
    (the bonus covers no token); "all" keeps the bonus, and with some A != 0 the two agree on the
    bonus's value over those rows."""
    from aem_jax.trainer.update import pg_loss

    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    batch = jax.tree.map(jnp.asarray, _batch())
    zero = batch.replace(advantages=jnp.zeros_like(batch.advantages))

    def grad_norm(mb, mask_kind):
        settings = LossSettings(chunk_size=32, entropy_coef=0.1, entropy_mask=mask_kind)
        grads = jax.grad(lambda p: pg_loss((p, {}), graphdef, mb, settings)[0])(params)
        return float(optax.tree.norm(grads))

    assert grad_norm(zero, "all") > 1e-4
    assert grad_norm(zero, "nonzero_advantage") == 0.0

    # Half the rows with A = 0: the masked bonus is the entropy mean over the other half's tokens.
    half = batch.replace(advantages=batch.advantages.at[::2].set(0.0))
    settings = LossSettings(chunk_size=32, entropy_coef=1.0, entropy_mask="nonzero_advantage")
    loss, metrics = pg_loss((params, {}), graphdef, half, settings)
    from aem_jax.trainer.update import shifted_logp_entropy
    _, ent, _ = shifted_logp_entropy(graphdef, params, half.batch.tokens, half.batch.attention_mask, chunk_size=32)
    keep = np.asarray(half.batch.loss_mask) * (np.asarray(half.advantages) != 0)
    want_bonus = -(np.asarray(ent) * keep).sum() / keep.sum()
    np.testing.assert_allclose(float(loss - metrics["policy_loss"]), want_bonus, rtol=1e-5)


def test_non_finite_parameters_after_an_update_are_never_kept():
    """A finite loss and gradient whose update overflows the parameters is skipped like a NaN loss."""
    batch = jax.tree.map(jnp.asarray, _batch(seed=2))
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    optimizer = optax.chain(optax.sgd(1.0), optax.scale(jnp.inf))  # updates of +-inf
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra={},
                       opt_state=optimizer.init((params, {})), nonfinite=jnp.zeros((), jnp.int32))
    before = jax.tree.map(np.asarray, state.params)
    new, metrics = pg_update_step(state, batch, graphdef=graphdef, optimizer=optimizer,
                                  settings=LossSettings(chunk_size=32))
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert float(metrics["skipped"]) == 1.0 and int(new.nonfinite) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(before)):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_ppo_value_head_reads_the_state_before_the_action():
    """One-turn bandit: the same prompt, then a good (reward 1) or bad (reward 0)
    action token. A value head fitted to the returns can only predict V(s) = 0.5
    if it reads the state before the action, and then GAE gives the two actions
    advantages +0.5 and -0.5. (Read at the action token it would fit Q(s, a) = r
    and leave both advantages at 0.)"""
    from aem_jax import objectives as obj
    from aem_jax.trainer.update import forward_stats, init_value_head, token_values, shifted_logp_entropy

    model = models.Decoder(CONFIG, rngs=nnx.Rngs(3))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    tokens = jnp.array([[7, 8, 9, 5], [7, 8, 9, 6]], jnp.int32)   # prompt 7 8 9, then action 5 (good) or 6 (bad)
    attention = jnp.ones_like(tokens)
    mask = jnp.array([[0, 0, 0, 1]] * 2, jnp.float32)
    turn_ids = jnp.where(mask > 0, 0, -1).astype(jnp.int32)
    rewards, valid = jnp.array([[1.0], [0.0]]), jnp.ones((2, 1), bool)
    _, returns = obj.bilevel_gae(jnp.zeros((2, 4)), rewards, turn_ids, mask, valid, gamma=1.0, lam=1.0)
    _, _, hidden = shifted_logp_entropy(graphdef, params, tokens, attention, chunk_size=32)
    hidden = jax.lax.stop_gradient(hidden)

    optimizer = optax.adam(0.05)
    extra = init_value_head(CONFIG.hidden_size)
    opt_state = optimizer.init(extra)

    @jax.jit
    def fit_step(extra, opt_state):
        loss = lambda e: jnp.sum(mask * (token_values(e, hidden) - returns) ** 2)  # noqa: E731
        grads = jax.grad(loss)(extra)
        updates, opt_state = optimizer.update(grads, opt_state, extra)
        return optax.apply_updates(extra, updates), opt_state

    for _ in range(400):
        extra, opt_state = fit_step(extra, opt_state)
    values = forward_stats(params, extra, TurnBatch(
        tokens=tokens, attention_mask=attention, loss_mask=mask, turn_ids=turn_ids, old_logp=mask, ref_logp=mask,
        old_entropy=mask, turn_rewards=rewards, turn_valid=valid, anchor_ids=jnp.zeros((2, 1), jnp.int32),
        group_ids=jnp.zeros(2, jnp.int32), episode_ids=jnp.arange(2), turn_offset=jnp.zeros(2, jnp.int32),
        done=valid), graphdef=graphdef, chunk_size=32, with_values=True)["values"]
    np.testing.assert_allclose(np.asarray(values)[:, 3], [0.5, 0.5], atol=1e-3)
    adv, _ = obj.bilevel_gae(values, rewards, turn_ids, mask, valid, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(np.asarray(adv)[:, 3], [0.5, -0.5], atol=1e-3)
