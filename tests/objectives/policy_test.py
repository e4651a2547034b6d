"""PPO-clip / DAPO / GSPO losses, aggregation, KL estimators, entropy bonus."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from aem_jax import objectives as obj
from tests.objectives import reference as ref

AGGS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _batch(seed, B=4, T=7):
    rng = np.random.default_rng(seed)
    old = -rng.random((B, T)).astype(np.float32) * 2
    logp = (old + rng.normal(size=(B, T)) * 0.3).astype(np.float32)
    adv = rng.normal(size=(B, T)).astype(np.float32)
    mask = (rng.random((B, T)) > 0.3).astype(np.float32)
    mask[-1] = 0.0  # an all-masked row contributes nothing
    return logp, old, adv, mask


class PPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_hand_computed(self):
        # ratio 1.5 with A = 1 is clipped at 1.2; ratio 0.5 with A = -1 is clipped at 0.8.
        logp = jnp.log(jnp.array([[1.5, 0.5, 1.0]]))
        old = jnp.zeros((1, 3))
        adv = jnp.array([[1.0, -1.0, 2.0]])
        mask = jnp.array([[1.0, 1.0, 0.0]])
        loss, aux = self.variant(functools.partial(obj.ppo_policy_loss, clip_low=0.2, clip_high=0.2))(
            logp, old, adv, mask)
        np.testing.assert_allclose(loss, (-1.2 + 0.8) / 2, rtol=1e-6)
        np.testing.assert_allclose(aux["clip_frac"], 1.0)
        np.testing.assert_allclose(aux["denominator"], 2.0)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.product(agg=AGGS, clip_high=(0.2, 0.28), dual_clip=(None, 3.0))
    def test_matches_reference(self, agg, clip_high, dual_clip):
        logp, old, adv, mask = _batch(0)
        adv = adv * 3  # reach the dual-clip region
        logp = old + np.log(np.random.default_rng(1).uniform(0.1, 6.0, size=old.shape)).astype(np.float32)
        fn = functools.partial(obj.ppo_policy_loss, clip_low=0.2, clip_high=clip_high, dual_clip=dual_clip, agg=agg)
        loss, aux = self.variant(fn)(logp, old, adv, mask)
        per_token = ref.ppo_token_loss(logp, old, adv, 0.2, clip_high, dual_clip)
        np.testing.assert_allclose(loss, ref.aggregate(per_token, mask, agg), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(aux["loss_sum"] / aux["denominator"], loss, rtol=1e-5)

    def test_gradient_matches_policy_gradient_inside_clip(self):
        """Inside the trust region, d loss / d logp = -r * A / N (token-mean)."""
        logp, _, adv, mask = _batch(2)
        old = logp - 0.01
        g = jax.grad(lambda lp: obj.ppo_policy_loss(lp, old, adv, mask)[0])(logp)
        expected = -np.exp(0.01) * adv * mask / mask.sum()
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-7)

    @parameterized.parameters(*AGGS)
    def test_microbatch_accumulation_is_exact(self, agg):
        logp, old, adv, mask = _batch(3, B=6)
        full, aux = obj.ppo_policy_loss(logp, old, adv, mask, agg=agg)
        denom = obj.loss_denominator(mask, agg=agg)
        parts = [obj.ppo_policy_loss(logp[s], old[s], adv[s], mask[s], agg=agg, denominator=denom)[0]
                 for s in (slice(0, 2), slice(2, 5), slice(5, 6))]
        np.testing.assert_allclose(sum(parts), full, rtol=1e-5)
        g_full = jax.grad(lambda lp: obj.ppo_policy_loss(lp, old, adv, mask, agg=agg)[0])(logp)
        g_parts = np.concatenate([
            jax.grad(lambda lp, s=s: obj.ppo_policy_loss(lp, old[s], adv[s], mask[s], agg=agg, denominator=denom)[0])(logp[s])
            for s in (slice(0, 2), slice(2, 5), slice(5, 6))])
        np.testing.assert_allclose(g_parts, g_full, rtol=1e-5, atol=1e-8)

    def test_empty_mask_gives_zero(self):
        logp, old, adv, _ = _batch(4)
        for agg in AGGS:
            loss, aux = obj.ppo_policy_loss(logp, old, adv, np.zeros_like(logp), agg=agg)
            self.assertEqual(float(loss), 0.0)
            self.assertTrue(all(np.isfinite(np.asarray(v)).all() for v in aux.values()))

    def test_batch_permutation_invariance(self):
        logp, old, adv, mask = _batch(5)
        perm = np.array([2, 0, 3, 1])
        for agg in AGGS:
            a = obj.ppo_policy_loss(logp, old, adv, mask, agg=agg)[0]
            b = obj.ppo_policy_loss(logp[perm], old[perm], adv[perm], mask[perm], agg=agg)[0]
            np.testing.assert_allclose(a, b, rtol=1e-6)


class GSPOTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_reference(self):
        rng = np.random.default_rng(6)
        B, T = 3, 8
        turn_ids = np.array([[0, 0, 0, -1, 1, 1, -1, -1], [-1, 0, 0, 0, 0, -1, -1, -1], [-1] * 8], np.int32)
        mask = (turn_ids >= 0).astype(np.float32)
        old = -rng.random((B, T)).astype(np.float32)
        logp = (old + rng.normal(size=(B, T)) * 0.01).astype(np.float32)
        adv_k = rng.normal(size=(B, 2)).astype(np.float32)
        adv = np.where(turn_ids >= 0, np.take_along_axis(adv_k, np.maximum(turn_ids, 0), 1), 0.0).astype(np.float32)
        fn = functools.partial(obj.gspo_policy_loss, num_turns=2, clip_low=3e-3, clip_high=4e-3)
        loss, aux = self.variant(fn)(logp, old, adv, mask, turn_ids)
        losses = []
        for b in range(B):
            for k in range(2):
                sel = turn_ids[b] == k
                if not sel.any():
                    continue
                s = np.exp(np.mean(logp[b, sel].astype(np.float64) - old[b, sel]))
                A = adv_k[b, k]
                losses.append(max(-s * A, -np.clip(s, 1 - 3e-3, 1 + 4e-3) * A))
        np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-4)
        self.assertEqual(float(aux["denominator"]), len(losses))

    def test_gradient_is_length_normalised(self):
        """Unclipped: d l_k / d logp_t = -s_k A_k / |y_k| / #responses."""
        turn_ids = np.array([[0, 0, 0, 0, -1, 1, 1]], np.int32)
        mask = (turn_ids >= 0).astype(np.float32)
        old = np.zeros((1, 7), np.float32)
        adv = np.where(turn_ids == 0, 1.0, -2.0).astype(np.float32) * mask
        g = jax.grad(lambda lp: obj.gspo_policy_loss(lp, old, adv, mask, turn_ids, num_turns=2)[0])(old)
        np.testing.assert_allclose(g, [[-1 / 4 / 2] * 4 + [0.0] + [2 / 2 / 2] * 2], rtol=1e-5)


class KLTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_estimators(self):
        logp = jnp.log(jnp.array([[0.5, 0.2]]))
        ref_logp = jnp.log(jnp.array([[0.25, 0.4]]))
        d = np.log([[2.0, 0.5]])
        np.testing.assert_allclose(self.variant(functools.partial(obj.kl_penalty, kind="k1"))(logp, ref_logp), d, rtol=1e-6)
        np.testing.assert_allclose(self.variant(functools.partial(obj.kl_penalty, kind="k2"))(logp, ref_logp), 0.5 * d**2, rtol=1e-5)
        np.testing.assert_allclose(self.variant(functools.partial(obj.kl_penalty, kind="k3"))(logp, ref_logp),
                                   np.exp(-d) + d - 1, rtol=1e-5)

    def test_k3_is_unbiased_on_samples(self):
        rng = np.random.default_rng(7)
        p = np.array([0.6, 0.3, 0.1])
        q = np.array([0.2, 0.5, 0.3])
        x = rng.choice(3, size=200_000, p=p)
        est = obj.kl_penalty(jnp.log(p[x])[None], jnp.log(q[x])[None], kind="k3").mean()
        np.testing.assert_allclose(est, np.sum(p * np.log(p / q)), rtol=2e-2)

    def test_bad_kind(self):
        with pytest.raises(ValueError, match=r"kind must be one of \('k1', 'k2', 'k3', 'low_var_kl'\), got 'k4'"):
            obj.kl_penalty(np.zeros((1, 1)), np.zeros((1, 1)), kind="k4")


def test_entropy_bonus():
    ent = jnp.array([[1.0, 3.0]])
    loss, aux = obj.entropy_bonus(ent, jnp.array([[1.0, 1.0]]), coef=0.1)
    np.testing.assert_allclose(loss, -0.2)
    np.testing.assert_allclose(aux["entropy"], 2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(agg="sum"), "agg must be one of"),
    (dict(dual_clip=0.5), "dual_clip must be > 1 or None, got 0.5"),
    (dict(clip_low=-0.1), "clip_low and clip_high must be >= 0"),
])
def test_ppo_bad_args(kwargs, match):
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=match):
        obj.ppo_policy_loss(z, z, z, z, **kwargs)


def test_ppo_shape_mismatch():
    with pytest.raises(ValueError, match=r"logp\(2, 3\).*old_logp\(2, 4\)"):
        obj.ppo_policy_loss(np.zeros((2, 3)), np.zeros((2, 4)), np.zeros((2, 3)), np.zeros((2, 3)))


def test_approx_kl_is_k3_of_kl_old_to_new():
    """approx_kl = mean over tokens of (r - 1) - log r, r = pi_new / pi_old (KL(old || new), k3)."""
    rng = np.random.default_rng(0)
    old = np.log(rng.uniform(0.05, 1.0, (3, 7)))
    new = old + rng.normal(0.0, 0.3, (3, 7))
    mask = (rng.uniform(size=(3, 7)) > 0.3).astype(np.float32)
    _, aux = obj.ppo_policy_loss(jnp.asarray(new, jnp.float32), jnp.asarray(old, jnp.float32),
                                 jnp.ones((3, 7)), jnp.asarray(mask), clip_low=0.2, clip_high=0.2)
    r = np.exp(new - old)
    expected = ((r - 1.0 - np.log(r)) * mask).sum() / mask.sum()
    np.testing.assert_allclose(float(aux["approx_kl"]), expected, rtol=1e-5)


def test_approx_kl_estimates_kl_old_to_new_on_old_samples():
    """On samples from pi_old the estimate's mean converges to KL(old || new), not KL(new || old)."""
    p_old = np.array([0.9, 0.05, 0.05])
    p_new = np.array([0.4, 0.3, 0.3])
    samples = np.random.default_rng(1).choice(3, size=(1, 200_000), p=p_old)
    _, aux = obj.ppo_policy_loss(jnp.asarray(np.log(p_new)[samples], jnp.float32),
                                 jnp.asarray(np.log(p_old)[samples], jnp.float32),
                                 jnp.ones(samples.shape), jnp.ones(samples.shape), clip_low=0.2, clip_high=0.2)
    kl_old_new = float(np.sum(p_old * np.log(p_old / p_new)))
    kl_new_old = float(np.sum(p_new * np.log(p_new / p_old)))
    assert abs(float(aux["approx_kl"]) - kl_old_new) < 0.01
    assert abs(kl_old_new - kl_new_old) > 0.05  # the two directions are told apart
