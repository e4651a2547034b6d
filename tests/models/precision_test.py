"""Float32 master parameters with bfloat16 compute.

A bfloat16 number keeps 8 significant bits, so adding an update smaller than
about 2^-9 of a weight's magnitude leaves the weight unchanged. At the small
learning rates of RL fine-tuning (AdamW moves each weight by about lr per
step) bfloat16 storage therefore freezes almost every weight, while float32
storage (24 bits) keeps them all learning; the compute dtype can stay
bfloat16 either way.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import aem_jax.models as M
from aem_jax import sharding
from models_testlib import max_rel_err, padded_batch

CONFIG = M.ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8, model_type="qwen3",
                       qkv_bias=False, qk_norm=True, tie_embeddings=True)


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG.vocab_size, (4, 16)).astype(np.int32)
    return jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens))


def _adamw_changed_fraction(model, steps=20, lr=1e-6):
    """Fraction of parameter entries that differ after `steps` AdamW steps."""
    graphdef, params = nnx.split(model, nnx.Param)
    tokens, mask = _batch()

    def loss_fn(p):
        logits = M.logits(nnx.merge(graphdef, p), tokens, mask)
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    opt = optax.adamw(lr)

    @jax.jit
    def train(p):
        def step(carry, _):
            p, s = carry
            grads = jax.grad(loss_fn)(p)
            updates, s = opt.update(grads, s, p)
            return (optax.apply_updates(p, updates), s), None

        return jax.lax.scan(step, (p, opt.init(p)), None, length=steps)[0][0]

    new = train(params)
    changed = sum(int(jnp.sum(a != b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new)))
    total = sum(a.size for a in jax.tree.leaves(params))
    dtypes = {a.dtype for a in jax.tree.leaves(new)}
    return changed / total, dtypes


def test_float32_master_weights_keep_learning_at_small_learning_rates():
    master = M.init_model(CONFIG, seed=0, dtype="bfloat16", param_dtype="float32")
    assert master.config.compute_dtype == jnp.bfloat16 and master.embed[...].dtype == jnp.float32
    low = M.init_model(CONFIG, seed=0, dtype="bfloat16")
    assert low.embed[...].dtype == jnp.bfloat16
    f32_fraction, f32_dtypes = _adamw_changed_fraction(master)
    bf16_fraction, bf16_dtypes = _adamw_changed_fraction(low)
    assert f32_dtypes == {jnp.dtype(jnp.float32)} and bf16_dtypes == {jnp.dtype(jnp.bfloat16)}
    assert f32_fraction > 0.99, f32_fraction
    assert bf16_fraction < 0.05, bf16_fraction


def test_bfloat16_compute_logits_stay_close_to_float32():
    f32 = M.init_model(CONFIG, seed=1)
    graphdef, state = nnx.split(f32)
    bf16 = nnx.merge(nnx.split(M.init_model(CONFIG.replace(dtype="bfloat16"), seed=1))[0], state)
    # Same float32 parameters, only the compute dtype differs.
    assert bf16.config.dtype == "bfloat16" and bf16.embed[...].dtype == jnp.float32
    tokens, mask = _batch(1)
    ref = jax.jit(M.logits)(f32, tokens, mask)
    low = jax.jit(M.logits)(bf16, tokens, mask)
    assert low.dtype == jnp.float32
    err = max_rel_err(low, ref, np.ones(tokens.shape, bool))
    assert 0 < err < 0.03, err
    # The float32 reference's unembedding against float64 numpy.
    hidden = np.asarray(jax.jit(M.hidden_states)(f32, tokens, mask), np.float64)
    via_numpy = hidden @ np.asarray(M.unembedding(f32), np.float64)
    np.testing.assert_allclose(ref, via_numpy, rtol=1e-4, atol=1e-5)


def test_from_pretrained_with_float32_master_and_bfloat16_compute(checkpoints):
    ckpt = checkpoints["qwen2"]
    exact, tok = M.from_pretrained(ckpt.path)
    mixed, _ = M.from_pretrained(ckpt.path, dtype="bfloat16", param_dtype="float32", remat="full")
    assert mixed.config.dtype == "bfloat16" and mixed.config.param_dtype == "float32"
    assert mixed.config.remat == "full"
    for a, b in zip(jax.tree.leaves(nnx.state(exact, nnx.Param)), jax.tree.leaves(nnx.state(mixed, nnx.Param))):
        assert b.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)  # no bfloat16 round trip on the way in
    tokens, mask = padded_batch(len(tok))
    ref = jax.jit(M.logits)(exact, jnp.asarray(tokens), jnp.asarray(mask))
    out = jax.jit(M.logits)(mixed, jnp.asarray(tokens), jnp.asarray(mask))
    assert 0 < max_rel_err(out, ref, mask) < 0.05


def test_init_model_on_a_mesh_creates_sharded_master_weights():
    mesh = sharding.make_mesh({"fsdp": 4, "tensor": 2})
    model = M.init_model(CONFIG, seed=2, dtype="bfloat16", param_dtype="float32", mesh=mesh)
    state = nnx.state(model, nnx.Param)
    expected = sharding.state_shardings(state, mesh)
    for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
        assert var.get_value().dtype == jnp.float32, path
        assert var.get_value().sharding == want.get_value(), path
    plain = M.init_model(CONFIG, seed=2, dtype="bfloat16", param_dtype="float32")
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(nnx.state(plain, nnx.Param))):
        np.testing.assert_array_equal(a, b)


def test_bad_dtypes_and_remat_name_the_value():
    with pytest.raises(ValueError, match=r"param_dtype='float16'; allowed: \('float32', 'bfloat16'\)"):
        CONFIG.replace(param_dtype="float16")
    with pytest.raises(ValueError, match=r"remat='some'; allowed: \('none', 'dots', 'full', 'offload'\)"):
        CONFIG.replace(remat="some")
