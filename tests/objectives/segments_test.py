"""Per-turn reductions, group statistics and layout conversion."""
import functools

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import objectives as obj
from tests.objectives import reference as ref


def random_turns(rng, B, T, K):
    """Contiguous agent spans per row separated by environment tokens (-1)."""
    turn_ids = -np.ones((B, T), np.int32)
    for b in range(B):
        t = rng.integers(0, 3)
        for k in range(rng.integers(0, K + 1)):
            n = rng.integers(1, 4)
            if t + n > T:
                break
            turn_ids[b, t:t + n] = k
            t += n + rng.integers(1, 3)
    return turn_ids


class TurnReductionTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        x = jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])
        ids = jnp.array([[-1, 0, 0, -1, 1]])
        s = self.variant(functools.partial(obj.turn_sum, num_turns=3))(x, ids)
        m = self.variant(functools.partial(obj.turn_mean, num_turns=3))(x, ids)
        np.testing.assert_allclose(s, [[5.0, 5.0, 0.0]])
        np.testing.assert_allclose(m, [[2.5, 5.0, 0.0]])
        b = self.variant(obj.turn_broadcast)(jnp.array([[10.0, 20.0, 30.0]]), ids)
        np.testing.assert_allclose(b, [[0.0, 10.0, 10.0, 0.0, 20.0]])

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rng = np.random.default_rng(0)
        B, T, K = 5, 20, 4
        ids = random_turns(rng, B, T, K)
        x = rng.normal(size=(B, T)).astype(np.float32)
        np.testing.assert_allclose(self.variant(functools.partial(obj.turn_sum, num_turns=K))(x, ids),
                                   ref.turn_sum(x, ids, K), atol=1e-5)
        np.testing.assert_allclose(self.variant(functools.partial(obj.turn_mean, num_turns=K))(x, ids),
                                   ref.turn_mean(x, ids, K), atol=1e-5)

    def test_batch_permutation_invariance(self):
        rng = np.random.default_rng(1)
        ids = random_turns(rng, 6, 15, 3)
        x = rng.normal(size=(6, 15)).astype(np.float32)
        perm = rng.permutation(6)
        np.testing.assert_allclose(obj.turn_sum(x, ids, num_turns=3)[perm],
                                   obj.turn_sum(x[perm], ids[perm], num_turns=3), atol=1e-6)


class GroupStatsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_numpy(self):
        rng = np.random.default_rng(2)
        x = rng.normal(size=12).astype(np.float32)
        g = rng.integers(0, 4, size=12).astype(np.int32)
        valid = rng.random(12) > 0.2
        mean, count = self.variant(functools.partial(obj.group_mean, num_groups=5))(x, g, valid)
        std = self.variant(functools.partial(obj.group_std, num_groups=5))(x, g, valid)
        lo, hi = self.variant(functools.partial(obj.group_min_max, num_groups=5))(x, g, valid)
        for i in range(12):
            members = x[(g == g[i]) & valid]
            self.assertEqual(count[i], len(members))
            if len(members):
                np.testing.assert_allclose(mean[i], members.mean(), atol=1e-6)
                np.testing.assert_allclose(lo[i], members.min())
                np.testing.assert_allclose(hi[i], members.max())
            if len(members) > 1:
                np.testing.assert_allclose(std[i], members.std(ddof=1), atol=1e-5)

    def test_empty_groups_give_zero_not_nan(self):
        x = jnp.array([1.0, 2.0])
        valid = jnp.array([False, False])
        mean, _ = obj.group_mean(x, jnp.array([0, 0]), valid, num_groups=2)
        lo, hi = obj.group_min_max(x, jnp.array([0, 0]), valid, num_groups=2)
        std = obj.group_std(x, jnp.array([0, 0]), valid, num_groups=2)
        for a in (mean, lo, hi, std):
            np.testing.assert_array_equal(a, 0.0)


def test_episode_layout_round_trip():
    """A windowed batch (one row per turn) scatters to the concatenated layout and back."""
    x_EK = np.arange(12, dtype=np.float32).reshape(3, 4)
    # windowed: rows are (episode, turn) pairs in shuffled order
    rows = [(e, k) for e in range(3) for k in range(4)]
    np.random.default_rng(0).shuffle(rows)
    episode_ids = np.array([e for e, _ in rows], np.int32)
    turn_offset = np.array([k for _, k in rows], np.int32)
    x_B1 = np.array([[x_EK[e, k]] for e, k in rows], np.float32)
    got = obj.to_episode_layout(x_B1, episode_ids, turn_offset, num_episodes=3, max_turns=4)
    np.testing.assert_array_equal(got, x_EK)
    back = obj.from_episode_layout(got, episode_ids, turn_offset, num_turns=1)
    np.testing.assert_array_equal(back, x_B1)


@pytest.mark.parametrize("fn, kwargs, match", [
    (obj.turn_sum, dict(num_turns=2), r"turn_ids contains 3, which is not below num_turns=2"),
    (obj.turn_sum, dict(num_turns=0), "num_turns must be a positive int, got 0"),
])
def test_bad_turn_args(fn, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(np.ones((1, 3), np.float32), np.array([[0, 3, -1]], np.int32), **kwargs)


def test_bad_group_ids():
    with pytest.raises(ValueError, match="group_ids contains 7, which is not below num_groups=3"):
        obj.group_mean(np.ones(2, np.float32), np.array([0, 7]), np.ones(2, bool), num_groups=3)
    with pytest.raises(ValueError, match="group_ids contains -2"):
        obj.group_mean(np.ones(2, np.float32), np.array([0, -2]), np.ones(2, bool), num_groups=3)
