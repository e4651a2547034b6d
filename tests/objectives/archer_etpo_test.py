"""ArCHer critic / actor losses and ETPO soft Bellman backups, incl. the
token-vs-response consistency check of ETPO."""
import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import objectives as obj


class ArcherTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_critic_matches_numpy(self):
        rng = np.random.default_rng(0)
        N = 6
        a = {k: rng.normal(size=N).astype(np.float32) for k in
             ("q1", "q2", "v1", "v2", "target_v1_next", "target_v2_next", "target_q1_pi", "target_q2_pi", "rewards")}
        a["dones"] = (rng.random(N) > 0.5).astype(np.float32)
        w = np.array([1, 1, 1, 1, 1, 0], np.float32)
        loss, aux = self.variant(functools.partial(obj.archer_critic_loss, gamma=0.9, weights=w))(**a)
        y1 = a["rewards"] + 0.9 * (1 - a["dones"]) * a["target_v1_next"]
        y2 = a["rewards"] + 0.9 * (1 - a["dones"]) * a["target_v2_next"]
        lq = (((a["q1"] - y1) ** 2 + (a["q2"] - y2) ** 2) * w).sum() / w.sum()
        lv = (((a["v1"] - a["target_q1_pi"]) ** 2 + (a["v2"] - a["target_q2_pi"]) ** 2) * w).sum() / w.sum()
        np.testing.assert_allclose(aux["q_loss"], lq, rtol=1e-5)
        np.testing.assert_allclose(aux["v_loss"], lv, rtol=1e-5)
        np.testing.assert_allclose(loss, lq + lv, rtol=1e-5)

    def test_critic_gradients_only_reach_online_critics(self):
        args = [jnp.full((2,), float(i)) for i in range(10)]
        grads = jax.grad(lambda *xs: obj.archer_critic_loss(*xs)[0], argnums=tuple(range(10)))(*args)
        for g in grads[4:8]:  # target networks
            np.testing.assert_array_equal(g, 0.0)
        self.assertTrue(all(np.abs(g).sum() > 0 for g in grads[:4]))

    @chex.variants(with_jit=True, without_jit=True)
    def test_actor_loss(self):
        logp = jnp.array([[-1.0, -2.0, 0.0, -0.5], [-3.0, 0.0, 0.0, 0.0]])
        turn_ids = jnp.array([[0, 0, -1, 1], [0, -1, -1, -1]])
        mask = (turn_ids >= 0).astype(jnp.float32)
        adv = jnp.array([[2.0, -1.0], [0.5, 9.0]])
        loss, aux = self.variant(functools.partial(obj.archer_actor_loss, num_turns=2))(logp, adv, turn_ids, mask)
        expected = -(2.0 * -3.0 + -1.0 * -0.5 + 0.5 * -3.0) / 3
        np.testing.assert_allclose(loss, expected, rtol=1e-6)
        g = jax.grad(lambda lp: obj.archer_actor_loss(lp, adv, turn_ids, mask, num_turns=2)[0])(logp)
        np.testing.assert_allclose(g, -np.array([[2.0, 2.0, 0, -1.0], [0.5, 0, 0, 0]]) / 3, rtol=1e-6)
        base = jnp.full(logp.shape, 0.5)
        lb, _ = obj.archer_actor_loss(logp, adv, turn_ids, mask, num_turns=2, baseline=base)
        np.testing.assert_allclose(lb, -(1.5 * -3.0 + -1.5 * -0.5 + 0.0 * -3.0) / 3, rtol=1e-6)
        np.testing.assert_allclose(obj.archer_advantages(1.0, 2.0, 0.5, 0.25), 0.75)


class ETPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_soft_values_and_q_loss(self):
        rng = np.random.default_rng(1)
        q = rng.normal(size=(2, 3, 4)).astype(np.float32)
        logits, ref_logits = rng.normal(size=(2, 2, 3, 4)).astype(np.float32)
        v = self.variant(functools.partial(obj.etpo_soft_values, beta=0.3))(q, logits, ref_logits)
        pi = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        rho = np.exp(ref_logits) / np.exp(ref_logits).sum(-1, keepdims=True)
        expected = (pi * q).sum(-1) - 0.3 * (pi * np.log(pi / rho)).sum(-1)
        np.testing.assert_allclose(v, expected, rtol=1e-5, atol=1e-6)
        err = np.array([[0.5, -20.0, 3.0]], np.float32)
        loss, _ = self.variant(functools.partial(obj.etpo_q_loss, delta=10.0))(err, np.zeros_like(err), np.ones_like(err))
        np.testing.assert_allclose(loss, (0.125 + 10 * (20 - 5) + 4.5) / 3, rtol=1e-6)

    def test_token_targets_hand_computed(self):
        vsoft = jnp.array([[9.0, 1.0, 2.0, 9.0, 3.0, 4.0]])
        turn_ids = jnp.array([[-1, 0, 0, -1, 1, 1]])
        mask = (turn_ids >= 0).astype(jnp.float32)
        rewards = jnp.array([[0.5, 1.0]])
        valid = jnp.ones((1, 2), bool)
        dones = jnp.array([[0.0, 1.0]])
        y = obj.etpo_token_targets(vsoft, turn_ids, mask, rewards, valid, dones, gamma=0.9)
        np.testing.assert_allclose(y, [[0.0, 2.0, 0.5 + 0.9 * 3.0, 0.0, 4.0, 1.0]], rtol=1e-6)
        y2 = obj.etpo_token_targets(vsoft, turn_ids, mask, rewards, valid, dones, gamma=0.9,
                                    next_turn_value=jnp.array([[10.0, 10.0]]))
        np.testing.assert_allclose(y2[0, 2], 0.5 + 9.0, rtol=1e-6)

    def test_policy_loss_minimiser_is_soft_optimal(self):
        rng = np.random.default_rng(2)
        q = jnp.asarray(rng.normal(size=(1, 2, 5)), jnp.float32)
        ref_logits = jnp.asarray(rng.normal(size=(1, 2, 5)), jnp.float32)
        beta = 0.5
        mask = jnp.ones((1, 2))
        optimal = ref_logits + q / beta
        g = jax.grad(lambda l: obj.etpo_policy_loss(l, ref_logits, q, mask, beta=beta)[0])(optimal)
        np.testing.assert_allclose(g, 0.0, atol=1e-6)
        worse = obj.etpo_policy_loss(optimal + jnp.asarray(rng.normal(size=(1, 2, 5)), jnp.float32),
                                     ref_logits, q, mask, beta=beta)[0]
        self.assertGreater(float(worse), float(obj.etpo_policy_loss(optimal, ref_logits, q, mask, beta=beta)[0]))


def test_etpo_token_backups_reproduce_response_soft_value():
    """Vocabulary {0, 1, EOS=2}, responses of up to 3 tokens. With pi* at every
    context, per-token soft backups give at the root exactly the response-level
    soft value beta * log sum_a rho(a) exp(R(a) / beta)."""
    rng = np.random.default_rng(3)
    V, EOS, L, beta = 3, 2, 3, 0.5
    contexts = [c for n in range(L) for c in itertools.product((0, 1), repeat=n)]
    ref_logits = {c: rng.normal(size=V).astype(np.float32) for c in contexts}
    is_leaf = lambda c, w: w == EOS or len(c) + 1 == L  # noqa: E731
    reward = {}
    for c in contexts:
        for w in range(V):
            if is_leaf(c, w):
                reward[c + (w,)] = float(rng.normal())
    # token-level backups, deepest contexts first
    vsoft, q = {}, {}
    for c in sorted(contexts, key=len, reverse=True):
        q[c] = np.array([reward[c + (w,)] if is_leaf(c, w) else vsoft[c + (w,)] for w in range(V)], np.float32)
        pi_star = ref_logits[c] + q[c] / beta
        vsoft[c] = float(obj.etpo_soft_values(q[c][None, None], pi_star[None, None],
                                              ref_logits[c][None, None], beta=beta)[0, 0])
    # response level: enumerate every complete response
    log_terms = []
    for resp, R in reward.items():
        logrho = sum(float(jax.nn.log_softmax(ref_logits[resp[:i]])[resp[i]]) for i in range(len(resp)))
        log_terms.append(logrho + R / beta)
    response_value = beta * float(jax.nn.logsumexp(jnp.array(log_terms)))
    np.testing.assert_allclose(vsoft[()], response_value, rtol=1e-5)
    # etpo_token_targets on every full-length response yields the same backups
    full = [r for r in reward if len(r) == L]
    vs = np.array([[vsoft[r[:i]] for i in range(L)] for r in full], np.float32)
    turn_ids = np.zeros((len(full), L), np.int32)
    rewards = np.array([[reward[r]] for r in full], np.float32)
    y = obj.etpo_token_targets(vs, turn_ids, np.ones_like(vs), rewards, np.ones((len(full), 1), bool),
                               np.ones((len(full), 1), np.float32), gamma=1.0)
    expected = np.array([[q[r[:i]][r[i]] for i in range(L)] for r in full])
    np.testing.assert_allclose(y, expected, rtol=1e-5)


def test_etpo_bad_args():
    with pytest.raises(ValueError, match="q must have rank 3"):
        obj.etpo_soft_values(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="agg must be one of"):
        obj.etpo_q_loss(np.zeros((1, 2)), np.zeros((1, 2)), np.ones((1, 2)), agg="median")
