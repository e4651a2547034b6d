"""Token log-probs / entropy: fixtures, float64 reference, chunked == naive, gradients."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from aem_jax import objectives as obj
from tests.objectives import reference as ref


class TokenStatsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        logits = jnp.array([[[0.0, 0.0], [jnp.log(3.0), 0.0]]])  # p = (.5,.5), (.75,.25)
        targets = jnp.array([[1, 0]])
        logp = self.variant(obj.token_logprobs)(logits, targets)
        ent = self.variant(obj.token_entropy)(logits)
        np.testing.assert_allclose(logp, [[np.log(0.5), np.log(0.75)]], rtol=1e-6)
        h2 = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
        np.testing.assert_allclose(ent, [[np.log(2.0), h2]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_float64_reference(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
        targets = rng.integers(0, 11, size=(3, 5))
        np.testing.assert_allclose(self.variant(obj.token_logprobs)(logits, targets),
                                   ref.token_logprobs(logits, targets), atol=1e-5)
        np.testing.assert_allclose(self.variant(obj.token_entropy)(logits),
                                   ref.token_entropy(logits), atol=1e-5)

    def test_bfloat16_logits_computed_in_float32(self):
        logits = jnp.ones((1, 2, 4), jnp.bfloat16)
        self.assertEqual(obj.token_logprobs(logits, jnp.zeros((1, 2), jnp.int32)).dtype, jnp.float32)
        np.testing.assert_allclose(obj.token_entropy(logits), np.log(4.0), rtol=1e-6)

    def test_extreme_logits_stay_finite(self):
        logits = jnp.array([[[1e4, -1e4, 0.0]]])
        self.assertTrue(np.isfinite(obj.token_entropy(logits)).all())
        self.assertTrue(np.isfinite(obj.token_logprobs(logits, jnp.array([[1]]))).all())


class ChunkedTest(chex.TestCase):

    def _inputs(self, B=2, T=9, D=8, V=37, seed=0):
        rng = np.random.default_rng(seed)
        hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
        unemb = jnp.asarray(rng.normal(size=(D, V)) / np.sqrt(D) * 3, jnp.float32)
        targets = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
        return hidden, unemb, targets

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(1, 4, 7, 18, 1000)
    def test_equals_naive(self, chunk_size):
        hidden, unemb, targets = self._inputs()
        fn = self.variant(functools.partial(obj.logprobs_and_entropy_from_hidden, chunk_size=chunk_size))
        logp, ent = fn(hidden, unemb, targets)
        logits = jnp.einsum("btd,dv->btv", hidden, unemb)
        np.testing.assert_allclose(logp, obj.token_logprobs(logits, targets), atol=1e-5)
        np.testing.assert_allclose(ent, obj.token_entropy(logits), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(3, 8)
    def test_gradients_equal_naive(self, chunk_size):
        hidden, unemb, targets = self._inputs(seed=1)
        rng = np.random.default_rng(2)
        w_lp = jnp.asarray(rng.normal(size=targets.shape), jnp.float32)
        w_h = jnp.asarray(rng.normal(size=targets.shape), jnp.float32)

        def chunked(h, u):
            lp, en = obj.logprobs_and_entropy_from_hidden(h, u, targets, chunk_size=chunk_size)
            return jnp.sum(w_lp * lp + w_h * en)

        def naive(h, u):
            logits = jnp.einsum("btd,dv->btv", h, u)
            return jnp.sum(w_lp * obj.token_logprobs(logits, targets) + w_h * obj.token_entropy(logits))

        g_c = self.variant(jax.grad(chunked, argnums=(0, 1)))(hidden, unemb)
        g_n = jax.grad(naive, argnums=(0, 1))(hidden, unemb)
        for a, b in zip(g_c, g_n):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)

    def test_gradient_against_finite_differences(self):
        hidden, unemb, targets = self._inputs(B=1, T=3, D=4, V=5, seed=3)
        hidden = hidden.astype(jnp.float32)

        def f(h):
            lp, en = obj.logprobs_and_entropy_from_hidden(h, unemb, targets, chunk_size=2)
            return jnp.sum(lp) + 0.5 * jnp.sum(en)

        chex.assert_numerical_grads(f, (hidden,), order=1, modes=("rev",), atol=5e-2, rtol=5e-2)

    def test_bfloat16_inputs(self):
        hidden, unemb, targets = self._inputs(seed=4)
        logp, ent = obj.logprobs_and_entropy_from_hidden(
            hidden.astype(jnp.bfloat16), unemb.astype(jnp.bfloat16), targets, chunk_size=5)
        self.assertEqual(logp.dtype, jnp.float32)
        logits = jnp.einsum("btd,dv->btv", hidden.astype(jnp.bfloat16), unemb.astype(jnp.bfloat16),
                            preferred_element_type=jnp.float32)
        np.testing.assert_allclose(logp, obj.token_logprobs(logits, targets), atol=1e-3)
        g = jax.grad(lambda h: obj.logprobs_and_entropy_from_hidden(h, unemb.astype(jnp.bfloat16),
                                                                   targets, chunk_size=5)[0].sum())(
            hidden.astype(jnp.bfloat16))
        self.assertEqual(g.dtype, jnp.bfloat16)

    def test_never_materialises_full_logits(self):
        """The compiled program's temporaries stay far below one [B*T, V] f32 block."""
        B, T, D, V, chunk = 2, 512, 16, 4096, 128
        hidden = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
        unemb = jax.ShapeDtypeStruct((D, V), jnp.float32)
        targets = jax.ShapeDtypeStruct((B, T), jnp.int32)

        def loss(h, u, y):
            lp, en = obj.logprobs_and_entropy_from_hidden(h, u, y, chunk_size=chunk)
            return jnp.sum(lp) + jnp.sum(en)

        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(hidden, unemb, targets).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes
        chunk_block = chunk * V * 4
        self.assertLess(temp, 3 * chunk_block)
        self.assertLess(temp, B * T * V * 4 / 2)


@pytest.mark.parametrize("bad, match", [
    (dict(logits=np.zeros((2, 3))), "logits must have rank 3"),
    (dict(targets=np.zeros((2, 4), np.int32)), r"targets must have leading shape \(2, 3\)"),
    (dict(targets=np.zeros((2, 3), np.float32)), "targets must have an integer dtype"),
])
def test_bad_input(bad, match):
    args = dict(logits=np.zeros((2, 3, 4), np.float32), targets=np.zeros((2, 3), np.int32))
    args.update(bad)
    with pytest.raises((ValueError, TypeError), match=match):
        obj.token_logprobs(**args)


def test_chunked_bad_input():
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        obj.logprobs_and_entropy_from_hidden(np.zeros((1, 2, 3), np.float32), np.zeros((3, 5), np.float32),
                                             np.zeros((1, 2), np.int32), chunk_size=0)
    with pytest.raises(ValueError, match=r"unembedding must have shape \[D=3, V\]"):
        obj.logprobs_and_entropy_from_hidden(np.zeros((1, 2, 3), np.float32), np.zeros((4, 5), np.float32),
                                             np.zeros((1, 2), np.int32), chunk_size=2)
