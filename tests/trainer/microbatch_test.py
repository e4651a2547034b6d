"""Gradient accumulation: splitting a minibatch into micro-batches gives the same update."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from aem_jax import models, sharding
from aem_jax.batch import TurnBatch
from aem_jax.objectives.policy import AGGREGATIONS
from aem_jax.trainer.update import (
    LossSettings, PGBatch, TrainState, init_value_head, loss_denominators, pg_update_step, split_microbatches,
)

CONFIG = models.ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
    head_dim=8, model_type="qwen3", qkv_bias=False, qk_norm=True, max_position_embeddings=64)
B, T, K = 8, 16, 2


def _batch(seed=0):
    """Rows with 0 to 9 agent tokens over two turns: micro-batches (rows j, j + 4) get
    very different token counts, and row 4 has none (it must not count for seq-mean)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, size=(B, T)).astype(np.int32)
    attention = np.ones((B, T), np.int32)
    attention[::3, :3] = 0
    lengths = [9, 1, 5, 2, 0, 7, 3, 8]
    turn_ids = np.full((B, T), -1, np.int32)
    for b, n in enumerate(lengths):
        first = n // 2
        turn_ids[b, 5:5 + first] = 0
        turn_ids[b, 5 + first + 1:5 + n + 1] = 1  # one environment token between the turns
    loss_mask = (turn_ids >= 0).astype(np.float32)
    turn_valid = np.stack([(turn_ids == k).any(axis=1) for k in range(K)], axis=1)
    batch = TurnBatch(
        tokens=tokens, attention_mask=attention, loss_mask=loss_mask, turn_ids=turn_ids,
        old_logp=(-rng.random((B, T)) * 4 * loss_mask).astype(np.float32),
        ref_logp=(-rng.random((B, T)) * 4 * loss_mask).astype(np.float32),
        old_entropy=np.zeros((B, T), np.float32), turn_rewards=np.zeros((B, K), np.float32),
        turn_valid=turn_valid, anchor_ids=np.zeros((B, K), np.int32), group_ids=np.zeros(B, np.int32),
        episode_ids=np.arange(B, dtype=np.int32), turn_offset=np.zeros(B, np.int32), done=np.zeros((B, K), bool))
    adv = rng.normal(size=(B, 1)) * loss_mask
    adv[1] = 0.0  # a response with A = 0 (entropy_mask="nonzero_advantage" leaves it out)
    return PGBatch(batch=batch, advantages=adv.astype(np.float32),
                   returns=(rng.normal(size=(B, T)) * loss_mask).astype(np.float32))


@functools.cache
def _model():
    model = models.Decoder(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params, _ = nnx.split(model, nnx.Param, ...)
    return graphdef, params


def _update(settings, mb, *, value_head):
    graphdef, params = _model()
    extra = init_value_head(CONFIG.hidden_size) if value_head else {}
    if value_head:  # a non-zero head, so the value loss reaches the trunk
        extra = {"value_w": jnp.linspace(-0.5, 0.5, CONFIG.hidden_size), "value_b": jnp.asarray(0.1)}
    optimizer = optax.sgd(0.5)  # the update is the gradient itself: compare it directly
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra,
                       opt_state=optimizer.init((params, extra)), nonfinite=jnp.zeros((), jnp.int32))
    step = jax.jit(functools.partial(pg_update_step, graphdef=graphdef, optimizer=optimizer, settings=settings))
    new, metrics = step(state, jax.tree.map(jnp.asarray, mb))
    return state, new, metrics


