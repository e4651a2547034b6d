"""ETPO (2402.06700): entropy-regularised token-level policy optimisation.

A token-level soft Bellman backup over a per-token Q function Q(c, w) on the
vocabulary, a reference policy rho and a KL weight beta. Contexts c_j are
the prefixes before token j; arrays are aligned to the predicted token, so
``q[b, t]`` and ``logits[b, t]`` describe the choice of token t.

  Vsoft(c) = sum_w pi(w|c) Qbar(c, w) - beta * KL(pi(.|c) || rho(.|c))
  y_j      = Vsoft(c_{j+1})                               inside a response
  y_last   = r + gamma (1 - d) Vsoft(first context of the next turn)
  L_Q      = Huber_delta(Q(c_j, w_j) - y_j)               on agent tokens
  pi*(w|c) ∝ rho(w|c) exp(Q(c, w) / beta)
  L_pi     = sum_w pi(w|c) [beta (log pi(w|c) - log rho(w|c)) - sg Q(c, w)]

No discount inside a response; gamma between turns. The whole-response soft
value decomposes exactly into these per-token backups.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks, policy, segments


def etpo_soft_values(q, logits, ref_logits, *, beta: float = 0.01):
    """Soft value ``sum_w pi Q - beta KL(pi || rho)`` of each context, [B,T].

    Args:
      q: [B,T,V] (target) Q values of every next token.
      logits: [B,T,V] policy logits pi(.|c).
      ref_logits: [B,T,V] reference logits rho(.|c).
      beta: KL weight (> 0).
    """
    _checks.check_rank("q", q, 3)
    _checks.check_same_shape(q=q, logits=logits, ref_logits=ref_logits)
    logpi = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logrho = jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1)
    pi = jnp.exp(logpi)
    return jnp.sum(pi * (q.astype(jnp.float32) - beta * (logpi - logrho)), axis=-1)


def etpo_token_targets(
    vsoft, turn_ids, mask, turn_rewards, turn_valid, dones, *, gamma: float = 1.0,
    next_turn_value=None,
):
    """Token-level soft Bellman targets y_j, [B,T] (0 off agent tokens).

    Inside response k: ``y_j = vsoft[j+1]`` (the next token's context). At the
    last token of response k: ``y = r_k + gamma (1 - d_k) V_next_k`` where
    ``V_next_k`` is vsoft at the first token of turn k+1 of the same row, or
    ``next_turn_value[b, k]`` when given (windowed batches, whose next turn is
    another row). A turn with no next turn and no given value bootstraps 0.

    Args:
      vsoft: [B,T] soft values from ``etpo_soft_values`` (target network).
      turn_ids: [B,T] turn index of agent tokens, -1 elsewhere.
      mask: [B,T] 1 on agent tokens.
      turn_rewards: [B,K] reward after each turn.
      turn_valid: [B,K] bool.
      dones: [B,K] 1 if the episode terminated after the turn.
      gamma: discount between turns.
      next_turn_value: optional [B,K] soft value of the next turn's first context.
    """
    _checks.check_same_shape(vsoft=vsoft, turn_ids=turn_ids, mask=mask)
    _checks.check_same_shape(turn_rewards=turn_rewards, turn_valid=turn_valid, dones=dones)
    K = turn_rewards.shape[1]
    sg = jax.lax.stop_gradient
    vsoft = sg(vsoft.astype(jnp.float32))
    in_turn = (turn_ids >= 0) & mask.astype(bool)
    ids = jnp.where(in_turn, turn_ids, -1)
    prev_ids = jnp.pad(ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    next_ids = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)), constant_values=-1)
    first = in_turn & (prev_ids != ids)
    last = in_turn & (next_ids != ids)
    if next_turn_value is None:
        first_value_BK = segments.turn_sum(jnp.where(first, vsoft, 0.0), ids, num_turns=K)
        next_valid = jnp.pad(turn_valid[:, 1:].astype(bool), ((0, 0), (0, 1)))
        next_turn_value = jnp.where(next_valid, jnp.pad(first_value_BK[:, 1:], ((0, 0), (0, 1))), 0.0)
    boot_BK = turn_rewards.astype(jnp.float32) + gamma * (1.0 - dones.astype(jnp.float32)) * sg(next_turn_value)
    v_next = jnp.pad(vsoft[:, 1:], ((0, 0), (0, 1)))
    y = jnp.where(last, segments.turn_broadcast(boot_BK, ids), v_next)
    return jnp.where(in_turn, y, 0.0)


def etpo_q_loss(q_taken, targets, mask, *, delta: float = 10.0, agg: str = "token-mean", denominator=None):
    """Huber(delta) loss between Q(c_j, w_j) and the soft targets on agent tokens.

    Returns (loss, aux) with loss_sum, denominator, q_mean, td_abs.
    """
    _checks.check_same_shape(q_taken=q_taken, targets=targets, mask=mask)
    err = q_taken.astype(jnp.float32) - jax.lax.stop_gradient(targets.astype(jnp.float32))
    abs_err = jnp.abs(err)
    huber = jnp.where(abs_err <= delta, 0.5 * err**2, delta * (abs_err - 0.5 * delta))
    loss, total, denom = policy.aggregate(huber, mask, agg=agg, denominator=denominator)
    m = mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    return loss, {"loss_sum": total, "denominator": denom,
                  "q_mean": jnp.sum(q_taken * m) / n, "td_abs": jnp.sum(abs_err * m) / n}


def etpo_policy_loss(logits, ref_logits, q, mask, *, beta: float = 0.01, agg: str = "token-mean", denominator=None):
    """Per-token KL-regularised policy loss towards pi* ∝ rho exp(Q / beta).

      l(c) = sum_w pi(w|c) [beta (log pi(w|c) - log rho(w|c)) - sg Q(c, w)]
           = beta KL(pi || pi*) + const(c)

    so its minimiser over pi is exactly pi*. (The released reference code drops
    rho and averages uniformly over the vocabulary; this is the principled form.)

    Returns (loss, aux) with loss_sum, denominator, kl_ref (mean KL(pi||rho)).
    """
    _checks.check_rank("logits", logits, 3)
    _checks.check_same_shape(logits=logits, ref_logits=ref_logits, q=q)
    logpi = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    logrho = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1))
    pi = jnp.exp(logpi)
    kl = jnp.sum(pi * (logpi - logrho), axis=-1)
    per_token = beta * kl - jnp.sum(pi * jax.lax.stop_gradient(q.astype(jnp.float32)), axis=-1)
    loss, total, denom = policy.aggregate(per_token, mask, agg=agg, denominator=denominator)
    m = mask.astype(jnp.float32)
    return loss, {"loss_sum": total, "denominator": denom,
                  "kl_ref": jnp.sum(kl * m) / jnp.maximum(jnp.sum(m), 1.0)}
