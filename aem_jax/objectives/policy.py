"""Policy-gradient losses: PPO-clip (DAPO variants), GSPO, KL penalties, entropy bonus.

Every loss returns ``(loss, aux)`` where ``aux["loss_sum"]`` and
``aux["denominator"]`` satisfy ``loss = loss_sum / denominator``. For exact
gradient accumulation over micro-batches, compute the denominator of the full
batch once (``loss_denominator``) and pass it as ``denominator=`` to every
micro-batch's loss; the micro-batch losses then add up to the full-batch loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks, segments

AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_KINDS = ("k1", "k2", "k3", "low_var_kl")


def loss_denominator(mask, *, agg: str = "token-mean", norm_length: int | None = None):
    """Denominator of an aggregated loss over ``mask`` [B,T].

      token-mean               sum of mask (number of loss tokens)
      seq-mean-token-sum       number of rows with any loss token
      seq-mean-token-mean      number of rows with any loss token
      seq-mean-token-sum-norm  number of rows * norm_length (default T),
                               Dr.GRPO's constant normaliser (2503.20783)
    """
    _checks.check_rank("mask", mask, 2)
    _checks.check_choice("agg", agg, AGGREGATIONS)
    m = mask.astype(jnp.float32)
    if agg == "token-mean":
        return jnp.sum(m)
    rows = jnp.sum((jnp.sum(m, axis=1) > 0).astype(jnp.float32))
    if agg == "seq-mean-token-sum-norm":
        return rows * float(mask.shape[1] if norm_length is None else norm_length)
    return rows


def aggregate(values, mask, *, agg: str = "token-mean", denominator=None, norm_length: int | None = None):
    """Aggregates per-token ``values`` [B,T] over ``mask``; returns (loss, sum, denominator).

    ``seq-mean-token-mean`` first averages each row over its tokens; the other
    modes sum tokens. Empty masks give loss 0, never NaN.
    """
    _checks.check_same_shape(values=values, mask=mask)
    _checks.check_choice("agg", agg, AGGREGATIONS)
    m = mask.astype(jnp.float32)
    v = jnp.where(m > 0, values.astype(jnp.float32), 0.0) * m
    if agg == "seq-mean-token-mean":
        per_row = jnp.sum(v, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
        total = jnp.sum(per_row)
    else:
        total = jnp.sum(v)
    if denominator is None:
        denominator = loss_denominator(mask, agg=agg, norm_length=norm_length)
    loss = total / jnp.maximum(denominator, 1e-8)
    return jnp.where(denominator > 0, loss, 0.0), total, denominator


def ppo_policy_loss(
    logp, old_logp, advantages_BT, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
    dual_clip: float | None = None, agg: str = "token-mean", denominator=None,
    norm_length: int | None = None,
):
    """PPO-clip policy loss (1707.06347) with asymmetric (DAPO) and dual clip.

    Per token, with r = exp(logp - old_logp):

      l = -min(r A, clip(r, 1 - clip_low, 1 + clip_high) A)
      dual clip (1912.09729), for A < 0:  l = min(l, -dual_clip * A)

    DAPO (2503.14476) uses clip_low 0.2, clip_high 0.28 and token-mean.

    Args:
      logp: [B,T] current-policy log-probs (differentiated).
      old_logp: [B,T] behaviour log-probs (no gradient).
      advantages_BT: [B,T] per-token advantages (no gradient).
      mask: [B,T] 1 on agent tokens.
      clip_low, clip_high: clip range of the ratio.
      dual_clip: constant c > 1 of the dual clip, or None.
      agg: aggregation mode, see ``loss_denominator``.
      denominator: overrides the denominator (micro-batch accumulation).

    Returns:
      (loss, aux) with aux keys loss_sum, denominator, clip_frac, clip_frac_low,
      clip_frac_high, dual_clip_frac, approx_kl (k3 estimate of KL(old||new)),
      ratio_mean, per_token (the unreduced loss).
    """
    for name, x in (("logp", logp), ("old_logp", old_logp), ("advantages_BT", advantages_BT), ("mask", mask)):
        _checks.check_rank(name, x, 2)
    _checks.check_same_shape(logp=logp, old_logp=old_logp, advantages_BT=advantages_BT, mask=mask)
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip!r}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low and clip_high must be >= 0, got {clip_low!r}, {clip_high!r}")
    m = mask.astype(jnp.float32)
    adv = jax.lax.stop_gradient(advantages_BT.astype(jnp.float32))
    log_ratio = jnp.where(m > 0, logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32)), 0.0)
    ratio = jnp.exp(log_ratio)
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    unclipped_loss = -ratio * adv
    clipped_loss = -clipped * adv
    per_token = jnp.maximum(unclipped_loss, clipped_loss)
    dual_frac = jnp.zeros(())
    if dual_clip is not None:
        dual = -dual_clip * adv
        use_dual = (adv < 0) & (per_token > dual)
        per_token = jnp.where(adv < 0, jnp.minimum(per_token, dual), per_token)
        dual_frac = jnp.sum(use_dual * m) / jnp.maximum(jnp.sum(m), 1.0)
    loss, total, denom = aggregate(per_token, mask, agg=agg, denominator=denominator, norm_length=norm_length)
    n = jnp.maximum(jnp.sum(m), 1.0)
    is_clipped = clipped_loss > unclipped_loss
    aux = {
        "loss_sum": total,
        "denominator": denom,
        "clip_frac": jnp.sum(is_clipped * m) / n,
        "clip_frac_low": jnp.sum(is_clipped * (ratio < 1.0) * m) / n,
        "clip_frac_high": jnp.sum(is_clipped * (ratio > 1.0) * m) / n,
        "dual_clip_frac": dual_frac,
        # k3 estimate of KL(old || new) on old-policy samples: E_old[(r - 1) - log r], r = pi_new / pi_old
        "approx_kl": jnp.sum((jnp.expm1(log_ratio) - log_ratio) * m) / n,
        "ratio_mean": jnp.sum(ratio * m) / n,
        "per_token": per_token * m,
    }
    return loss, aux


def gspo_policy_loss(
    logp, old_logp, advantages_BT, mask, turn_ids, *, num_turns: int, clip_low: float = 3e-4,
    clip_high: float = 4e-4, denominator=None,
):
    """GSPO sequence-level clipped loss (2507.18071), one sequence per response.

    For response k with tokens y_k:

      s_k = exp(mean_{t in y_k} (logp_t - old_logp_t)) = (pi/pi_old)^(1/|y_k|)
      l_k = -min(s_k A_k, clip(s_k, 1 - clip_low, 1 + clip_high) A_k)

    A_k is the mean of ``advantages_BT`` over the response's tokens (constant
    within a response for every estimator here). The loss averages l_k over
    valid responses (denominator = number of responses).

    Returns:
      (loss, aux) with loss_sum, denominator, clip_frac, ratio_mean.
    """
    _checks.check_same_shape(logp=logp, old_logp=old_logp, advantages_BT=advantages_BT, mask=mask, turn_ids=turn_ids)
    m = mask.astype(jnp.float32)
    ids = jnp.where(m > 0, turn_ids, -1)
    log_ratio = jnp.where(m > 0, logp.astype(jnp.float32) - jax.lax.stop_gradient(old_logp.astype(jnp.float32)), 0.0)
    count_BK = segments.turn_count(ids, num_turns=num_turns)
    valid_BK = count_BK > 0
    seq_ratio_BK = jnp.exp(segments.turn_mean(log_ratio, ids, num_turns=num_turns))
    adv_BK = jax.lax.stop_gradient(segments.turn_mean(advantages_BT.astype(jnp.float32), ids, num_turns=num_turns))
    clipped_BK = jnp.clip(seq_ratio_BK, 1.0 - clip_low, 1.0 + clip_high)
    loss_BK = jnp.maximum(-seq_ratio_BK * adv_BK, -clipped_BK * adv_BK)
    v = valid_BK.astype(jnp.float32)
    total = jnp.sum(loss_BK * v)
    denom = jnp.sum(v) if denominator is None else denominator
    loss = jnp.where(denom > 0, total / jnp.maximum(denom, 1e-8), 0.0)
    n = jnp.maximum(jnp.sum(v), 1.0)
    aux = {
        "loss_sum": total,
        "denominator": denom,
        "clip_frac": jnp.sum((-clipped_BK * adv_BK > -seq_ratio_BK * adv_BK) * v) / n,
        "ratio_mean": jnp.sum(seq_ratio_BK * v) / n,
    }
    return loss, aux


def kl_penalty(logp, ref_logp, *, kind: str = "low_var_kl"):
    """Per-token KL(pi || ref) estimators on samples from pi (Schulman, 2020).

      k1 = logp - ref_logp
      k2 = 0.5 (logp - ref_logp)^2
      k3 = exp(ref_logp - logp) - (ref_logp - logp) - 1     (unbiased, >= 0)
      low_var_kl = k3 clipped to [-10, 10]

    Returns:
      [B,T] float32 per-token estimates.
    """
    _checks.check_same_shape(logp=logp, ref_logp=ref_logp)
    _checks.check_choice("kind", kind, KL_KINDS)
    diff = logp.astype(jnp.float32) - ref_logp.astype(jnp.float32)
    if kind == "k1":
        return diff
    if kind == "k2":
        return 0.5 * diff**2
    k3 = jnp.exp(-diff) + diff - 1.0
    return jnp.clip(k3, -10.0, 10.0) if kind == "low_var_kl" else k3


def entropy_bonus(entropy, mask, *, coef: float, agg: str = "token-mean", denominator=None):
    """Entropy bonus as a loss term ``-coef * aggregate(H)``; returns (loss, aux)."""
    mean_h, total, denom = aggregate(entropy, mask, agg=agg, denominator=denominator)
    return -coef * mean_h, {"loss_sum": -coef * total, "denominator": denom, "entropy": mean_h}
