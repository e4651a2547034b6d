"""Scanned, rematerialised layers: one compiled layer body, same maths under every policy."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import aem_jax.models as M
from aem_jax.models import decoder

CONFIG = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, model_type="qwen2",
                       qkv_bias=True, tie_embeddings=False)


def _loss_fn(graphdef):
    def loss(params, tokens_BT, mask_BT):
        logits = M.logits(nnx.merge(graphdef, params), tokens_BT, mask_BT)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens_BT[:, 1:, None], axis=-1))

    return loss


def _graphdef(config):
    """The model structure of `config` without initialising it (cheap to trace)."""
    return nnx.split(nnx.eval_shape(lambda: M.Decoder(config, rngs=nnx.Rngs(0))))[0]


def _batch(b, t, seed=0):
    tokens = jax.random.randint(jax.random.key(seed), (b, t), 0, CONFIG.vocab_size)
    mask = jnp.ones_like(tokens).at[0, : t // 4].set(0)  # some left padding
    return tokens, mask


def _dot_count(config, b=2, t=8):
    graphdef, params = nnx.split(nnx.eval_shape(lambda: M.Decoder(config, rngs=nnx.Rngs(0))))
    tokens, mask = _batch(b, t)
    lowered = jax.jit(jax.value_and_grad(_loss_fn(graphdef))).lower(params, tokens, mask)
    return len(re.findall(r"\bdot_general\b", lowered.as_text()))


def test_depth_does_not_unroll_the_layers():
    two, eight = _dot_count(CONFIG), _dot_count(CONFIG.replace(num_layers=8))
    # 7 weight matmuls and 2 attention products per layer body, forward and backward.
    assert two == eight and two >= 9


def test_stacked_layers_equal_the_layers_called_one_by_one():
    model = M.init_model(CONFIG.replace(num_layers=3), seed=1)
    tokens, mask = _batch(2, 10, seed=1)

    @jax.jit
    def one_by_one(model):
        graphdef, stacked = nnx.split(model.layers)
        c = model.config
        x = jnp.take(model.embed[...], tokens, axis=0)
        positions = M.positions_from_mask(mask)
        rope = decoder.rope_tables(positions, decoder.rope_inverse_frequencies(c), jnp.float32)
        for l in range(c.num_layers):
            layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[l], stacked))
            x, _ = layer(x, rope, (mask, mask))
        return model.unembed(model.final_norm(x))

    expected = one_by_one(model)
    np.testing.assert_allclose(jax.jit(M.logits)(model, tokens, mask), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_policies_give_the_same_loss_and_gradients(remat):
    base = M.init_model(CONFIG, seed=2)
    graphdef, params = nnx.split(base)
    remat_graphdef = _graphdef(CONFIG.replace(remat=remat))
    tokens, mask = _batch(2, 16, seed=2)
    loss, grads = jax.jit(jax.value_and_grad(_loss_fn(graphdef)))(params, tokens, mask)
    loss_r, grads_r = jax.jit(jax.value_and_grad(_loss_fn(remat_graphdef)))(params, tokens, mask)
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    for (path, g), (_, g_r) in zip(jax.tree_util.tree_leaves_with_path(grads),
                                   jax.tree_util.tree_leaves_with_path(grads_r)):
        assert float(jnp.max(jnp.abs(g))) > 0, path
        np.testing.assert_allclose(g_r, g, rtol=1e-6, atol=1e-6, err_msg=str(path))


def test_full_remat_needs_less_temporary_memory():
    config = CONFIG.replace(num_layers=4, hidden_size=64, intermediate_size=256)

    def temp_bytes(remat):
        graphdef, params = nnx.split(nnx.eval_shape(lambda: M.Decoder(config.replace(remat=remat),
                                                                      rngs=nnx.Rngs(0))))
        step = jax.jit(jax.value_and_grad(_loss_fn(graphdef)))
        return step.lower(params, *_batch(4, 256)).compile().memory_analysis().temp_size_in_bytes

    none, full = temp_bytes("none"), temp_bytes("full")
    assert full < 0.7 * none, (full, none)


def test_offload_without_host_memory_names_the_backend():
    assert jax.default_backend() == "cpu"
    model = M.init_model(CONFIG.replace(remat="offload"))
    tokens, mask = _batch(1, 4)
    with pytest.raises(ValueError, match=r"remat='offload'.*backend 'cpu'"):
        jax.jit(M.logits)(model, tokens, mask)


def test_kv_cache_is_stacked():
    cache = M.KVCache.zeros(CONFIG, batch=3, length=16)
    assert cache.keys.shape == cache.values.shape == (2, 3, 2, 16, 8)
    model = M.init_model(CONFIG, seed=3)
    tokens, mask = _batch(3, 6, seed=3)
    mask_BS = jnp.zeros((3, 16), jnp.int32).at[:, :6].set(mask)
    positions = M.positions_from_mask(mask)
    hidden, cache = jax.jit(lambda m, c: m.hidden(tokens, positions, mask_BS, c, prefill=True))(model, cache)
    assert int(cache.index) == 6 and cache.keys.shape == (2, 3, 2, 16, 8)
    assert float(jnp.abs(cache.keys[:, :, :, 6:]).max()) == 0  # only the prompt slots are written
    np.testing.assert_allclose(hidden, jax.jit(M.hidden_states)(model, tokens, mask), rtol=1e-5, atol=1e-5)
