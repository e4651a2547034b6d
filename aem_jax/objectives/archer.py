"""ArCHer (2402.19446): utterance-level off-policy critic, token-level actor.

Critic, on replayed transitions (s, a, r, s', done) of whole utterances with
double critics Q_k, V_k (k = 1, 2) and Polyak-averaged targets Qbar_k, Vbar_k:

  L_Q = sum_k mean (Q_k(s,a) - r - gamma (1 - d) Vbar_k(s'))^2
  L_V = sum_k mean (V_k(s) - Qbar_k(s, a~pi(.|s)))^2      (fresh actor sample)

Actor (token-level policy gradient on utterance advantages):

  A(s,a)  = min(Q_1, Q_2)(s,a) - min(V_1, V_2)(s)
  L_actor = -mean_b A_b * sum_{i in a_b} logp_i                    (REINFORCE, the paper's)

with an optional token-level baseline b_i regressed on A from each prefix, in
which case token i's weight is (A_b - b_i). With ``clip`` = eps the actor
takes PPO's clipped surrogate (1707.06347) against the behaviour policy that
sampled the batch, per token, r_i = pi(a_i|s_i) / pi_old(a_i|s_i):

  L_actor = -mean_b sum_{i in a_b} min(r_i A_b, clip(r_i, 1 - eps, 1 + eps) A_b)

Its gradient at r = 1 is REINFORCE's, so one step on fresh samples is the
paper's update; further steps on the same batch stop moving a token once its
ratio leaves [1 - eps, 1 + eps] in the advantage's direction (a trust region).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks, segments


def _masked_mean(x, w):
    return jnp.sum(x * w) / jnp.maximum(jnp.sum(w), 1.0)


def archer_critic_loss(
    q1, q2, v1, v2, target_v1_next, target_v2_next, target_q1_pi, target_q2_pi, rewards, dones,
    *, gamma: float = 0.95, weights=None,
):
    """ArCHer double-critic TD losses ``L_Q + L_V`` over N utterances.

    Args:
      q1, q2: [N] Q_k(s, a) of the replayed actions (differentiated).
      v1, v2: [N] V_k(s) (differentiated).
      target_v1_next, target_v2_next: [N] Vbar_k(s') of the target critics.
      target_q1_pi, target_q2_pi: [N] Qbar_k(s, a') for fresh actor samples a'.
      rewards: [N] utterance rewards; dones: [N] 1 if s' is terminal.
      gamma: discount between utterances.
      weights: optional [N] 0/1 validity (padding rows contribute nothing).

    Returns:
      (loss, aux) with q_loss, v_loss, loss_sum, denominator, q_mean, v_mean.
    """
    arrays = dict(q1=q1, q2=q2, v1=v1, v2=v2, target_v1_next=target_v1_next,
                  target_v2_next=target_v2_next, target_q1_pi=target_q1_pi,
                  target_q2_pi=target_q2_pi, rewards=rewards, dones=dones)
    for name, x in arrays.items():
        _checks.check_rank(name, x, 1)
    _checks.check_same_shape(**arrays)
    w = jnp.ones(q1.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
    sg = jax.lax.stop_gradient
    not_done = 1.0 - dones.astype(jnp.float32)
    r = rewards.astype(jnp.float32)
    y1 = sg(r + gamma * not_done * target_v1_next)
    y2 = sg(r + gamma * not_done * target_v2_next)
    q_sq = (q1 - y1) ** 2 + (q2 - y2) ** 2
    v_sq = (v1 - sg(target_q1_pi)) ** 2 + (v2 - sg(target_q2_pi)) ** 2
    q_loss = _masked_mean(q_sq, w)
    v_loss = _masked_mean(v_sq, w)
    denom = jnp.sum(w)
    aux = {
        "q_loss": q_loss, "v_loss": v_loss, "loss_sum": jnp.sum((q_sq + v_sq) * w),
        "denominator": denom, "q_mean": _masked_mean(0.5 * (q1 + q2), w),
        "v_mean": _masked_mean(0.5 * (v1 + v2), w),
    }
    return q_loss + v_loss, aux


def archer_advantages(q1, q2, v1, v2):
    """``A = min(Q_1, Q_2) - min(V_1, V_2)``, no gradient."""
    return jax.lax.stop_gradient(jnp.minimum(q1, q2) - jnp.minimum(v1, v2))


def archer_actor_loss(logp, advantages_BK, turn_ids, mask, *, num_turns: int, baseline=None, denominator=None,
                      old_logp=None, clip: float | None = None):
    """Token-level actor loss on utterance advantages: REINFORCE, or PPO-clipped.

      L = -sum_{b,k valid} A_bk * sum_{i in turn k} logp_i / #valid turns
      with baseline: L = -sum_i (A_{b,k(i)} - sg b_i) logp_i / #valid turns
      with clip = eps, r_i = exp(logp_i - old_logp_i), A_i = A_{b,k(i)} (- sg b_i):
          L = -sum_i min(r_i A_i, clip(r_i, 1 - eps, 1 + eps) A_i) / #valid turns

    Args:
      logp: [B,T] current-policy log-probs (differentiated).
      advantages_BK: [B,K] utterance advantages (no gradient).
      turn_ids: [B,T] turn index of agent tokens, -1 elsewhere.
      mask: [B,T] 1 on agent tokens.
      num_turns: K.
      baseline: optional [B,T] token-level baseline (no gradient here; train it
        with ``archer_baseline_loss``).
      denominator: overrides the number of valid turns (micro-batching).
      old_logp: [B,T] behaviour-policy log-probs of the same tokens (no
        gradient); needed with ``clip``.
      clip: eps > 0 of the clipped surrogate, or None for REINFORCE.

    Returns:
      (loss, aux) with loss_sum, denominator, advantage_mean; with ``clip``
      also clip_frac (share of agent tokens whose gradient the clip removed),
      ratio_mean and approx_kl (k3 estimate of KL(pi_old || pi) on the batch).
    """
    _checks.check_same_shape(logp=logp, turn_ids=turn_ids, mask=mask)
    if clip is not None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0 (or None for REINFORCE), got {clip!r}")
        if old_logp is None:
            raise ValueError("clip needs old_logp, the behaviour policy's log-probs of the batch's tokens")
        _checks.check_same_shape(logp=logp, old_logp=old_logp)
    m = mask.astype(jnp.float32)
    ids = jnp.where(m > 0, turn_ids, -1)
    adv_BT = segments.turn_broadcast(jax.lax.stop_gradient(advantages_BK.astype(jnp.float32)), ids)
    if baseline is not None:
        adv_BT = adv_BT - jax.lax.stop_gradient(baseline.astype(jnp.float32))
    aux = {}
    if clip is None:
        total = -jnp.sum(adv_BT * logp.astype(jnp.float32) * m)
    else:
        log_ratio = jnp.where(m > 0, logp.astype(jnp.float32)
                              - jax.lax.stop_gradient(old_logp.astype(jnp.float32)), 0.0)
        ratio = jnp.exp(log_ratio)
        unclipped = ratio * adv_BT
        clipped = jnp.clip(ratio, 1.0 - clip, 1.0 + clip) * adv_BT
        total = -jnp.sum(jnp.minimum(unclipped, clipped) * m)
        n = jnp.maximum(jnp.sum(m), 1.0)
        aux = {"clip_frac": jnp.sum((clipped < unclipped) * m) / n, "ratio_mean": jnp.sum(ratio * m) / n,
               "approx_kl": jnp.sum((jnp.expm1(log_ratio) - log_ratio) * m) / n}
    valid_BK = segments.turn_count(ids, num_turns=num_turns) > 0
    denom = jnp.sum(valid_BK.astype(jnp.float32)) if denominator is None else denominator
    loss = jnp.where(denom > 0, total / jnp.maximum(denom, 1e-8), 0.0)
    adv_mean = jnp.sum(advantages_BK * valid_BK) / jnp.maximum(jnp.sum(valid_BK), 1)
    return loss, {"loss_sum": total, "denominator": denom, "advantage_mean": adv_mean, **aux}


def archer_baseline_loss(baseline, advantages_BK, turn_ids, mask):
    """Squared error of a token-level baseline regressing A from each prefix."""
    m = mask.astype(jnp.float32)
    ids = jnp.where(m > 0, turn_ids, -1)
    target = jax.lax.stop_gradient(segments.turn_broadcast(advantages_BK.astype(jnp.float32), ids))
    return _masked_mean((baseline - target) ** 2, m)
