"""Response-level entropy analysis and Adaptive Entropy Modulation (2605.00425).

For a response (one turn's agent output) a = (y_1..y_n) in context s:

  S(a|s)   = -sum_t log pi(y_t | s, y_<t)          response surprisal
  Hresp(s) = sum_t H(pi(. | s, y_<t))              response entropy (the
             per-token part of E[S]: its predictable component)
  S - Hresp                                        relative response surprisal

Under a natural-gradient step with advantages A, the response entropy drifts
to first order by ``eta * A(s,a) * (S(a|s) - Hresp(s))``: a sample raises
entropy when its advantage and its relative surprisal share a sign. Early in
training most samples fail (A < 0), later most succeed (A > 0), so the sign of
this product decides whether an update explores or exploits.

AEM turns this into an advantage rescaling: responses with high mean token
entropy get smaller weights, ``alpha = exp(-lam * Htil) / mean_g exp(-lam * Htil)``
with ``Htil`` min-max normalised inside the group, so alpha averages 1 over
each group, lies in (e^-lam, e^lam), and never changes an advantage's sign.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from aem_jax.objectives import _checks, segments

SCOPES = ("group", "batch", "trajectory")
SIGNALS = ("mean_token_entropy", "surprisal_per_token")


def response_surprisal(logp, turn_ids, *, num_turns: int):
    """``S_k = -sum_{t in turn k} logp_t``, [B,K] (0 for empty turns)."""
    return -segments.turn_sum(logp, turn_ids, num_turns=num_turns)


def response_entropy(entropy, turn_ids, *, num_turns: int, length_normalize: bool = False):
    """``Hresp_k = sum_{t in turn k} H_t``; ``Hbar_k = Hresp_k / |turn k|`` if normalised."""
    if length_normalize:
        return segments.turn_mean(entropy, turn_ids, num_turns=num_turns)
    return segments.turn_sum(entropy, turn_ids, num_turns=num_turns)


def relative_surprisal(logp, entropy, turn_ids, *, num_turns: int):
    """Relative response surprisal ``S_k - Hresp_k``, [B,K]."""
    _checks.check_same_shape(logp=logp, entropy=entropy, turn_ids=turn_ids)
    return -segments.turn_sum(logp + entropy, turn_ids, num_turns=num_turns)


def entropy_signal(logp, entropy, turn_ids, *, num_turns: int, signal: str = "mean_token_entropy"):
    """The per-response entropy signal AEM normalises, [B,K].

    ``mean_token_entropy``: Hbar_k, the mean behaviour-token entropy (the paper's
    proxy). ``surprisal_per_token``: S_k / |turn k|, the mean token surprisal,
    a sampled estimate of the same quantity (reconstructed option; it needs
    no entropy from the sampler).
    """
    _checks.check_choice("signal", signal, SIGNALS)
    if signal == "mean_token_entropy":
        return segments.turn_mean(entropy, turn_ids, num_turns=num_turns)
    return -segments.turn_mean(logp, turn_ids, num_turns=num_turns)


def entropy_drift(advantages_BK, rel_surprisal_BK, valid_BK):
    """Predicted first-order entropy drift ``mean_valid A_k * (S_k - Hresp_k)``.

    A scalar proportional to the response-entropy change of one natural-gradient
    step on the batch (step size 1); 0 when no turn is valid.
    """
    _checks.check_same_shape(
        advantages_BK=advantages_BK, rel_surprisal_BK=rel_surprisal_BK, valid_BK=valid_BK
    )
    v = valid_BK.astype(jnp.float32)
    total = jnp.sum(advantages_BK.astype(jnp.float32) * rel_surprisal_BK.astype(jnp.float32) * v)
    return total / jnp.maximum(jnp.sum(v), 1.0)


def entropy_drift_by_sign(advantages_BK, rel_surprisal_BK, valid_BK):
    """Splits ``entropy_drift`` into the parts of positive and negative advantages.

    Returns a dict with ``drift``, ``drift_pos``, ``drift_neg`` (each summed over
    its samples and divided by the number of valid turns, so the two parts add
    up to ``drift``) and ``frac_pos`` (fraction of valid turns with A > 0).
    """
    v = valid_BK.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(v), 1.0)
    prod = advantages_BK.astype(jnp.float32) * rel_surprisal_BK.astype(jnp.float32) * v
    pos = (advantages_BK > 0).astype(jnp.float32) * v
    neg = (advantages_BK < 0).astype(jnp.float32) * v
    return {
        "drift": jnp.sum(prod) / n,
        "drift_pos": jnp.sum(prod * pos) / n,
        "drift_neg": jnp.sum(prod * neg) / n,
        "frac_pos": jnp.sum(pos) / n,
    }


def _scope_ids(group_ids, shape_BK, scope):
    B, K = shape_BK
    if scope == "group":
        return jnp.broadcast_to(group_ids[:, None], (B, K)), None
    if scope == "batch":
        return jnp.zeros((B, K), jnp.int32), 1
    return jnp.broadcast_to(jnp.arange(B, dtype=jnp.int32)[:, None], (B, K)), B


def aem_coefficients(
    response_entropy_BK, group_ids, valid_BK, *, num_groups: int, lam: float = 1.0,
    min_range: float = 0.1, scope: str = "group",
):
    """AEM advantage coefficients alpha (2605.00425, section "practical proxy").

    Inside each scope set g (the valid responses of one task group, the whole
    batch, or one trajectory = one row of the episode layout):

      Htil  = (Hbar - min_g Hbar) / (max_g Hbar - min_g Hbar)
      w     = exp(-lam * Htil)
      alpha = w / mean_g(w)            (alpha = 1 if max_g - min_g < min_range)

    so alpha averages exactly 1 over each set's valid responses and lies in
    (e^-lam, e^lam). Use ``A_aem = stop_gradient(alpha) * A``: positive, so no
    advantage changes sign. Invalid entries get alpha = 1. With ``scope="batch"``
    this is EMPG's batch-normalised gain (2509.09265) without its bonus.

    Args:
      response_entropy_BK: [B,K] per-response entropy signal (e.g. the mean
        behaviour-token entropy Hbar from ``entropy_signal``).
      group_ids: [B] int task group in [0, num_groups).
      valid_BK: [B,K] bool, the response exists.
      num_groups: static number of groups.
      lam: modulation strength (>= 0). Negative values reverse the direction
        (an ablation).
      min_range: groups whose entropy range is below this keep alpha = 1.
      scope: ``group`` | ``batch`` | ``trajectory``.

    Returns:
      alpha [B,K] float32, with no gradient.
    """
    _checks.check_rank("response_entropy_BK", response_entropy_BK, 2)
    _checks.check_rank("group_ids", group_ids, 1)
    _checks.check_integer("group_ids", group_ids)
    _checks.check_same_shape(response_entropy_BK=response_entropy_BK, valid_BK=valid_BK)
    _checks.check_leading("group_ids", group_ids, response_entropy_BK.shape[:1], "[B] rows")
    _checks.check_choice("scope", scope, SCOPES)
    _checks.check_positive_int("num_groups", num_groups)
    _checks.check_ids_below("group_ids", group_ids, num_groups, "num_groups", allow_negative=False)
    h_BK = jax.lax.stop_gradient(response_entropy_BK.astype(jnp.float32))
    valid = valid_BK.astype(bool)
    ids_BK, n_sets = _scope_ids(group_ids, h_BK.shape, scope)
    n_sets = num_groups if n_sets is None else n_sets
    lo, hi = segments.group_min_max(h_BK, ids_BK, valid, num_groups=n_sets)
    span = hi - lo
    guarded = span < min_range
    htil = jnp.where(guarded, 0.0, (h_BK - lo) / jnp.where(guarded, 1.0, span))
    w = jnp.exp(-lam * htil)
    mean_w, _ = segments.group_mean(w, ids_BK, valid, num_groups=n_sets)
    alpha = jnp.where(guarded | ~valid, 1.0, w / jnp.where(mean_w > 0, mean_w, 1.0))
    return jax.lax.stop_gradient(alpha)


def empg_advantages(
    advantages_BK, response_entropy_BK, valid_BK, *, k: float = 1.0, k_future: float = 1.0,
    zeta: float = 0.05, recenter: bool = True,
):
    """EMPG-style modulation (2509.09265), the batch-level relative of AEM.

      Htil  = batch min-max normalised entropy signal
      g     = exp(-k Htil) / mean_batch exp(-k Htil)
      A'_k  = g_k * A_k + zeta * exp(-k_future * Htil_{k+1})   (future clarity,
              only where turn k+1 exists)
      A'   <- A' - mean_batch A'                               (if recenter)

    Args:
      advantages_BK: [B,K] base advantages in episode layout.
      response_entropy_BK: [B,K] entropy signal.
      valid_BK: [B,K] bool.

    Returns:
      [B,K] modulated advantages (0 on invalid turns).
    """
    _checks.check_same_shape(
        advantages_BK=advantages_BK, response_entropy_BK=response_entropy_BK, valid_BK=valid_BK
    )
    valid = valid_BK.astype(bool)
    h = jax.lax.stop_gradient(response_entropy_BK.astype(jnp.float32))
    ids = jnp.zeros(h.shape, jnp.int32)
    lo, hi = segments.group_min_max(h, ids, valid, num_groups=1)
    htil = jnp.where(hi - lo > 0, (h - lo) / jnp.where(hi - lo > 0, hi - lo, 1.0), 0.0)
    w = jnp.exp(-k * htil)
    mean_w, _ = segments.group_mean(w, ids, valid, num_groups=1)
    g = w / jnp.where(mean_w > 0, mean_w, 1.0)
    next_valid = jnp.pad(valid[:, 1:], ((0, 0), (0, 1)))
    next_htil = jnp.pad(htil[:, 1:], ((0, 0), (0, 1)))
    bonus = jnp.where(next_valid, zeta * jnp.exp(-k_future * next_htil), 0.0)
    out = g * advantages_BK.astype(jnp.float32) + bonus
    if recenter:
        mean_out, _ = segments.group_mean(out, ids, valid, num_groups=1)
        out = out - mean_out
    return jnp.where(valid, out, 0.0)