def _assert_same_update(settings, *, value_head=False, microbatch_size=2):
    mb = _batch()
    before, whole, m_whole = _update(settings, mb, value_head=value_head)
    split = LossSettings(**{**settings.__dict__, "microbatch_size": microbatch_size})
    _, parts, m_parts = _update(split, mb, value_head=value_head)
    assert set(m_parts) == set(m_whole)
    for k in m_whole:
        np.testing.assert_allclose(float(m_parts[k]), float(m_whole[k]), rtol=2e-5, atol=1e-7, err_msg=k)
    moved = 0
    for a, b, p in zip(jax.tree.leaves((parts.params, parts.extra)), jax.tree.leaves((whole.params, whole.extra)),
                       jax.tree.leaves((before.params, before.extra))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
        moved += int(np.any(np.asarray(b) != np.asarray(p)))
    assert moved == len(jax.tree.leaves((before.params, before.extra)))  # every tensor got a gradient


@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_microbatches_equal_the_whole_minibatch(agg):
    """PPO-clip with the entropy bonus (over non-zero-advantage responses), the KL penalty and
    PPO's value loss, for every aggregation: same loss, metrics and new parameters."""
    settings = LossSettings(agg=agg, chunk_size=32, entropy_coef=0.05, entropy_mask="nonzero_advantage",
                            kl_coef=0.1, value_coef=0.5, num_turns=K, dual_clip=3.0)
    _assert_same_update(settings, value_head=True)


def test_gspo_microbatches_equal_the_whole_minibatch():
    settings = LossSettings(kind="gspo", clip_low=3e-4, clip_high=4e-4, chunk_size=32, entropy_coef=0.05,
                            num_turns=K)
    _assert_same_update(settings, microbatch_size=4)


def test_denominators_are_the_whole_minibatch_counts():
    mb = jax.tree.map(jnp.asarray, _batch())
    mask = np.asarray(mb.batch.loss_mask)
    for agg, want in [("token-mean", mask.sum()), ("seq-mean-token-sum", 7.0), ("seq-mean-token-mean", 7.0),
                      ("seq-mean-token-sum-norm", 7.0 * T)]:
        den = loss_denominators(mb, LossSettings(agg=agg, num_turns=K))
        assert float(den["policy"]) == want, agg
    # responses: one per non-empty turn (row 1 has one token, in turn 1 only)
    want = sum(int((np.asarray(mb.batch.turn_ids)[b] == k).any()) for b in range(B) for k in range(K))
    assert float(loss_denominators(mb, LossSettings(kind="gspo", num_turns=K))["responses"]) == want


def test_split_is_strided():
    x = jnp.arange(8)
    np.testing.assert_array_equal(np.asarray(split_microbatches(x, 4)), [[0, 4], [1, 5], [2, 6], [3, 7]])
    with pytest.raises(ValueError, match="cannot split 8 rows into 3"):
        split_microbatches(x, 3)


@pytest.mark.slow
def test_sharded_microbatches_equal_single_device():
    """On a data x fsdp mesh of 4 devices the accumulated update equals the one-device one."""
    assert jax.device_count() >= 4
    mb = _batch()
    settings = LossSettings(chunk_size=32, num_turns=K, microbatch_size=4)
    results = []
    for mesh in (sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                 sharding.make_mesh({"data": 2, "fsdp": 2}, devices=jax.devices()[:4])):
        with sharding.use_mesh(mesh):
            model = sharding.create_sharded(lambda: models.Decoder(CONFIG, rngs=nnx.Rngs(0)), mesh)
            graphdef, params, _ = nnx.split(model, nnx.Param, ...)
            optimizer = optax.sgd(0.5)
            state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra={},
                               opt_state=optimizer.init((params, {})), nonfinite=jnp.zeros((), jnp.int32))
            step = jax.jit(functools.partial(pg_update_step, graphdef=graphdef, optimizer=optimizer,
                                             settings=settings))
            new, metrics = step(state, sharding.put_batch(mb, mesh))
            results.append((jax.tree.map(np.asarray, new.params), float(metrics["loss"])))
    np.testing.assert_allclose(results[1][1], results[0][1], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results[1][0]), jax.tree.leaves(results[0][0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_loss_settings_read_the_learner_block():
    from aem_jax.trainer import defaults

    config = defaults.base()
    config.learner.microbatch_size = 32
    assert LossSettings.from_config(config).microbatch_size == 32
    assert LossSettings.from_config(config, microbatch_size=0).microbatch_size == 0
