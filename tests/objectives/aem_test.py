"""AEM: surprisal quantities, alpha properties, and the entropy-drift theory check."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import objectives as obj
from tests.objectives import reference as ref
from tests.objectives.segments_test import random_turns


class SurprisalTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        logp = jnp.array([[-1.0, -2.0, 0.0, -0.5]])
        ent = jnp.array([[0.5, 1.0, 9.0, 0.25]])
        ids = jnp.array([[0, 0, -1, 1]])
        S = self.variant(functools.partial(obj.response_surprisal, num_turns=2))(logp, ids)
        H = self.variant(functools.partial(obj.response_entropy, num_turns=2))(ent, ids)
        Hbar = self.variant(functools.partial(obj.response_entropy, num_turns=2, length_normalize=True))(ent, ids)
        rel = self.variant(functools.partial(obj.relative_surprisal, num_turns=2))(logp, ent, ids)
        np.testing.assert_allclose(S, [[3.0, 0.5]])
        np.testing.assert_allclose(H, [[1.5, 0.25]])
        np.testing.assert_allclose(Hbar, [[0.75, 0.25]])
        np.testing.assert_allclose(rel, [[1.5, 0.25]])
        drift = self.variant(obj.entropy_drift)(jnp.array([[2.0, -1.0]]), rel, jnp.array([[True, True]]))
        np.testing.assert_allclose(drift, (2 * 1.5 - 0.25) / 2)

    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        ids = random_turns(rng, 4, 16, 3)
        logp = -rng.random((4, 16)).astype(np.float32)
        ent = rng.random((4, 16)).astype(np.float32)
        np.testing.assert_allclose(obj.relative_surprisal(logp, ent, ids, num_turns=3),
                                   ref.turn_sum(-logp, ids, 3) - ref.turn_sum(ent, ids, 3), atol=1e-5)
        np.testing.assert_allclose(
            obj.entropy_signal(logp, ent, ids, num_turns=3, signal="surprisal_per_token"),
            ref.turn_mean(-logp, ids, 3), atol=1e-5)

    def test_drift_split_adds_up(self):
        rng = np.random.default_rng(1)
        adv, rel = rng.normal(size=(2, 5, 3)).astype(np.float32)
        valid = rng.random((5, 3)) > 0.3
        d = obj.entropy_drift_by_sign(adv, rel, valid)
        np.testing.assert_allclose(d["drift_pos"] + d["drift_neg"], d["drift"], atol=1e-6)
        np.testing.assert_allclose(d["drift"], obj.entropy_drift(adv, rel, valid), atol=1e-6)
        np.testing.assert_allclose(d["frac_pos"], ((adv > 0) & valid).sum() / valid.sum(), atol=1e-6)
        self.assertEqual(float(obj.entropy_drift(adv, rel, np.zeros_like(valid))), 0.0)


class AlphaTest(chex.TestCase):

    def _random(self, seed, B=12, K=4, G=3):
        rng = np.random.default_rng(seed)
        h = rng.random((B, K)).astype(np.float32) * 2
        groups = rng.integers(0, G, size=B).astype(np.int32)
        valid = rng.random((B, K)) > 0.25
        return h, groups, valid

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        h = jnp.array([[0.0, 1.0], [0.5, 5.0]])
        valid = jnp.array([[True, True], [True, False]])
        fn = functools.partial(obj.aem_coefficients, num_groups=1, lam=1.0)
        a = self.variant(fn)(h, jnp.array([0, 0]), valid)
        w = np.exp(-np.array([0.0, 1.0, 0.5]))
        np.testing.assert_allclose(a, [[w[0] / w.mean(), w[1] / w.mean()], [w[2] / w.mean(), 1.0]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        for seed in range(3):
            h, groups, valid = self._random(seed)
            fn = functools.partial(obj.aem_coefficients, num_groups=3, lam=1.5, min_range=0.3)
            np.testing.assert_allclose(self.variant(fn)(h, groups, valid),
                                       ref.aem_alpha(h, groups, valid, 1.5, 0.3), atol=1e-5)

    def test_properties(self):
        for seed in range(5):
            h, groups, valid = self._random(seed)
            for lam in (0.5, 1.0, 2.0):
                alpha = np.asarray(obj.aem_coefficients(h, groups, valid, num_groups=3, lam=lam, min_range=0.0))
                for g in range(3):
                    sel = valid & (groups[:, None] == g)
                    if sel.any():
                        np.testing.assert_allclose(alpha[sel].mean(), 1.0, atol=1e-5)
                self.assertTrue((alpha[valid] >= np.exp(-lam) - 1e-6).all())
                self.assertTrue((alpha[valid] <= np.exp(lam) + 1e-6).all())
                adv = np.random.default_rng(seed).normal(size=h.shape)
                np.testing.assert_array_equal(np.sign(alpha * adv), np.sign(adv))
                # highest-entropy response of a group gets the smallest weight
                for g in range(3):
                    sel = valid & (groups[:, None] == g)
                    if sel.sum() > 1:
                        self.assertEqual(np.argmin(alpha[sel]), np.argmax(h[sel]))

    def test_range_guard_gives_exactly_one(self):
        h = jnp.array([[1.0, 1.05], [1.02, 3.0]])
        a = obj.aem_coefficients(h, jnp.array([0, 1]), jnp.array([[True, True], [True, False]]),
                                 num_groups=2, min_range=0.1)
        np.testing.assert_array_equal(a, 1.0)

    def test_scopes(self):
        h, groups, valid = self._random(7)
        batch = obj.aem_coefficients(h, groups, valid, num_groups=3, scope="batch", min_range=0.0)
        np.testing.assert_allclose(np.asarray(batch)[valid].mean(), 1.0, atol=1e-5)
        np.testing.assert_allclose(batch, ref.aem_alpha(h, np.zeros_like(groups), valid, 1.0, 0.0), atol=1e-5)
        traj = obj.aem_coefficients(h, groups, valid, num_groups=3, scope="trajectory", min_range=0.0)
        np.testing.assert_allclose(traj, ref.aem_alpha(h, np.arange(len(groups)), valid, 1.0, 0.0), atol=1e-5)

    def test_group_relabelling_and_permutation(self):
        h, groups, valid = self._random(8)
        base = obj.aem_coefficients(h, groups, valid, num_groups=3)
        np.testing.assert_allclose(obj.aem_coefficients(h, (groups + 1) % 3, valid, num_groups=3), base, atol=1e-6)
        perm = np.random.default_rng(0).permutation(len(groups))
        np.testing.assert_allclose(obj.aem_coefficients(h[perm], groups[perm], valid[perm], num_groups=3),
                                   np.asarray(base)[perm], atol=1e-6)

    def test_no_gradient_and_no_nan(self):
        g = jax.grad(lambda h: obj.aem_coefficients(h, jnp.array([0, 0]), jnp.ones((2, 2), bool),
                                                    num_groups=1, min_range=0.0).sum())(jnp.array([[0.0, 1.0], [2.0, 3.0]]))
        np.testing.assert_array_equal(g, 0.0)
        a = obj.aem_coefficients(jnp.zeros((2, 2)), jnp.array([0, 1]), jnp.zeros((2, 2), bool), num_groups=2)
        np.testing.assert_array_equal(a, 1.0)

    def test_empg(self):
        h, _, valid = self._random(9)
        adv = np.random.default_rng(9).normal(size=h.shape).astype(np.float32)
        out = np.asarray(obj.empg_advantages(adv, h, valid, zeta=0.0, recenter=False))
        g = np.asarray(obj.aem_coefficients(h, np.zeros(len(h), np.int32), valid, num_groups=1,
                                            scope="batch", min_range=0.0))
        np.testing.assert_allclose(out[valid], (g * adv)[valid], atol=1e-5)
        centred = np.asarray(obj.empg_advantages(adv, h, valid, zeta=0.1))
        np.testing.assert_allclose(centred[valid].mean(), 0.0, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(scope="episode"), r"scope must be one of \('group', 'batch', 'trajectory'\), got 'episode'"),
    (dict(num_groups=1), "group_ids contains 1, which is not below num_groups=1"),
])
def test_aem_bad_args(kwargs, match):
    args = dict(num_groups=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        obj.aem_coefficients(np.zeros((2, 2), np.float32), np.array([0, 1]), np.ones((2, 2), bool), **args)


def test_entropy_signal_bad_mode():
    with pytest.raises(ValueError, match="signal must be one of"):
        obj.entropy_signal(np.zeros((1, 2)), np.zeros((1, 2)), np.zeros((1, 2), np.int32), num_turns=1, signal="x")


def _entropy64(theta):
    p = np.exp(theta - theta.max())
    p /= p.sum()
    return -(p * np.log(p)).sum()


@pytest.mark.parametrize("seed", range(20))
def test_entropy_drift_predicts_natural_gradient_step(seed):
    """Tabular softmax over n discrete responses, a batch of sampled responses
    with advantages, one small natural-gradient step: the measured entropy
    change matches eta * entropy_drift(A, S - Hresp) to first order.

    For a softmax policy the natural gradient of A * log pi(a) is A * e_a / pi(a)
    (up to a constant shift of the logits, which changes nothing), so
    dH = eta * mean_i A_i (S(a_i) - H).
    """
    rng = np.random.default_rng(seed)
    n, N, eta = int(rng.integers(3, 7)), 8, 1e-3
    theta = jnp.asarray(rng.normal(size=n) * 1.5, jnp.float32)
    probs = np.asarray(jax.nn.softmax(theta), np.float64)
    actions = rng.choice(n, size=N, p=probs / probs.sum())
    adv = rng.normal(size=N).astype(np.float32)
    # responses are single tokens: T = 1 per row, one turn per row
    logits_B1V = jnp.broadcast_to(theta, (N, 1, n))
    logp = obj.token_logprobs(logits_B1V, jnp.asarray(actions[:, None], jnp.int32))
    ent = obj.token_entropy(logits_B1V)
    turn_ids = jnp.zeros((N, 1), jnp.int32)
    rel = obj.relative_surprisal(logp, ent, turn_ids, num_turns=1)
    predicted = eta * float(obj.entropy_drift(adv[:, None], rel, jnp.ones((N, 1), bool)))
    step = np.zeros(n, np.float64)
    for a, A in zip(actions, adv):
        step[a] += A / probs[a] / N
    # float32 entropy differences are noisy at 1e-3 steps: measure in float64
    theta64 = np.asarray(theta, np.float64)
    measured = _entropy64(theta64 + eta * step) - _entropy64(theta64)
    assert np.sign(measured) == np.sign(predicted)
    assert abs(measured - predicted) / abs(predicted) < 0.05, (measured, predicted)
