"""GRPO / Dr.GRPO / RLOO / GiGPO / GAE against float64 references, with invariances."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import objectives as obj
from tests.objectives import reference as ref


class GroupAdvantageTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        scores = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
        groups = jnp.array([0, 0, 0, 0, 1, 1])
        a = self.variant(functools.partial(obj.grpo_advantages, num_groups=2, eps=0.0))(scores, groups)
        std = np.std([1, 0, 0, 1], ddof=1)
        np.testing.assert_allclose(a, [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std, 0, 0], rtol=1e-6)
        loo = self.variant(functools.partial(obj.rloo_advantages, num_groups=2))(scores, groups)
        np.testing.assert_allclose(loo, [1 - 1 / 3, -2 / 3, -2 / 3, 1 - 1 / 3, 0, 0], rtol=1e-6)
        dr = self.variant(functools.partial(obj.grpo_advantages, num_groups=2, normalize_std=False))(scores, groups)
        np.testing.assert_allclose(dr, [0.5, -0.5, -0.5, 0.5, 0, 0], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        scores = rng.normal(size=16).astype(np.float32)
        groups = rng.integers(0, 5, size=16).astype(np.int32)
        valid = rng.random(16) > 0.2
        for kw in (dict(), dict(normalize_std=False), dict(leave_one_out=True)):
            got = self.variant(functools.partial(obj.grpo_advantages, num_groups=6, valid=valid, **kw))(scores, groups)
            np.testing.assert_allclose(got, ref.grpo(scores, groups, valid=valid, **kw), atol=1e-4)

    def test_group_relabelling_and_permutation(self):
        rng = np.random.default_rng(1)
        scores = rng.normal(size=12).astype(np.float32)
        groups = rng.integers(0, 4, size=12).astype(np.int32)
        base = obj.grpo_advantages(scores, groups, num_groups=4)
        relabel = np.array([2, 0, 3, 1])
        np.testing.assert_allclose(obj.grpo_advantages(scores, relabel[groups], num_groups=4), base, atol=1e-6)
        perm = rng.permutation(12)
        np.testing.assert_allclose(obj.grpo_advantages(scores[perm], groups[perm], num_groups=4), base[perm], atol=1e-6)

    def test_singleton_and_constant_groups_are_zero(self):
        a = obj.grpo_advantages(jnp.array([3.0, 1.0, 1.0]), jnp.array([0, 1, 1]), num_groups=2)
        np.testing.assert_array_equal(a, 0.0)


class GiGPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        # Two rollouts of one task. Both start in anchor 7; rollout 0 reaches
        # anchor 8 then wins (reward 1 at turn 1); rollout 1 stays in 7 and loses.
        rewards = jnp.array([[0.0, 1.0], [0.0, 0.0]])
        valid = jnp.ones((2, 2), bool)
        anchors = jnp.array([[7, 8], [7, 7]])
        fn = functools.partial(obj.gigpo_advantages, num_groups=1, gamma=0.5, eps=0.0)
        a = self.variant(fn)(rewards, valid, anchors, jnp.array([0, 0]))
        ep = 1.0 / np.std([1, 0], ddof=1) / 2  # (1 - .5) / std
        # step group {(0,0), (1,0), (1,1)} with returns .5, 0, 0 ; (0,1) alone.
        rets = np.array([0.5, 0.0, 0.0])
        z = (rets - rets.mean()) / rets.std(ddof=1)
        np.testing.assert_allclose(a, [[ep + z[0], ep], [-ep + z[1], -ep + z[2]]], rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rng = np.random.default_rng(3)
        E, K = 8, 5
        rewards = rng.normal(size=(E, K)).astype(np.float32)
        valid = np.arange(K)[None, :] < rng.integers(1, K + 1, size=E)[:, None]
        anchors = rng.integers(0, 3, size=(E, K)).astype(np.int32)
        groups = np.repeat(np.arange(2), 4).astype(np.int32)
        fn = functools.partial(obj.gigpo_advantages, num_groups=2, gamma=0.9, step_weight=0.7)
        got = self.variant(fn)(rewards, valid, anchors, groups)
        np.testing.assert_allclose(got, ref.gigpo(rewards, valid, anchors, groups, 0.9, 0.7), atol=1e-4)

    def test_windowed_equals_concatenated(self):
        rng = np.random.default_rng(4)
        E, K = 6, 3
        rewards = rng.normal(size=(E, K)).astype(np.float32)
        valid = np.ones((E, K), bool)
        anchors = rng.integers(0, 2, size=(E, K)).astype(np.int32)
        groups = np.array([0, 0, 0, 1, 1, 1], np.int32)
        base = obj.gigpo_advantages(rewards, valid, anchors, groups, num_groups=2)
        # windowed rows: one per turn, K=1
        episode_ids = np.repeat(np.arange(E), K).astype(np.int32)
        offset = np.tile(np.arange(K), E).astype(np.int32)
        to_ep = functools.partial(obj.to_episode_layout, num_episodes=E, max_turns=K)
        r_ep = to_ep(rewards.reshape(-1, 1), episode_ids, offset)
        a_ep = to_ep(anchors.reshape(-1, 1), episode_ids, offset)
        v_ep = to_ep(valid.reshape(-1, 1), episode_ids, offset)
        adv = obj.gigpo_advantages(r_ep, v_ep, a_ep, groups, num_groups=2)
        per_row = obj.from_episode_layout(adv, episode_ids, offset, num_turns=1)
        np.testing.assert_allclose(per_row.reshape(E, K), base, atol=1e-6)


class GAETest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        r = jnp.array([[0.0, 0.0, 1.0]])
        v = jnp.array([[0.5, 0.5, 0.5]])
        m = jnp.array([[1, 0, 1]])
        adv, ret = self.variant(functools.partial(obj.gae, gamma=0.9, lam=0.5))(r, v, m)
        d2 = 1.0 - 0.5
        d0 = 0.0 + 0.9 * 0.5 - 0.5
        np.testing.assert_allclose(adv, [[d0 + 0.45 * d2, 0.0, d2]], rtol=1e-6)
        np.testing.assert_allclose(ret, [[d0 + 0.45 * d2 + 0.5, 0.0, d2 + 0.5]], rtol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rng = np.random.default_rng(5)
        B, T = 4, 12
        r, v = rng.normal(size=(2, B, T)).astype(np.float32)
        m = rng.random((B, T)) > 0.3
        d = rng.random((B, T)) > 0.8
        adv, ret = self.variant(functools.partial(obj.gae, gamma=0.95, lam=0.9))(r, v, m, dones=d)
        adv_ref, ret_ref = ref.gae(r, v, m, 0.95, 0.9, d)
        np.testing.assert_allclose(adv, adv_ref, atol=1e-5)
        np.testing.assert_allclose(ret, ret_ref, atol=1e-5)

    def test_bilevel_first_token_equals_turn_advantage(self):
        rng = np.random.default_rng(6)
        values = rng.normal(size=(1, 9)).astype(np.float32)
        turn_ids = np.array([[-1, 0, 0, 0, -1, -1, 1, 1, -1]], np.int32)
        mask = (turn_ids >= 0).astype(np.float32)
        rewards = np.array([[0.3, 1.0]], np.float32)
        valid = np.ones((1, 2), bool)
        adv, _ = obj.bilevel_gae(values, rewards, turn_ids, mask, valid, gamma=0.9, lam=0.8, token_lam=1.0)
        turn_v = values[:, [1, 6]]
        turn_adv, _ = obj.turn_gae(rewards, turn_v, valid, gamma=0.9, lam=0.8)
        np.testing.assert_allclose(adv[0, [1, 6]], turn_adv[0], atol=1e-5)
        # with token_lam = 1 every token of a turn regresses towards the same target
        np.testing.assert_allclose(adv[0, 1:4] + values[0, 1:4], adv[0, 1] + values[0, 1], atol=1e-5)
        np.testing.assert_array_equal(adv[0, [0, 4, 5, 8]], 0.0)

    def test_gradient_flows_to_nothing(self):
        """Advantages are targets: differentiating through values is allowed but
        the estimator itself is linear in rewards."""
        r = jnp.ones((1, 3))
        v = jnp.zeros((1, 3))
        m = jnp.ones((1, 3))
        g = jax.grad(lambda r: obj.gae(r, v, m, gamma=1.0, lam=1.0)[0].sum())(r)
        np.testing.assert_allclose(g, [[1.0, 2.0, 3.0]])


def test_bad_args():
    with pytest.raises(ValueError, match="scores must have rank 1"):
        obj.grpo_advantages(np.zeros((2, 2)), np.zeros(2, np.int32), num_groups=1)
    with pytest.raises(ValueError, match="num_groups must be a positive int"):
        obj.grpo_advantages(np.zeros(2), np.zeros(2, np.int32), num_groups=0)


def test_whiten_matches_numpy_on_masked_entries_and_zeroes_the_rest():
    rng = np.random.default_rng(3)
    x = rng.normal(0.3, 0.01, size=(4, 9))
    mask = rng.random((4, 9)) < 0.6
    out = np.asarray(obj.whiten(jnp.asarray(x, jnp.float32), jnp.asarray(mask)))
    sel = x[mask].astype(np.float64)
    expected = (sel - sel.mean()) / (sel.std() + 1e-8)
    np.testing.assert_allclose(out[mask], expected, rtol=1e-3, atol=1e-3)
    assert np.all(out[~mask] == 0.0)
    # Invariant to shifting and (positive) scaling of the advantages.
    shifted = np.asarray(obj.whiten(jnp.asarray(5.0 * x - 2.0, jnp.float32), jnp.asarray(mask)))
    np.testing.assert_allclose(shifted, out, atol=2e-3)
    with pytest.raises(ValueError):
        obj.whiten(jnp.zeros((2, 3)), jnp.ones((3, 2)))
