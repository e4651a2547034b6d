"""ArCHer's clipped actor (``archer_actor_loss(..., old_logp=, clip=)``) against
a float64 numpy loop: value, gradient, the REINFORCE limit at ratio 1, and its
diagnostics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aem_jax import objectives as obj


def _random_case(seed, B=5, T=9, K=3):
    rng = np.random.default_rng(seed)
    turn_ids = rng.integers(-1, K, size=(B, T))
    mask = ((turn_ids >= 0) & (rng.random((B, T)) > 0.15)).astype(np.float32)
    logp = -rng.exponential(1.0, size=(B, T)).astype(np.float32)
    old_logp = (logp + rng.normal(0, 0.4, size=(B, T))).astype(np.float32)
    adv = rng.normal(size=(B, K)).astype(np.float32)
    base = rng.normal(0, 0.3, size=(B, T)).astype(np.float32)
    return logp, old_logp, adv, turn_ids, mask, base


def _numpy_clipped(logp, old_logp, adv, turn_ids, mask, eps, K, base=None):
    """(loss, d loss / d logp, clip_frac, approx_kl), loop by loop in float64."""
    B, T = logp.shape
    total, grad = 0.0, np.zeros((B, T))
    clipped_tokens, kl, tokens = 0, 0.0, 0
    turns = set()
    for b in range(B):
        for t in range(T):
            if mask[b, t] == 0 or turn_ids[b, t] < 0:
                continue
            turns.add((b, turn_ids[b, t]))
            a = float(adv[b, turn_ids[b, t]]) - (0.0 if base is None else float(base[b, t]))
            d = float(logp[b, t]) - float(old_logp[b, t])
            r = np.exp(d)
            unclipped, clipped = r * a, min(max(r, 1 - eps), 1 + eps) * a
            total -= min(unclipped, clipped)
            if clipped < unclipped:
                clipped_tokens += 1          # the clip holds the term constant: no gradient
            else:
                grad[b, t] = -r * a           # d(r a)/d logp = r a
            kl += np.expm1(d) - d
            tokens += 1
    n = len(turns)
    return total / n, grad / n, clipped_tokens / tokens, kl / tokens


@pytest.mark.parametrize("seed, eps, with_baseline", [(0, 0.2, False), (1, 0.1, True), (2, 0.3, False)])
def test_clipped_actor_matches_numpy_value_and_gradient(seed, eps, with_baseline):
    logp, old_logp, adv, turn_ids, mask, base = _random_case(seed)
    base = base if with_baseline else None

    def loss_fn(lp):
        return obj.archer_actor_loss(lp, adv, turn_ids, mask, num_turns=3, old_logp=old_logp, clip=eps,
                                     baseline=base)

    (loss, aux), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(jnp.asarray(logp))
    ref_loss, ref_grad, ref_clip_frac, ref_kl = _numpy_clipped(logp, old_logp, adv, turn_ids, mask, eps, 3, base)
    assert 0.0 < ref_clip_frac < 1.0  # the case exercises both branches
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["clip_frac"], ref_clip_frac, rtol=1e-6)
    np.testing.assert_allclose(aux["approx_kl"], ref_kl, rtol=1e-4)
    np.testing.assert_allclose(aux["loss_sum"] / aux["denominator"], loss, rtol=1e-6)
    # gradients reach neither the behaviour log-probs nor the advantages
    g_old = jax.grad(lambda o: obj.archer_actor_loss(jnp.asarray(logp), adv, turn_ids, mask, num_turns=3,
                                                     old_logp=o, clip=eps)[0])(jnp.asarray(old_logp))
    np.testing.assert_array_equal(g_old, 0.0)


def test_clipped_actor_gradient_is_reinforce_on_fresh_samples():
    """At pi = pi_old (the first step on a batch) every ratio is 1: the
    clipped surrogate's gradient is the paper's REINFORCE gradient."""
    logp, _, adv, turn_ids, mask, _ = _random_case(3)
    reinforce = jax.grad(lambda lp: obj.archer_actor_loss(lp, adv, turn_ids, mask, num_turns=3)[0])(logp)
    clipped, aux = jax.grad(lambda lp: obj.archer_actor_loss(lp, adv, turn_ids, mask, num_turns=3,
                                                             old_logp=logp, clip=0.2), has_aux=True)(logp)
    np.testing.assert_allclose(clipped, reinforce, rtol=1e-6, atol=1e-7)
    assert float(aux["clip_frac"]) == 0.0 and float(aux["approx_kl"]) == 0.0
    np.testing.assert_allclose(aux["ratio_mean"], 1.0)


def test_clipped_actor_finite_differences():
    """Central differences of the loss agree with its gradient away from the clip's kinks."""
    logp, old_logp, adv, turn_ids, mask, _ = _random_case(4, B=2, T=6, K=2)
    f = lambda lp: obj.archer_actor_loss(lp, adv, turn_ids, mask, num_turns=2,  # noqa: E731
                                         old_logp=old_logp, clip=0.2)[0]
    g = np.asarray(jax.grad(f)(jnp.asarray(logp)))
    ratio = np.exp(logp - old_logp)
    h = 1e-3
    for b, t in zip(*np.nonzero(mask)):
        if min(abs(ratio[b, t] - 0.8), abs(ratio[b, t] - 1.2)) < 0.01:
            continue  # a kink of the clip is within reach of the step
        up, down = logp.copy(), logp.copy()
        up[b, t] += h
        down[b, t] -= h
        numeric = (float(f(jnp.asarray(up))) - float(f(jnp.asarray(down)))) / (2 * h)
        np.testing.assert_allclose(g[b, t], numeric, rtol=2e-2, atol=2e-3)


def test_clipped_actor_bad_arguments():
    logp, old_logp, adv, turn_ids, mask, _ = _random_case(5)
    with pytest.raises(ValueError, match="clip must be > 0"):
        obj.archer_actor_loss(logp, adv, turn_ids, mask, num_turns=3, old_logp=old_logp, clip=0.0)
    with pytest.raises(ValueError, match="clip needs old_logp"):
        obj.archer_actor_loss(logp, adv, turn_ids, mask, num_turns=3, clip=0.2)
    with pytest.raises(ValueError):
        obj.archer_actor_loss(logp, adv, turn_ids, mask, num_turns=3, old_logp=old_logp[:, :-1], clip=0.2)
